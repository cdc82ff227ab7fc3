"""Check a COCO-keypoint json and split it by category into train / val / test files.

  python -m capenext_jax.tools.split_categories my_keypoints.json --image_root images/ \\
      --val "fox,lynx" --test "okapi" --out_dir annotations/

Category-agnostic training needs disjoint categories: the model is scored on categories it
never saw. Every category not named in --val / --test goes to train. The file is read by the
same validating reader as train.py / eval.py (errors name the file, the id and the field), and
every image must exist under --image_root. Every category needs --shots + 1 instances (an
episode: the supports and one query), and train at least one category. Writes
`<stem>_{train,val,test}.json` with each split's categories (skeletons 0-based, whatever the
input's base, and the field "skeleton_base": 0), annotations and the images they use, and
prints a summary per split. Without --val / --test it only checks the file.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from capenext_jax import cli
from capenext_jax.mp100.annotations import MP100Dataset, check_episode_size, load_annotations
from capenext_jax.mp100.json_files import read_json

SPLITS = ('train', 'val', 'test')


def split_by_category(coco: dict, val: Sequence[str], test: Sequence[str],
                      skeletons: dict | None = None) -> dict[str, dict]:
  """{split: COCO dict} with disjoint categories (named ones to val / test, the rest train).

  skeletons: {category id: 0-based edges} replacing the categories' own (the reader's), and the
  files then say "skeleton_base": 0.
  """
  names = {c['name']: c['id'] for c in coco['categories']}
  unknown = [n for n in (*val, *test) if n not in names]
  if unknown:
    raise ValueError(f'categories {unknown} are not in the file (it has {sorted(names)})')
  both = set(val) & set(test)
  if both:
    raise ValueError(f'categories {sorted(both)} are in both --val and --test')
  split_of = {names[n]: 'val' for n in val} | {names[n]: 'test' for n in test}
  if all(split_of.get(c['id']) for c in coco['categories']):
    raise ValueError('--val and --test take every category: none is left to train on')
  out = {}
  for split in SPLITS:
    cats = [c for c in coco['categories'] if split_of.get(c['id'], 'train') == split]
    if skeletons is not None:
      cats = [dict(c, skeleton=[list(e) for e in skeletons[c['id']]]) for c in cats]
    ids = {c['id'] for c in cats}
    anns = [a for a in coco['annotations'] if a['category_id'] in ids]
    used = {a['image_id'] for a in anns}
    out[split] = dict(coco, categories=cats, annotations=anns,
                      images=[im for im in coco['images'] if im['id'] in used])
    if skeletons is not None:
      out[split]['skeleton_base'] = 0
  return out


def checked_dataset(ann_file: str, image_root: str, shots: int, skeleton_base: int | None,
                    data: dict) -> MP100Dataset:
  """The file read as train.py reads it, with its images present and every category holding
  `shots + 1` instances (after the reader's filters)."""
  d = load_annotations(ann_file, image_root, data=data, skeleton_base=skeleton_base)
  missing = [p for p in dict.fromkeys(d.image_path) if not Path(p).is_file()]
  if missing:
    raise ValueError(f'{ann_file}: {len(missing)} image files missing under {image_root!r}, '
                     f'e.g. {missing[0]}')
  check_episode_size(d, shots + 1, f'{shots}-shot episode')
  return d


def summary(d: MP100Dataset) -> str:
  """One line per category (K, instances)."""
  counts = {}
  for row in d.category_index:
    counts[row] = counts.get(row, 0) + 1
  lines = [f'{d.ann_file}: {len(d.ann_id)} instances, {len(d.category_ids)} categories']
  for row, name in enumerate(d.raw_category_names):
    lines.append(f'  {name}: K={d.category_num_keypoints[row]}, {counts.get(row, 0)} instances')
  return '\n'.join(lines)


def write_json_whole(path: Path, value) -> None:
  """`value` as JSON at `path`, whole or not at all (a temporary name, then a rename)."""
  fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f'.{path.name}.', suffix='.tmp')
  try:
    with os.fdopen(fd, 'w', encoding='utf-8') as f:
      json.dump(value, f)
    os.chmod(tmp, 0o666 & ~_umask())
    os.replace(tmp, path)
  except BaseException:
    os.unlink(tmp)
    raise


def _umask() -> int:
  mask = os.umask(0)
  os.umask(mask)
  return mask


def run(args) -> None:
  if args.shots < 1:
    raise ValueError(f'--shots must be at least 1, got {args.shots}')
  data = read_json(args.ann_file, 'annotation file')
  d = checked_dataset(args.ann_file, args.image_root, args.shots, args.skeleton_base, data)
  print(summary(d))
  val = [n.strip() for n in args.val.split(',') if n.strip()]
  test = [n.strip() for n in args.test.split(',') if n.strip()]
  if not (val or test):
    return
  skeletons = dict(zip((int(c) for c in d.category_ids), d.skeletons))
  splits = split_by_category(data, val, test, skeletons)
  out_dir = Path(args.out_dir)
  source = Path(args.ann_file).resolve()
  paths = {split: out_dir / f'{Path(args.ann_file).stem}_{split}.json' for split in splits}
  for path in paths.values():
    if path.resolve() == source:
      raise ValueError(f'--out_dir: {path} would overwrite the input file')
  out_dir.mkdir(parents=True, exist_ok=True)
  for split, coco in splits.items():
    write_json_whole(paths[split], coco)
    print(f'wrote {paths[split]}: {len(coco["categories"])} categories, '
          f'{len(coco["annotations"])} instances')


def main(argv: Sequence[str] | None = None) -> int:
  p = argparse.ArgumentParser(prog='python -m capenext_jax.tools.split_categories',
                              description=__doc__.split('\n\n')[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('ann_file')
  p.add_argument('--image_root', default='', help='folder the file_name entries are under')
  p.add_argument('--val', default='', help='comma-separated category names for validation')
  p.add_argument('--test', default='', help='comma-separated category names for testing')
  p.add_argument('--out_dir', default='.', help='where the split files are written')
  p.add_argument('--shots', type=int, default=1,
                 help='supports per episode; every category needs shots + 1 instances')
  p.add_argument('--skeleton_base', type=int, choices=(0, 1), default=None,
                 help='the file numbers skeleton keypoints from 0 or 1 (default: detected, '
                 'see docs/CUSTOM_DATA.md); the split files are written 0-based')
  args = p.parse_args(argv)
  try:
    with cli.plain_data_warnings():   # as they come, before an error too
      run(args)
  except ValueError as e:
    print(f'{p.prog}: error: {e}', file=sys.stderr)
    return 2
  return 0


if __name__ == '__main__':
  sys.exit(main())

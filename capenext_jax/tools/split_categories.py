"""Check a COCO-keypoint json and split it by category into train / val / test files.

  python -m capenext_jax.tools.split_categories my_keypoints.json --image_root images/ \\
      --val "fox,lynx" --test "okapi" --out_dir annotations/

Category-agnostic training needs disjoint categories: the model is scored on categories it
never saw. Every category not named in --val / --test goes to train. The file is read by the
same validating reader as train.py / eval.py (errors name the file, the id and the field), and
every image must exist under --image_root. Writes `<stem>_{train,val,test}.json` with each
split's categories, annotations and the images they use, and prints a summary per split.
Without --val / --test it only checks the file.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from capenext_jax.mp100.annotations import load_annotations

SPLITS = ('train', 'val', 'test')


def split_by_category(coco: dict, val: Sequence[str], test: Sequence[str]) -> dict[str, dict]:
  """{split: COCO dict} with disjoint categories (named ones to val / test, the rest train)."""
  names = {c['name']: c['id'] for c in coco['categories']}
  unknown = [n for n in (*val, *test) if n not in names]
  if unknown:
    raise ValueError(f'categories {unknown} are not in the file (it has {sorted(names)})')
  both = set(val) & set(test)
  if both:
    raise ValueError(f'categories {sorted(both)} are in both --val and --test')
  split_of = {names[n]: 'val' for n in val} | {names[n]: 'test' for n in test}
  out = {}
  for split in SPLITS:
    cats = [c for c in coco['categories'] if split_of.get(c['id'], 'train') == split]
    ids = {c['id'] for c in cats}
    anns = [a for a in coco['annotations'] if a['category_id'] in ids]
    used = {a['image_id'] for a in anns}
    out[split] = dict(coco, categories=cats, annotations=anns,
                      images=[im for im in coco['images'] if im['id'] in used])
  return out


def summary(ann_file: str, image_root: str) -> str:
  """One line per category (K, instances) after the reader's validation."""
  d = load_annotations(ann_file, image_root)
  missing = [p for p in dict.fromkeys(d.image_path) if not Path(p).is_file()]
  if missing:
    raise ValueError(f'{ann_file}: {len(missing)} image files missing under {image_root!r}, '
                     f'e.g. {missing[0]}')
  counts = {}
  for row in d.category_index:
    counts[row] = counts.get(row, 0) + 1
  lines = [f'{ann_file}: {len(d.ann_id)} instances, {len(d.category_ids)} categories']
  for row, name in enumerate(d.raw_category_names):
    lines.append(f'  {name}: K={d.category_num_keypoints[row]}, {counts.get(row, 0)} instances')
  return '\n'.join(lines)


def main(argv: Sequence[str] | None = None) -> int:
  p = argparse.ArgumentParser(prog='python -m capenext_jax.tools.split_categories',
                              description=__doc__.split('\n\n')[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('ann_file')
  p.add_argument('--image_root', default='', help='folder the file_name entries are under')
  p.add_argument('--val', default='', help='comma-separated category names for validation')
  p.add_argument('--test', default='', help='comma-separated category names for testing')
  p.add_argument('--out_dir', default='.', help='where the split files are written')
  args = p.parse_args(argv)
  try:
    print(summary(args.ann_file, args.image_root))
    val = [n.strip() for n in args.val.split(',') if n.strip()]
    test = [n.strip() for n in args.test.split(',') if n.strip()]
    if not (val or test):
      return 0
    with open(args.ann_file, encoding='utf-8') as f:
      splits = split_by_category(json.load(f), val, test)
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for split, coco in splits.items():
      path = out_dir / f'{Path(args.ann_file).stem}_{split}.json'
      path.write_text(json.dumps(coco))
      print(f'wrote {path}: {len(coco["categories"])} categories, '
            f'{len(coco["annotations"])} instances')
  except ValueError as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  return 0


if __name__ == '__main__':
  sys.exit(main())

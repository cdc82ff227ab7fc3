"""capenext-predict: keypoints of a described category on one's own images.

  capenext-predict photo.jpg --checkpoint export_dir --category tiger \\
      --keypoints "left ear,right ear,nose,tail" --skeleton "0-2,1-2" [--bbox x,y,w,h]
  capenext-predict --coco annotations.json --image_root images/ --checkpoint ckpt.pth \\
      --output predictions.json --overlay_dir overlays/

`--checkpoint` is anything `capenext_jax.loading` reads (an export, a train.py workdir, an
official .pth / .npz, a parity fixture). Writes a JSON of keypoints in image coordinates and an
overlay PNG (numbered points, skeleton, legend) named after the JSON; the model side is
`predictor.Predictor`. Every input is checked before the model loads; no output may be one of
the files the run reads or another output, and each is written whole (temporary name, then
rename).
"""
from __future__ import annotations

import argparse
import functools
import json
import re
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from capenext_jax import cli, loading
from capenext_jax.atomic import new_file
from capenext_jax.evaluation.visualize import draw_overlay, file_stems, outside_image
from capenext_jax.models.capenext import NUM_SLOTS
from capenext_jax.mp100.annotations import read_categories
from capenext_jax.mp100.images import load_rgb
from capenext_jax.mp100.json_files import read_text
from capenext_jax.predictor import Predictor, Query, clean_bbox
from capenext_jax.progress import Progress


# ----------------------------------------------------------------------------- CLI parsing
def parse_descriptions(text: str | None, file: str | None, flag: str = '--keypoints'
                       ) -> tuple[str, ...]:
  """Comma-separated names (`flag`), or a file: a JSON list of strings or one name per line
  (UTF-8, or UTF-16 / UTF-8 with a byte-order mark).

  Every name counts: the skeleton numbers the keypoints from 0, so an empty one (`nose,,tail`,
  a blank line between names) is refused naming its position rather than dropped, which would
  shift every later index. Trailing blank lines of a file are not names.
  """
  if (text is None) == (file is None):
    raise ValueError('give exactly one of --keypoints / --keypoints_file')
  if file is not None:
    names, where = _names_in_file(file)
  else:
    names = text.split(',')
    where = lambda i: f'{flag} {text!r}: name {i} (0-based)'  # noqa: E731
  names = [n.strip() for n in names]
  empty = [i for i, n in enumerate(names) if not n]
  if empty:
    raise ValueError(f'{where(empty[0])} is empty: every keypoint needs a name (the skeleton '
                     f'numbers them from 0)')
  if not names or len(names) > NUM_SLOTS:
    raise ValueError(f'{len(names)} keypoint descriptions: between 1 and {NUM_SLOTS} are needed')
  return tuple(names)


def _names_in_file(file: str):
  """(the names of a --keypoints_file, position -> 'file: line n' / 'file: item i')."""
  content = read_text(file, 'keypoints file')
  if not content.lstrip().startswith(('[', '{')):
    lines = content.splitlines()
    while lines and not lines[-1].strip():
      lines.pop()
    return lines, lambda i: f'--keypoints_file {file}: line {i + 1}'
  try:
    items = json.loads(content)
  except json.JSONDecodeError as e:
    raise ValueError(f'--keypoints_file {file}: not valid JSON: {e}') from None
  if not isinstance(items, list):
    raise ValueError(f'--keypoints_file {file}: a JSON list of keypoint names is needed, not a '
                     f'JSON {type(items).__name__.replace("dict", "object")}')
  for i, item in enumerate(items):
    if not isinstance(item, str):
      raise ValueError(f'--keypoints_file {file}: item {i} (0-based) is {json.dumps(item)}, '
                       f'not a keypoint name (a JSON string)')
  return items, lambda i: f'--keypoints_file {file}: item {i} (0-based)'


def parse_skeleton(spec: str | None, num_keypoints: int, flag: str = '--skeleton'
                   ) -> tuple[tuple[int, int], ...]:
  """'0-1,1-2', a JSON list of pairs, or a file holding either; 0-based indices."""
  if not spec:
    return ()
  if Path(spec).is_file():
    flag, spec = f'{flag} {spec}', read_text(spec, 'skeleton file')
  spec = spec.strip()
  if spec.startswith('['):
    try:
      pairs = json.loads(spec)
    except json.JSONDecodeError as e:
      raise ValueError(f'{flag}: not valid JSON: {e}') from None
    if not isinstance(pairs, list):
      raise ValueError(f'{flag}: a JSON list of [i, j] pairs is needed')
    return check_skeleton(pairs, num_keypoints, flag)
  return check_skeleton([p.split('-') for p in spec.replace(' ', '').split(',') if p],
                        num_keypoints, flag)


def _index(value) -> int | None:
  """A keypoint index: a JSON integer or a string of digits; None for anything else (a float
  such as 0.6 is not truncated to an index)."""
  if type(value) is int:
    return value
  if isinstance(value, str) and re.fullmatch(r'[0-9]+', value):
    return int(value)
  return None


def check_skeleton(pairs, num_keypoints: int, flag: str = '--skeleton'
                   ) -> tuple[tuple[int, int], ...]:
  """Integer (i, j) edges, each index in [0, num_keypoints); ValueError naming the first bad
  edge by its position."""
  edges = []
  for n, pair in enumerate(pairs):
    edge = (tuple(_index(v) for v in pair)
            if isinstance(pair, (list, tuple)) and len(pair) == 2 else (None,))
    if None in edge:
      raise ValueError(f'{flag}: edge {n} (0-based) is {json.dumps(pair)}: expected two 0-based '
                       f'keypoint indices (whole numbers), as in "0-1,1-2" or [[0,1],[1,2]]')
    edges.append(edge)
  bad = [e for e in edges if not all(0 <= i < num_keypoints for i in e)]
  if bad:
    raise ValueError(f'{flag}: edges {bad} index past the {num_keypoints} keypoints (0-based)')
  return tuple(edges)


def parse_bbox(spec: str | None) -> list[float] | None:
  if spec is None:
    return None
  try:
    values = [float(v) for v in spec.split(',')]
  except ValueError:
    values = []
  if len(values) != 4 or not np.all(np.isfinite(values)):
    raise ValueError(f'--bbox {spec!r}: expected four finite numbers x,y,w,h')
  return values


# ----------------------------------------------------------------------------- modes
def check_finite(points: np.ndarray, what: str, checkpoint: str) -> None:
  """Refuse to write non-finite keypoints (JSON would hold NaN) naming the input."""
  if not np.all(np.isfinite(points)):
    raise ValueError(f'{what}: the model predicted non-finite keypoints; the weights of '
                     f'{checkpoint} are not usable (diverged training?)')


def keypoints_record(points: np.ndarray, query: Query) -> list[dict]:
  """One dict per keypoint; `outside_image` marks a prediction off the image (the overlay
  draws it on the border as a triangle pointing outwards)."""
  off = outside_image(points, query.image.shape[1], query.image.shape[0])
  return [{'index': k, 'description': d, 'x': float(p[0]), 'y': float(p[1]),
           'outside_image': bool(o)}
          for k, (d, p, o) in enumerate(zip(query.descriptions, points, off))]


def overlay(query: Query, points: np.ndarray, gt=None, gt_visible=None, error_lines=True):
  return draw_overlay(query.image, points, query.skeleton, query.descriptions, gt=gt,
                      gt_visible=gt_visible, bbox=query.bbox, error_lines=error_lines)


# What the JSON says of its "bbox" (and --help of --bbox).
BBOX_NOTE = ('"bbox" is the box the model crops around: "bbox_given" (null: the whole image) '
             'cleaned as the MP-100 annotation reader does (clipped to the image, width and '
             'height 1 px less: the official box cleaning)')


def image_query(args) -> tuple[Query, list[float] | None]:
  """Single-image mode's query from the flags, and the box as given (None: none given)."""
  image = load_rgb(args.image)
  descriptions = parse_descriptions(args.keypoints, args.keypoints_file)
  given = parse_bbox(args.bbox)
  return Query(image=image, bbox=clean_bbox(given, image.shape[1], image.shape[0]),
               category=args.category, descriptions=descriptions,
               skeleton=parse_skeleton(args.skeleton, len(descriptions))), given


def result_record(query: Query, points: np.ndarray, given_bbox, checkpoint: str) -> dict:
  """The JSON of one predicted image (capenext-predict, capenext-demo)."""
  return {'width': query.image.shape[1], 'height': query.image.shape[0],
          'bbox': query.bbox.tolist(), 'bbox_given': given_bbox, 'bbox_note': BBOX_NOTE,
          'category': query.category, 'keypoints': keypoints_record(points, query),
          'skeleton': [list(e) for e in query.skeleton], 'checkpoint': str(checkpoint)}


def predict_image(args, predictor: Predictor, query: Query, given_bbox, outputs: list[Path]
                  ) -> list[Path]:
  """Single-image mode: writes the JSON and (unless --no_overlay) the PNG at `outputs`."""
  points = predictor([query])[0]
  check_finite(points, str(args.image), args.checkpoint)
  result = {'image': str(args.image), **result_record(query, points, given_bbox,
                                                      args.checkpoint)}
  write_text(outputs[0], json.dumps(result, indent=1) + '\n')
  if len(outputs) > 1:
    save_png(overlay(query, points), outputs[1])
  return outputs


def write_text(path: Path, text: str) -> None:
  """`path` whole or not at all (temporary name, then rename)."""
  with new_file(path) as tmp:
    tmp.write_text(text, encoding='utf-8')


def save_png(image, path: Path) -> None:
  with new_file(path) as tmp:
    image.save(tmp, format='PNG')


def single_image_outputs(args) -> list[Path]:
  """[JSON path, overlay path unless --no_overlay]: by default IMAGE_keypoints.json and
  IMAGE_overlay.png; with --output OUT.json the overlay is OUT_overlay.png beside it, so runs
  with different --output keep their own overlays."""
  json_path = Path(args.output or f'{Path(args.image).stem}_keypoints.json')
  paths = [json_path]
  if not args.no_overlay:
    stem = json_path.stem if args.output else Path(args.image).stem
    paths.append(Path(args.overlay or json_path.with_name(f'{stem}_overlay.png')))
  return paths


def coco_queries(ann_file: str, image_root: str) -> tuple[list[Query], list[dict]]:
  """One Query per annotation of a COCO-style json (bbox optional; descriptions by the
  official renaming of each category), with the annotation dicts in the same order."""
  return read_coco(ann_file, image_root)[:2]


def read_coco(ann_file: str, image_root: str) -> tuple[list[Query], list[dict], list[Path]]:
  """`coco_queries`, and the image files read.

  Categories go through the annotation reader's validation: K comes from the annotations'
  keypoint arrays (the name list may be empty, as for ``face`` in the real MP-100 files).
  """
  text = read_text(ann_file, 'annotation file')
  try:
    coco = json.loads(text)
  except json.JSONDecodeError as e:
    raise ValueError(f'{ann_file}: cannot parse json: {e}') from None
  categories = {c['id']: c for c in read_categories(coco, ann_file, require=('images',))}
  images = {im.get('id'): im for im in coco['images'] if isinstance(im, dict)}
  pixels: dict = {}
  queries, anns = [], []
  for pos, ann in enumerate(coco['annotations']):
    where = f'{ann_file}: annotations[{pos}] (id={ann.get("id")})'
    if ann.get('image_id') not in images:
      raise ValueError(f'{where}: field "image_id"={ann.get("image_id")!r} is not an image of '
                       f'this file')
    if ann.get('category_id') not in categories:
      raise ValueError(f'{where}: field "category_id"={ann.get("category_id")!r} is not a '
                       f'category of this file')
    im, cat = images[ann['image_id']], categories[ann['category_id']]
    for field in ('file_name', 'width', 'height'):
      if field not in im:
        raise ValueError(f'{ann_file}: image id={im.get("id")}: missing field "{field}"')
    if im['id'] not in pixels:
      pixels[im['id']] = load_rgb(Path(image_root) / im['file_name'],
                                    (im.get('width'), im.get('height')))
    image = pixels[im['id']]
    queries.append(Query(
        image=image, bbox=clean_bbox(ann.get('bbox'), image.shape[1], image.shape[0]),
        category=cat['name'], descriptions=tuple(cat['descriptions'][:cat['k']]),
        skeleton=tuple(cat['skeleton'])))
    anns.append(ann)
  files = [Path(image_root) / images[i]['file_name'] for i in pixels]
  return queries, anns, files


def coco_overlay_paths(args, anns: list[dict]) -> list[Path]:
  """Batch mode's overlays, one per annotation: `<annotation id>.png` in --overlay_dir, the ids
  made safe and unique by `visualize.file_stems` (no id leaves the folder, a repeated id gets
  `_2`); [] without --overlay_dir."""
  if not args.overlay_dir:
    return []
  stems = file_stems([ann.get('id', pos) for pos, ann in enumerate(anns)])
  return [Path(args.overlay_dir) / f'{stem}.png' for stem in stems]


def predict_coco(args, predictor: Predictor, queries: list[Query], anns: list[dict],
                 overlays: list[Path]) -> list[Path]:
  """Batch mode: COCO keypoint results (one per annotation, score 1) in one JSON, and the
  `overlays` with the annotation's keypoints as ground truth. Returns the paths written."""
  results, written = [], [Path(args.output or 'predictions.json')]
  predicted = predictor(queries, progress=Progress(len(queries), 'predict', unit='images'))
  for n, (query, ann, points) in enumerate(zip(queries, anns, predicted)):
    check_finite(points, f'{args.coco}: annotation id={ann.get("id")}', args.checkpoint)
    flat = np.concatenate([points, np.ones((len(points), 1))], axis=1).reshape(-1)
    results.append({'image_id': ann['image_id'], 'annotation_id': ann.get('id'),
                    'category_id': ann['category_id'], 'keypoints': flat.tolist(),
                    'score': 1.0, 'outside_image': [r['outside_image'] for r in
                                                    keypoints_record(points, query)]})
    if overlays:
      overlays[n].parent.mkdir(parents=True, exist_ok=True)
      gt = np.asarray(ann.get('keypoints', []), np.float64).reshape(-1, 3)
      has_gt = len(gt) == len(points)
      save_png(overlay(query, points, gt[:, :2] if has_gt else None,
                       gt[:, 2] > 0 if has_gt else None, error_lines=not args.no_error_lines),
               overlays[n])
      written.append(overlays[n])
  write_text(written[0], json.dumps(results) + '\n')
  return written


def build_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog='capenext-predict', description=__doc__.split('\n\n')[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('image', nargs='?', help='image file (single-image mode)')
  p.add_argument('--checkpoint', required=True,
                 help='export dir / params file, train.py workdir (its latest step), official '
                 '.pth / .npz, or parity fixture')
  p.add_argument('--config', help='config JSON for official checkpoints (default: headline)')
  p.add_argument('--category', help='category name, e.g. "tiger" (prompt "a photo of tiger")')
  p.add_argument('--keypoints', help='comma-separated keypoint descriptions')
  p.add_argument('--keypoints_file', help='descriptions: one per line, or a JSON list of '
                 'strings (UTF-8, or UTF-16 / UTF-8 with a byte-order mark)')
  p.add_argument('--skeleton', help='0-based edges "0-1,1-2", a JSON list, or a file')
  p.add_argument('--bbox', help='x,y,w,h in pixels (default: the whole image). The JSON\'s '
                 '"bbox" is this box cleaned as the MP-100 annotation reader does (clipped to '
                 'the image, w and h 1 px less: the official box cleaning); "bbox_given" is '
                 'the box as given')
  p.add_argument('--coco', help='COCO-style json: predict every annotation (batch mode)')
  p.add_argument('--image_root', default='.', help='batch mode: image file_name root')
  p.add_argument('--output', help='JSON to write (default IMAGE_keypoints.json / '
                 'predictions.json)')
  p.add_argument('--overlay', help='overlay PNG (default: OUTPUT_overlay.png beside --output, '
                 'IMAGE_overlay.png without it)')
  p.add_argument('--no_overlay', action='store_true', help='single mode: skip the PNG')
  p.add_argument('--overlay_dir', help='batch mode: one overlay per annotation here, '
                 '<annotation id>.png (ids made file-name safe; a repeated id gets _2, ...)')
  p.add_argument('--no_error_lines', action='store_true',
                 help='batch overlays: ground-truth rings without lines to the predictions')
  p.add_argument('--batch_size', type=_positive_int, default=8)
  p.add_argument('-v', '--verbose', action='store_true', help='tracebacks for errors')
  return p


def _positive_int(text: str) -> int:
  value = int(text)
  if value < 1:
    raise argparse.ArgumentTypeError(f'{value}: must be a positive integer')
  return value


def inputs(args) -> list[tuple[str, str | None]]:
  """The files a run reads, by flag (a --skeleton that is not a file is text)."""
  skeleton = args.skeleton if args.skeleton and Path(args.skeleton).is_file() else None
  return [('IMAGE', args.image), ('--coco', args.coco), ('--checkpoint', args.checkpoint),
          ('--config', args.config), ('--keypoints_file', args.keypoints_file),
          ('--skeleton', skeleton)]


def main(argv: Sequence[str] | None = None) -> int:
  parser = build_parser()
  args = parser.parse_args(argv)
  if (args.image is None) == (args.coco is None):
    parser.error('give either an IMAGE or --coco ANNOTATIONS.json')
  if args.image is not None and not args.category:
    parser.error('--category is required with an image')
  return cli.run_parsed(parser.prog, run, args)[0]


def run(args) -> None:
  """Everything a user gave is checked (outputs writable, none of them an input or another
  output, the names, skeleton and box) before the model is loaded."""
  if args.image is not None:
    outputs = single_image_outputs(args)
    for flag, path in zip(('--output', '--overlay'), outputs):
      cli.check_writable(flag, path)
    cli.check_distinct_files(inputs(args), list(zip(('--output', '--overlay'), outputs)))
    query, given_bbox = image_query(args)
    work = functools.partial(predict_image, args, query=query, given_bbox=given_bbox,
                             outputs=outputs)
  else:
    output = args.output or 'predictions.json'
    cli.check_writable('--output', output)
    cli.check_writable('--overlay_dir', args.overlay_dir, directory=True)
    queries, anns, images = read_coco(args.coco, args.image_root)
    overlays = coco_overlay_paths(args, anns)
    cli.check_distinct_files(
        inputs(args) + [('an image of --coco', im) for im in images],
        [('--output', output)] + [('an overlay in --overlay_dir', p) for p in overlays])
    work = functools.partial(predict_coco, args, queries=queries, anns=anns, overlays=overlays)
  config = loading.read_config(args.config) if args.config else None
  predictor = Predictor(loading.load_model(args.checkpoint, config),
                        batch_size=1 if args.image else args.batch_size)
  written = work(predictor)
  print('wrote ' + ', '.join(str(p) for p in written))


if __name__ == '__main__':
  sys.exit(main())

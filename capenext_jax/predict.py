"""capenext-predict: keypoints of a described category on one's own images.

  capenext-predict photo.jpg --checkpoint export_dir --category tiger \\
      --keypoints "left ear,right ear,nose,tail" --skeleton "0-2,1-2" [--bbox x,y,w,h]
  capenext-predict --coco annotations.json --image_root images/ --checkpoint ckpt.pth \\
      --output predictions.json --overlay_dir overlays/

`--checkpoint` is anything `capenext_jax.loading` reads (an export, a train.py workdir, an
official .pth / .npz, a parity fixture). Writes a JSON of keypoints in image coordinates and an
overlay PNG (numbered points, skeleton, legend); the model side is `predictor.Predictor`.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from capenext_jax import cli, loading
from capenext_jax.models.capenext import NUM_SLOTS
from capenext_jax.mp100.annotations import read_categories
from capenext_jax.mp100.images import load_rgb
from capenext_jax.predictor import Predictor, Query, clean_bbox


# ----------------------------------------------------------------------------- CLI parsing
def parse_descriptions(text: str | None, file: str | None) -> tuple[str, ...]:
  """Comma-separated list, or a file: a JSON list or one description per line."""
  if (text is None) == (file is None):
    raise ValueError('give exactly one of --keypoints / --keypoints_file')
  if file is not None:
    content = Path(file).read_text(encoding='utf-8')
    items = (json.loads(content) if content.lstrip().startswith('[')
             else content.splitlines())
  else:
    items = text.split(',')
  out = tuple(str(d).strip() for d in items if str(d).strip())
  if not out or len(out) > NUM_SLOTS:
    raise ValueError(f'{len(out)} keypoint descriptions: between 1 and {NUM_SLOTS} are needed')
  return out


def parse_skeleton(spec: str | None, num_keypoints: int) -> tuple[tuple[int, int], ...]:
  """'0-1,1-2', a JSON list of pairs, or a file holding either; 0-based indices."""
  if not spec:
    return ()
  if Path(spec).is_file():
    spec = Path(spec).read_text()
  spec = spec.strip()
  if spec.startswith('['):
    return check_skeleton(json.loads(spec), num_keypoints)
  return check_skeleton([p.split('-') for p in spec.replace(' ', '').split(',') if p],
                        num_keypoints)


def check_skeleton(pairs, num_keypoints: int) -> tuple[tuple[int, int], ...]:
  """Integer (i, j) edges, each index in [0, num_keypoints); ValueError naming bad ones."""
  try:
    edges = tuple((int(a), int(b)) for a, b in pairs)
  except (TypeError, ValueError) as e:
    raise ValueError(f'skeleton {pairs!r}: expected pairs like "0-1,1-2" or [[0,1],[1,2]]'
                     ) from e
  bad = [e for e in edges if not all(0 <= i < num_keypoints for i in e)]
  if bad:
    raise ValueError(f'skeleton edges {bad} index past the {num_keypoints} keypoints (0-based)')
  return edges


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
  from capenext_jax.evaluation.visualize import outside_image
  off = outside_image(points, query.image.shape[1], query.image.shape[0])
  return [{'index': k, 'description': d, 'x': float(p[0]), 'y': float(p[1]),
           'outside_image': bool(o)}
          for k, (d, p, o) in enumerate(zip(query.descriptions, points, off))]


def overlay(query: Query, points: np.ndarray, gt=None, gt_visible=None, error_lines=True):
  from capenext_jax.evaluation.visualize import draw_overlay
  return draw_overlay(query.image, points, query.skeleton, query.descriptions, gt=gt,
                      gt_visible=gt_visible, bbox=query.bbox, error_lines=error_lines)


def predict_image(args, predictor: Predictor) -> list[Path]:
  """Single-image mode: writes the JSON and (unless --no_overlay) the PNG; returns their paths."""
  image = load_rgb(args.image)
  descriptions = parse_descriptions(args.keypoints, args.keypoints_file)
  query = Query(image=image, bbox=clean_bbox(parse_bbox(args.bbox), image.shape[1],
                                             image.shape[0]),
                category=args.category, descriptions=descriptions,
                skeleton=parse_skeleton(args.skeleton, len(descriptions)))
  points = predictor([query])[0]
  check_finite(points, str(args.image), args.checkpoint)
  result = {'image': str(args.image), 'width': image.shape[1], 'height': image.shape[0],
            'bbox': query.bbox.tolist(), 'category': query.category,
            'keypoints': keypoints_record(points, query),
            'skeleton': [list(e) for e in query.skeleton], 'checkpoint': str(args.checkpoint)}
  written = single_image_outputs(args)
  written[0].write_text(json.dumps(result, indent=1) + '\n')
  if len(written) > 1:
    overlay(query, points).save(written[1])
  return written


def single_image_outputs(args) -> list[Path]:
  """[JSON path, overlay path unless --no_overlay]: by default IMAGE_keypoints.json, and the
  overlay IMAGE_overlay.png next to the JSON."""
  stem = Path(args.image).stem
  paths = [Path(args.output or f'{stem}_keypoints.json')]
  if not args.no_overlay:
    paths.append(Path(args.overlay or paths[0].with_name(f'{stem}_overlay.png')))
  return paths


def coco_queries(ann_file: str, image_root: str) -> tuple[list[Query], list[dict]]:
  """One Query per annotation of a COCO-style json (bbox optional; descriptions by the
  official renaming of each category), with the annotation dicts in the same order.

  Categories go through the annotation reader's validation: K comes from the annotations'
  keypoint arrays (the name list may be empty, as for ``face`` in the real MP-100 files).
  """
  try:
    coco = json.loads(Path(ann_file).read_text())
  except ValueError as e:
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
  return queries, anns


def predict_coco(args, predictor: Predictor) -> list[Path]:
  """Batch mode: COCO keypoint results (one per annotation, score 1) in one JSON, and optional
  overlays with the annotation's keypoints as ground truth. Returns the paths written."""
  from capenext_jax.progress import Progress
  queries, anns = coco_queries(args.coco, args.image_root)
  results, written = [], [Path(args.output or 'predictions.json')]
  predicted = predictor(queries, progress=Progress(len(queries), 'predict', unit='images'))
  for query, ann, points in zip(queries, anns, predicted):
    check_finite(points, f'{args.coco}: annotation id={ann.get("id")}', args.checkpoint)
    flat = np.concatenate([points, np.ones((len(points), 1))], axis=1).reshape(-1)
    results.append({'image_id': ann['image_id'], 'annotation_id': ann.get('id'),
                    'category_id': ann['category_id'], 'keypoints': flat.tolist(),
                    'score': 1.0, 'outside_image': [r['outside_image'] for r in
                                                    keypoints_record(points, query)]})
    if args.overlay_dir:
      written.append(Path(args.overlay_dir) / f'{ann.get("id", len(results))}.png')
      written[-1].parent.mkdir(parents=True, exist_ok=True)
      gt = np.asarray(ann.get('keypoints', []), np.float64).reshape(-1, 3)
      has_gt = len(gt) == len(points)
      overlay(query, points, gt[:, :2] if has_gt else None, gt[:, 2] > 0 if has_gt else None,
              error_lines=not args.no_error_lines).save(written[-1])
  written[0].write_text(json.dumps(results) + '\n')
  return written


def build_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog='capenext-predict', description=__doc__.split('\n\n')[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('image', nargs='?', help='image file (single-image mode)')
  p.add_argument('--checkpoint', required=True,
                 help='export dir / params file, official .pth / .npz, or parity fixture')
  p.add_argument('--config', help='config JSON for official checkpoints (default: headline)')
  p.add_argument('--category', help='category name, e.g. "tiger" (prompt "a photo of tiger")')
  p.add_argument('--keypoints', help='comma-separated keypoint descriptions')
  p.add_argument('--keypoints_file', help='descriptions: one per line, or a JSON list')
  p.add_argument('--skeleton', help='0-based edges "0-1,1-2", a JSON list, or a file')
  p.add_argument('--bbox', help='x,y,w,h in pixels (default: the whole image)')
  p.add_argument('--coco', help='COCO-style json: predict every annotation (batch mode)')
  p.add_argument('--image_root', default='.', help='batch mode: image file_name root')
  p.add_argument('--output', help='JSON to write (default IMAGE_keypoints.json / '
                 'predictions.json)')
  p.add_argument('--overlay', help='overlay PNG (default: IMAGE_overlay.png next to --output)')
  p.add_argument('--no_overlay', action='store_true', help='single mode: skip the PNG')
  p.add_argument('--overlay_dir', help='batch mode: write one overlay per annotation here')
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


def check_outputs(args) -> None:
  """Every output is writable before the model is loaded."""
  if args.image is not None:
    for flag, path in zip(('--output', '--overlay'), single_image_outputs(args)):
      cli.check_writable(flag, path)
  else:
    cli.check_writable('--output', args.output or 'predictions.json')
    cli.check_writable('--overlay_dir', args.overlay_dir, directory=True)


def main(argv: Sequence[str] | None = None) -> int:
  parser = build_parser()
  args = parser.parse_args(argv)
  if (args.image is None) == (args.coco is None):
    parser.error('give either an IMAGE or --coco ANNOTATIONS.json')
  if args.image is not None and not args.category:
    parser.error('--category is required with an image')
  return cli.run_parsed(parser.prog, run, args)[0]


def run(args) -> None:
  check_outputs(args)
  config = loading.read_config(args.config) if args.config else None
  predictor = Predictor(loading.load_model(args.checkpoint, config),
                        batch_size=1 if args.image else args.batch_size)
  written = (predict_image if args.image else predict_coco)(args, predictor)
  print('wrote ' + ', '.join(str(p) for p in written))


if __name__ == '__main__':
  sys.exit(main())

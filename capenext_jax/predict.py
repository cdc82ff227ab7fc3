"""capenext-predict: keypoints of a described category on one's own images.

  capenext-predict photo.jpg --checkpoint export_dir --category tiger \\
      --keypoints "left ear,right ear,nose,tail" --skeleton "0-2,1-2" [--bbox x,y,w,h]
  capenext-predict --coco annotations.json --image_root images/ --checkpoint ckpt.pth \\
      --output predictions.json --overlay_dir overlays/

The image goes through the official test transform (spec 5.1, 5.5, 2): bbox (default: the
whole image) cleaned as the annotation reader does -> center / scale (aspect 1, padding 1.25)
-> affine warp to the model's input size -> ImageNet normalisation -> model -> last decoder
layer's points -> back to image pixels. Writes a JSON of keypoints in image coordinates and an
overlay PNG (numbered points, skeleton, legend). CLIP text embeddings are computed once per
(category, descriptions) set.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from capenext_jax import export, metrics
from capenext_jax.image_ops import imagenet_normalize, warp_affine
from capenext_jax.models.capenext import NUM_SLOTS, CapeNext, CapeNextConfig
from capenext_jax.models.head import adjacency_from_skeleton
from capenext_jax.mp100 import geometry
from capenext_jax.mp100.images import load_rgb


# ----------------------------------------------------------------------------- checkpoints
def _is_fixture(path: Path) -> bool:
  """A parity-fixture npz (official weights listed in `state_dict_keys`, config inside)."""
  if path.suffix != '.npz' or not path.is_file():
    return False
  with np.load(path, allow_pickle=False) as z:
    return {'state_dict_keys', 'config_json'} <= set(z.files)


def _load_fixture(path: Path, config: CapeNextConfig | None) -> CapeNext:
  from capenext_jax.convert import official
  with np.load(path, allow_pickle=False) as z:
    state_dict = {str(k): z[str(k)] for k in z['state_dict_keys']}
    config = config or official.config_from_fixture(json.loads(str(z['config_json'])))
  return export.build_model(config, official.capenext_from_official(state_dict))


def _is_official(path: Path) -> bool:
  return path.is_file() and path.suffix in ('.pth', '.pt', '.ckpt', '.bin', '.npz',
                                             '.safetensors')


def _load_official(path: Path, config: CapeNextConfig | None) -> CapeNext:
  """Official CapeNext (or CapeX: no `additional_module.*`) weights; headline sizes unless a
  config is given, since shapes alone cannot tell e.g. head counts or the input size."""
  from capenext_jax.convert.official import load_official
  params = load_official(path)
  if config is None:
    config = CapeNextConfig() if 'fusion' in params else CapeNextConfig(fusion=None)
  return export.build_model(config, params)


def _load_export(path: Path, config: CapeNextConfig | None) -> CapeNext:
  if config is not None:
    raise ValueError(f'{path}: an export carries its own config; drop --config')
  return export.load_pretrained(path)


# (name, detect(path), load(path, config or None) -> CapeNext), tried in order.
# Hook: train.py's orbax checkpoint directories are added here by the training code, e.g.
#   CHECKPOINT_LOADERS.insert(0, ('train', is_train_checkpoint, load_train_checkpoint))
CHECKPOINT_LOADERS: list[tuple[str, Callable[[Path], bool], Callable]] = [
    ('export', export.is_export, _load_export),
    ('fixture', _is_fixture, _load_fixture),
    ('official', _is_official, _load_official),
]


def load_model(path: str | Path, config: CapeNextConfig | None = None) -> CapeNext:
  """A CapeNext in eval mode from any checkpoint kind in `CHECKPOINT_LOADERS`."""
  path = Path(path)
  if not path.exists():
    raise ValueError(f'{path}: no such checkpoint')
  for _, detect, load in CHECKPOINT_LOADERS:
    if detect(path):
      model = load(path, config)
      model.eval()
      return model
  raise ValueError(f'{path}: not a checkpoint this tool reads (kinds: '
                   f'{", ".join(name for name, _, _ in CHECKPOINT_LOADERS)})')


def read_config(path: str | Path) -> CapeNextConfig:
  """Our config JSON: `CapeNextConfig.to_dict()`, or an export's config.json."""
  d = json.loads(Path(path).read_text())
  return CapeNextConfig.from_dict(d['config'] if 'config' in d else d)


# ----------------------------------------------------------------------------- inputs
def clean_bbox(bbox: Sequence[float] | None, width: int, height: int) -> np.ndarray:
  """The annotation reader's box cleaning; None -> the whole image. Raises ValueError for a
  box with no area inside the image."""
  box = geometry.clean_bbox((0, 0, width, height) if bbox is None else bbox, width, height)
  if box is None:
    raise ValueError(f'bbox {bbox} has no area inside the {width}x{height} image')
  return box


def model_input(image: np.ndarray, bbox: np.ndarray, size: int
                ) -> tuple[jax.Array, np.ndarray, np.ndarray]:
  """The official test crop: image uint8 [H, W, 3], clean bbox [4] ->
  (ImageNet-normalised float32 [size, size, 3], center [2], scale [2])."""
  center, scale = geometry.bbox_to_center_scale(bbox)
  matrix = geometry.affine_matrix(center, scale, 0.0, (size, size)).astype(np.float32)
  warped = warp_affine(jnp.asarray(image)[None], jnp.asarray(matrix)[None], size)
  # cv2.warpAffine writes uint8 for uint8 input: round and saturate as it does.
  return imagenet_normalize(jnp.clip(jnp.round(warped), 0, 255))[0], center, scale


# ----------------------------------------------------------------------------- model
@dataclasses.dataclass(frozen=True)
class Query:
  """One instance to predict: pixels, clean bbox and what its category looks like."""
  image: np.ndarray
  bbox: np.ndarray
  category: str
  descriptions: tuple[str, ...]
  skeleton: tuple[tuple[int, int], ...]


class Predictor:
  """Batched inference with a per-(category, descriptions) text-embedding cache."""

  def __init__(self, model: CapeNext, batch_size: int = 8):
    self.model, self.batch_size = model, batch_size
    self.size = model.config.image_size
    self._text: dict[tuple[str, tuple[str, ...]], tuple[jax.Array, jax.Array]] = {}
    graphdef, state = nnx.split(model)

    @jax.jit
    def forward(state, images, mask, adjacency, keypoint_text, category_text):
      out = nnx.merge(graphdef, state)(images, mask, adjacency, keypoint_text=keypoint_text,
                                       category_text=category_text)
      return out['keypoints'][-1]

    self._forward = lambda *args: forward(state, *args)

  def encode_texts(self, sets: Sequence[tuple[str, tuple[str, ...]]]) -> None:
    """Encode every not yet cached (category, descriptions) set in one text-tower pass."""
    from capenext_jax.text.cache import CategoryText, build_text_cache
    todo = [s for s in dict.fromkeys(sets) if s not in self._text]
    if not todo:
      return
    cache = build_text_cache(self.model, [CategoryText(n, d) for n, d in todo])
    for i, key in enumerate(todo):
      self._text[key] = cache.keypoint[i], cache.category[i]

  def __call__(self, queries: Sequence[Query]) -> list[np.ndarray]:
    """Keypoints [K_i, 2] in image pixels for each query, in order."""
    self.encode_texts([(q.category, q.descriptions) for q in queries])
    out = []
    for start in range(0, len(queries), self.batch_size):
      out.extend(self._batch(queries[start:start + self.batch_size]))
    return out

  def _batch(self, queries: Sequence[Query]) -> list[np.ndarray]:
    n = len(queries)
    pad = list(queries) + [queries[-1]] * (self.batch_size - n)  # one compiled batch shape
    crops = [model_input(q.image, q.bbox, self.size) for q in pad]
    images = jnp.stack([c[0] for c in crops])
    mask = np.zeros((len(pad), NUM_SLOTS), np.float32)
    for b, q in enumerate(pad):
      mask[b, :len(q.descriptions)] = 1.0  # every described keypoint is asked for
    adjacency = np.stack([_adjacency(q.skeleton) for q in pad])
    texts = [self._text[(q.category, q.descriptions)] for q in pad]
    points = self._forward(images, jnp.asarray(mask), jnp.asarray(adjacency, jnp.float32),
                           jnp.stack([t[0] for t in texts]), jnp.stack([t[1] for t in texts]))
    points = np.asarray(points[:n]) * self.size
    center = np.stack([c[1] for c in crops[:n]])
    scale = np.stack([c[2] for c in crops[:n]])
    image_points = metrics.transform_preds(points, center, scale, self.size)
    return [image_points[b, :len(q.descriptions)] for b, q in enumerate(queries)]


def _adjacency(skeleton: tuple[tuple[int, int], ...]) -> np.ndarray:
  """[100, 100] 0/1. Without a skeleton the graph layers get no neighbours (rows of zeros),
  which our head handles; the official model would need at least one edge."""
  if not skeleton:
    return np.zeros((NUM_SLOTS, NUM_SLOTS), np.float32)
  return adjacency_from_skeleton(np.asarray(skeleton, np.int64), NUM_SLOTS)


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
  values = [float(v) for v in spec.split(',')]
  if len(values) != 4:
    raise ValueError(f'--bbox {spec!r}: expected x,y,w,h')
  return values


# ----------------------------------------------------------------------------- modes
def keypoints_record(points: np.ndarray, query: Query) -> list[dict]:
  return [{'index': k, 'description': d, 'x': float(p[0]), 'y': float(p[1])}
          for k, (d, p) in enumerate(zip(query.descriptions, points))]


def overlay(query: Query, points: np.ndarray, gt=None, gt_visible=None):
  from capenext_jax.visualize import draw_overlay
  return draw_overlay(query.image, points, query.skeleton, query.descriptions, gt=gt,
                      gt_visible=gt_visible)


def predict_image(args, predictor: Predictor) -> list[Path]:
  """Single-image mode: writes the JSON and (unless --no_overlay) the PNG; returns their paths."""
  image = load_rgb(args.image)
  descriptions = parse_descriptions(args.keypoints, args.keypoints_file)
  query = Query(image=image, bbox=clean_bbox(parse_bbox(args.bbox), image.shape[1],
                                             image.shape[0]),
                category=args.category, descriptions=descriptions,
                skeleton=parse_skeleton(args.skeleton, len(descriptions)))
  points = predictor([query])[0]
  stem = Path(args.image).stem
  result = {'image': str(args.image), 'width': image.shape[1], 'height': image.shape[0],
            'bbox': query.bbox.tolist(), 'category': query.category,
            'keypoints': keypoints_record(points, query),
            'skeleton': [list(e) for e in query.skeleton], 'checkpoint': str(args.checkpoint)}
  written = [Path(args.output or f'{stem}_keypoints.json')]
  written[0].write_text(json.dumps(result, indent=1) + '\n')
  if not args.no_overlay:
    written.append(Path(args.overlay or f'{stem}_overlay.png'))
    overlay(query, points).save(written[1])
  return written


def coco_queries(ann_file: str, image_root: str) -> tuple[list[Query], list[dict]]:
  """One Query per annotation of a COCO-style json (bbox optional; descriptions by the
  official renaming of each category), with the annotation dicts in the same order.

  Categories go through the annotation reader's validation: K comes from the annotations'
  keypoint arrays (the name list may be empty, as for ``face`` in the real MP-100 files).
  """
  from capenext_jax.mp100.annotations import read_categories
  coco = json.loads(Path(ann_file).read_text())
  categories = {c['id']: c for c in read_categories(coco, ann_file, require=('images',))}
  images = {im['id']: im for im in coco['images']}
  pixels: dict = {}
  queries, anns = [], []
  for ann in coco['annotations']:
    im, cat = images[ann['image_id']], categories[ann['category_id']]
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
  queries, anns = coco_queries(args.coco, args.image_root)
  results, written = [], [Path(args.output or 'predictions.json')]
  for query, ann, points in zip(queries, anns, predictor(queries)):
    flat = np.concatenate([points, np.ones((len(points), 1))], axis=1).reshape(-1)
    results.append({'image_id': ann['image_id'], 'annotation_id': ann.get('id'),
                    'category_id': ann['category_id'], 'keypoints': flat.tolist(),
                    'score': 1.0})
    if args.overlay_dir:
      written.append(Path(args.overlay_dir) / f'{ann.get("id", len(results))}.png')
      written[-1].parent.mkdir(parents=True, exist_ok=True)
      gt = np.asarray(ann.get('keypoints', []), np.float64).reshape(-1, 3)
      has_gt = len(gt) == len(points)
      overlay(query, points, gt[:, :2] if has_gt else None,
              gt[:, 2] > 0 if has_gt else None).save(written[-1])
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
  p.add_argument('--overlay', help='overlay PNG (default IMAGE_overlay.png)')
  p.add_argument('--no_overlay', action='store_true', help='single mode: skip the PNG')
  p.add_argument('--overlay_dir', help='batch mode: write one overlay per annotation here')
  p.add_argument('--batch_size', type=int, default=8)
  return p


def main(argv: Sequence[str] | None = None) -> int:
  parser = build_parser()
  args = parser.parse_args(argv)
  if (args.image is None) == (args.coco is None):
    parser.error('give either an IMAGE or --coco ANNOTATIONS.json')
  if args.image is not None and not args.category:
    parser.error('--category is required with an image')
  try:
    config = read_config(args.config) if args.config else None
    predictor = Predictor(load_model(args.checkpoint, config),
                          batch_size=1 if args.image else args.batch_size)
    written = (predict_image if args.image else predict_coco)(args, predictor)
    print('wrote ' + ', '.join(str(p) for p in written))
  except ValueError as e:
    print(f'capenext-predict: error: {e}', file=sys.stderr)
    return 2
  return 0


if __name__ == '__main__':
  sys.exit(main())

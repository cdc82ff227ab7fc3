"""Batched keypoint prediction on one's own images: the official test crop, a per-category
text cache, the model, and the points mapped back to image pixels.

    predictor = Predictor(loading.load_model('export_dir/'), batch_size=8)
    points = predictor([Query(image, bbox, 'tiger', ('left ear', 'nose'), ((0, 1),))])[0]

The image goes through the official test transform (docs/MODEL.md §5.1, §5.5, §2): bbox
(default: the whole image) cleaned as the annotation reader does -> center / scale (aspect 1,
padding 1.25) -> affine warp to the model's input size -> ImageNet normalisation -> model ->
last decoder layer's points -> back to image pixels. CLIP text embeddings are computed once per
(category, descriptions) set.
"""
from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from capenext_jax.image_ops import imagenet_normalize, warp_affine
from capenext_jax.models.capenext import NUM_SLOTS, CapeNext
from capenext_jax.models.head import adjacency_from_skeleton
from capenext_jax.mp100 import geometry
from capenext_jax.text.cache import CategoryText, build_text_cache


def clean_bbox(bbox: Sequence[float] | None, width: int, height: int) -> np.ndarray:
  """The annotation reader's box cleaning; None -> the whole image. Raises ValueError for a
  box with no area inside the image."""
  if bbox is not None and not np.all(np.isfinite(np.asarray(bbox, np.float64))):
    raise ValueError(f'bbox {list(bbox)}: every value must be a finite number')
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
    self._forward = functools.partial(_last_layer_points, graphdef, state)

  def encode_texts(self, sets: Sequence[tuple[str, tuple[str, ...]]]) -> None:
    """Encode every not yet cached (category, descriptions) set in one text-tower pass."""
    todo = [s for s in dict.fromkeys(sets) if s not in self._text]
    if not todo:
      return
    cache = build_text_cache(self.model, [CategoryText(n, d) for n, d in todo])
    for i, key in enumerate(todo):
      self._text[key] = cache.keypoint[i], cache.category[i]

  def __call__(self, queries: Sequence[Query], progress=None) -> list[np.ndarray]:
    """Keypoints [K_i, 2] in image pixels for each query, in order.

    progress: optional `progress.Progress`, told of every batch done.
    """
    self.encode_texts([(q.category, q.descriptions) for q in queries])
    out = []
    for start in range(0, len(queries), self.batch_size):
      out.extend(self._batch(queries[start:start + self.batch_size]))
      if progress is not None:
        progress.update(len(queries[start:start + self.batch_size]))
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
    image_points = geometry.transform_preds(points, center, scale, self.size)
    return [image_points[b, :len(q.descriptions)] for b, q in enumerate(queries)]


@functools.partial(jax.jit, static_argnums=0)
def _last_layer_points(graphdef: nnx.GraphDef, state: nnx.State, images, mask, adjacency,
                       keypoint_text, category_text) -> jax.Array:
  """The last decoder layer's points [B, 100, 2] in [0, 1] crop units. One jit for every
  Predictor: models of one structure (equal graphdefs, e.g. another checkpoint of the same
  sizes, or the same one loaded again) share their compiled program for each batch shape."""
  out = nnx.merge(graphdef, state)(images, mask, adjacency, keypoint_text=keypoint_text,
                                   category_text=category_text)
  return out['keypoints'][-1]


def _adjacency(skeleton: tuple[tuple[int, int], ...]) -> np.ndarray:
  """[100, 100] 0/1. Without a skeleton the graph layers get no neighbours (rows of zeros),
  which our head handles; the official model would need at least one edge."""
  if not skeleton:
    return np.zeros((NUM_SLOTS, NUM_SLOTS), np.float32)
  return adjacency_from_skeleton(np.asarray(skeleton, np.int64), NUM_SLOTS)

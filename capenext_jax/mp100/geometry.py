"""Top-down geometry in float64 numpy (docs/MODEL.md §5.5), vectorised over any leading axes.

* :func:`affine_matrix`: the 2x3 matrix image px -> output px from center / scale / rotation,
  solved from the same three point pairs as mmpose's ``get_affine_transform`` builds for
  ``cv2.getAffineTransform``.
* :func:`transform_joints`: visible joints through the matrix, invisible ones keep raw values.
* :func:`heatmap_weight`: the MSRA target weight (visibility AND the official in-bounds rule).
* :func:`clean_bbox`, :func:`bbox_to_center_scale`: the top-down box of an instance.
* :func:`crop_window`: the region of the source image any augmented view can read (for crops).
* :func:`episode_geometry`: everything per episode except pixels.
* :func:`heatmap_side`: the side of the heatmap targets of a crop size.
* :func:`transform_preds`: crop-pixel predictions back to original-image pixels (decoding).
"""
from __future__ import annotations

import math

import numpy as np

PIXEL_STD = 200.0      # mmpose's bbox scale unit
PADDING = 1.25         # context padding of the top-down bbox
# The crops' pixel normalisation (x / 255 - mean) / std, RGB: applied by the tf.data pipeline
# (warp='host') and by `image_ops.imagenet_normalize` (jax, warp='device' and the Predictor).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def clean_bbox(bbox, width, height) -> np.ndarray | None:
  """mmpose's box cleaning: ``[x, y, w, h]`` clipped to the image -> float64 ``[x1, y1, w', h']``,
  or None when no area of it lies inside the ``width`` x ``height`` image."""
  x, y, w, h = (float(v) for v in bbox)
  x1, y1 = max(0.0, x), max(0.0, y)
  x2 = min(width - 1.0, x1 + max(0.0, w - 1.0))
  y2 = min(height - 1.0, y1 + max(0.0, h - 1.0))
  if not (x2 > x1 and y2 > y1):
    return None
  return np.array([x1, y1, x2 - x1, y2 - y1])


def bbox_to_center_scale(bbox: np.ndarray, aspect_ratio: float = 1.0, padding: float = PADDING):
  """Clean ``[..., 4]`` boxes -> (center, scale) in float64, as mmpose's ``_xywh2cs``.

  The shorter side is expanded to the aspect ratio, the scale is in units of 200 px and padded.
  """
  bbox = np.asarray(bbox, np.float64)
  x, y, w, h = bbox[..., 0], bbox[..., 1], bbox[..., 2], bbox[..., 3]
  center = np.stack([x + w * 0.5, y + h * 0.5], axis=-1)
  w2 = np.where(w > aspect_ratio * h, w, h * aspect_ratio)
  h2 = np.where(w > aspect_ratio * h, w / aspect_ratio, h)
  scale = np.stack([w2 / PIXEL_STD, h2 / PIXEL_STD], axis=-1) * padding
  return center, scale


def _third_point(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  d = a - b
  return b + np.stack([-d[..., 1], d[..., 0]], axis=-1)


def affine_matrix(center, scale, rotation, output_size=(256, 256)) -> np.ndarray:
  """float64 [..., 2, 3]: source px -> output px (cv2.warpAffine's forward matrix).

  center [..., 2], scale [..., 2] (units of 200 px; only scale_x is used, as mmpose),
  rotation [...] in degrees, output_size (W, H).
  """
  center = np.asarray(center, np.float64)
  scale = np.asarray(scale, np.float64)
  rot = np.deg2rad(np.asarray(rotation, np.float64))
  w_out, h_out = float(output_size[0]), float(output_size[1])
  src_w = scale[..., 0] * PIXEL_STD
  # src_dir = R(rot) (0, -src_w/2)
  sn, cs = np.sin(rot), np.cos(rot)
  half = -0.5 * src_w
  src_dir = np.stack([-half * sn, half * cs], axis=-1)
  p0 = center
  p1 = center + src_dir
  p2 = _third_point(p0, p1)
  q0 = np.broadcast_to(np.array([w_out * 0.5, h_out * 0.5]), p0.shape)
  q1 = q0 + np.array([0.0, -0.5 * w_out])
  q2 = _third_point(q0, q1)
  src = np.stack([p0, p1, p2], axis=-2)                          # [..., 3, 2]
  dst = np.stack([q0, q1, q2], axis=-2)
  a = np.concatenate([src, np.ones(src.shape[:-1] + (1,))], axis=-1)   # [..., 3, 3]
  sol = np.linalg.solve(a, dst)                                  # [..., 3, 2]: a @ sol = dst
  return np.swapaxes(sol, -1, -2)


def apply_affine(matrix: np.ndarray, points: np.ndarray) -> np.ndarray:
  """matrix [..., 2, 3], points [..., P, 2] -> [..., P, 2]."""
  return np.einsum('...ij,...pj->...pi', matrix[..., :, :2], points) + matrix[..., None, :, 2]


def compose_affine(outer: np.ndarray, inner: np.ndarray) -> np.ndarray:
  """outer o inner for 2x3 matrices (apply inner first)."""
  o = outer[..., :, :2]
  lin = o @ inner[..., :, :2]
  trans = np.einsum('...ij,...j->...i', o, inner[..., :, 2]) + outer[..., :, 2]
  return np.concatenate([lin, trans[..., None]], axis=-1)


def transform_joints(matrix, joints, visible) -> np.ndarray:
  """Visible joints (v > 0) mapped through ``matrix``; invisible joints keep raw coordinates."""
  moved = apply_affine(np.asarray(matrix, np.float64), np.asarray(joints, np.float64))
  return np.where((np.asarray(visible) > 0)[..., None], moved, joints)


def heatmap_weight(joints, visible, image_size=256, heatmap_size=64, sigma=1.0) -> np.ndarray:
  """float32 [..., P]: mmpose MSRA target weight (``int()`` truncates toward 0)."""
  joints = np.asarray(joints, np.float64)
  stride = image_size / heatmap_size
  tmp = sigma * 3
  mu = np.trunc(joints / stride + 0.5)
  ul = np.trunc(mu - tmp)
  br = np.trunc(mu + tmp + 1)
  out = (ul[..., 0] >= heatmap_size) | (ul[..., 1] >= heatmap_size) | (br[..., 0] < 0) | (br[..., 1] < 0)
  return np.where(out, 0.0, np.asarray(visible, np.float64)).astype(np.float32)


def crop_window(center, scale, image_wh, *, max_scale_factor=1.15, max_rotation=30.0,
                output_size=256, max_crop=None):
  """The source region any augmented view of an instance can sample, and its storage scale.

  Returns (origin int64 [N, 2] (x0, y0), size int64 [N, 2] (w, h) of the window in source px,
  clipped to the image, stored size int64 [N, 2] after optional downscaling so that
  max(w, h) <= max_crop). The stored crop pixel u relates to the source pixel x by
  ``u = f * (x - x0 + 0.5) - 0.5`` with ``f = stored / size`` per axis (half-pixel-centre
  resize); f == 1 means an exact copy.
  """
  center = np.asarray(center, np.float64).reshape(-1, 2)
  side = np.asarray(scale, np.float64).reshape(-1, 2)[:, 0] * PIXEL_STD * max_scale_factor
  r = math.radians(min(abs(max_rotation), 45.0))
  half = 0.5 * side * (math.cos(r) + math.sin(r)) + 2.0
  wh = np.asarray(image_wh, np.float64).reshape(-1, 2)
  x0 = np.clip(np.floor(center - half[:, None]), 0, wh).astype(np.int64)
  x1 = np.clip(np.ceil(center + half[:, None]) + 1, 0, wh).astype(np.int64)
  x1 = np.maximum(x1, x0 + 1)
  size = x1 - x0
  return x0, size, stored_size(size, max_crop)


def stored_size(size, max_crop=None) -> np.ndarray:
  """int64 [N, 2]: window sizes [N, 2] scaled down (aspect kept) so max(w, h) <= max_crop."""
  size = np.asarray(size, np.int64)
  if max_crop is None:
    return size.copy()
  f = np.minimum(1.0, max_crop / np.max(size, axis=1))
  return np.minimum(np.maximum(1, np.round(size * f[:, None])), max_crop).astype(np.int64)


def crop_matrix(origin, size, stored) -> np.ndarray:
  """float64 [N, 2, 3]: source px -> stored-crop px (see :func:`crop_window`)."""
  origin = np.asarray(origin, np.float64)
  f = np.asarray(stored, np.float64) / np.asarray(size, np.float64)
  m = np.zeros(origin.shape[:-1] + (2, 3))
  m[..., 0, 0] = f[..., 0]
  m[..., 1, 1] = f[..., 1]
  m[..., :, 2] = f * (0.5 - origin) - 0.5
  return m


def episode_geometry(dataset, episodes, s_factor=None, rotation=None, image_size=256,
                     heatmap_size=64, sigma=1.0) -> dict:
  """Per episode: the query matrix and joints, target weights and masks (float64 math).

  episodes int64 [E, k+1] db indices; s_factor / rotation float64 [E, k+1] (None: no
  augmentation). Returns float arrays: ``query_matrix`` [E, 2, 3] (source image px -> output
  px), ``query_joints`` [E, 100, 2], ``query_weight`` [E, 100], ``support_mask`` [E, 100]
  (shot 0), ``support_masks`` [E, k, 100], ``eval_mask`` bool [E, 100], ``bbox_thr`` [E],
  ``category_index`` int32 [E].
  """
  episodes = np.asarray(episodes, np.int64)
  e, n = episodes.shape
  if s_factor is None:
    s_factor = np.ones((e, n))
  if rotation is None:
    rotation = np.zeros((e, n))
  center = dataset.center[episodes]
  scale = dataset.scale[episodes] * np.asarray(s_factor, np.float64)[..., None]
  mats = affine_matrix(center, scale, rotation, (image_size, image_size))       # [E, n, 2, 3]
  joints = dataset.joints[episodes]
  vis = dataset.visible[episodes]
  moved = transform_joints(mats, joints, vis)
  weight = heatmap_weight(moved, vis, image_size, heatmap_size, sigma)
  q = n - 1
  return dict(
      query_matrix=mats[:, q],
      query_joints=moved[:, q],
      query_weight=weight[:, q],
      support_mask=weight[:, 0],
      support_masks=weight[:, :q],
      eval_mask=np.logical_and.reduce(vis > 0, axis=1),
      bbox_thr=dataset.bbox_thr[episodes[:, q]],
      category_index=dataset.category_index[episodes[:, q]],
  )


def heatmap_side(image_size: int, configured: int = 0) -> int:
  """Side of the MSRA heatmap targets: `configured` (a run config's `data.heatmap_size`; the
  official configs use 64 at every input size, so ViT-B/16's 224 px crops have stride 3.5),
  or a quarter of the crop side when it is 0."""
  return configured or image_size // 4


def transform_preds(coords_crop, center, scale, image_size: int = 256) -> np.ndarray:
  """Map crop-pixel predictions back to the original image (docs/MODEL.md §2, non-UDP).

  coords_crop: [N, K, 2] pixels in the `image_size` crop (model output x image_size);
  center: [N, 2] bbox centre in image pixels; scale: [N, 2] bbox (w, h) / 200.
  Returns float32 [N, K, 2]: `x * s / image_size + c - s / 2` with `s = scale * 200`.
  Mirrors the official arithmetic: `s` is formed in float32 (the float32 scale array times
  200), the affine map runs in float64 and the result lands in a float32 buffer (`all_preds`).
  """
  coords = np.asarray(coords_crop, dtype=np.float64)
  center = np.asarray(center, dtype=np.float32).astype(np.float64)
  size = (np.asarray(scale, dtype=np.float32) * np.float32(200.0)).astype(np.float64)
  n = len(coords)
  if coords.ndim != 3 or coords.shape[-1] != 2 or center.shape != (n, 2) or size.shape != (n, 2):
    raise ValueError(f'coords [N, K, 2], center and scale [N, 2] expected, got '
                     f'{coords.shape}, {center.shape}, {size.shape}')
  out = coords * (size / image_size)[:, None, :] + center[:, None, :] - (size * 0.5)[:, None, :]
  return out.astype(np.float32)

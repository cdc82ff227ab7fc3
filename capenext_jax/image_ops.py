"""Image-space operations in jax (device side of the data pipeline).

`gaussian_heatmaps`: the MSRA heatmap targets of mmpose's `TopDownGenerateTargetFewShot`
(non-UDP, docs/MODEL.md §5.5 step 5).
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from capenext_jax.mp100.geometry import IMAGENET_MEAN, IMAGENET_STD


def _round_half_trunc(t: jax.Array) -> jax.Array:
  """`int(t + 0.5)` (truncation toward 0) without float32 rounding of `t + 0.5`.

  t >= -0.5: floor(t) + [frac(t) >= 0.5]; t < -0.5: ceil(t) + [ceil(t) - t < 0.5]. Both
  differences are exact in float, so the result equals the float64 reference.
  """
  lo, hi = jnp.floor(t), jnp.ceil(t)
  return jnp.where(t >= -0.5, lo + (t - lo >= 0.5), hi + (hi - t < 0.5))


def gaussian_heatmaps(joints: jax.Array, weight: jax.Array, heatmap_size: int = 64,
                      stride: float = 4.0, sigma: float = 1.0,
                      rows: np.ndarray | None = None,
                      cols: np.ndarray | None = None) -> tuple[jax.Array, jax.Array]:
  """MSRA Gaussian targets, optionally evaluated only at some pixel rows / columns.

  For each joint: mu = int(x / stride + 0.5) per axis; the unnormalised Gaussian
  exp(-(dx^2 + dy^2) / (2 sigma^2)) (peak 1) is pasted on the (2*3sigma+1)^2 patch around mu,
  clipped to the map. A joint whose patch lies fully outside the map gets weight 0, and only
  joints with weight > 0.5 are drawn.

  Args:
    joints: [..., N, 2] (x, y) in input-image pixels.
    weight: [..., N] visibility (the MSRA `target_weight` before the in-bounds rule).
    heatmap_size: side of the square heatmap.
    stride: input pixels per heatmap pixel (image_size / heatmap_size).
    sigma: Gaussian sigma in heatmap pixels.
    rows, cols: static integer pixel indices to evaluate (default: all heatmap_size).
  Returns:
    heatmaps [..., N, len(rows), len(cols)] float32 and target_weight [..., N] float32.
  """
  rows = np.arange(heatmap_size) if rows is None else np.asarray(rows)
  cols = np.arange(heatmap_size) if cols is None else np.asarray(cols)
  tmp = sigma * 3
  size = 2 * tmp + 1
  centre = float(size // 2)   # patch index of the peak, as mmpose's `size // 2`
  mu = _round_half_trunc(joints.astype(jnp.float32) / jnp.float32(stride))      # [..., N, 2]
  ul = jnp.trunc(mu - tmp)
  br = jnp.trunc(mu + tmp + 1)
  outside = (ul >= heatmap_size).any(-1) | (br < 0).any(-1)
  target_weight = jnp.where(outside, 0.0, weight.astype(jnp.float32))

  def axis_offsets(pix, a):
    """Patch-relative offsets from the peak [..., N, P] and whether pix lies in the patch."""
    p = jnp.asarray(pix, jnp.float32)
    lo, hi = ul[..., a, None], br[..., a, None]
    return p - lo - centre, (p >= lo) & (p < hi) & (p - lo < math.ceil(size))

  dy, in_y = axis_offsets(rows, 1)
  dx, in_x = axis_offsets(cols, 0)
  g = jnp.exp(-(dy[..., :, None] ** 2 + dx[..., None, :] ** 2) / jnp.float32(2 * sigma ** 2))
  draw = (target_weight > 0.5)[..., None, None] & in_y[..., :, None] & in_x[..., None, :]
  return jnp.where(draw, g, 0.0), target_weight


# ----------------------------------------------------------------------------------------------
# Affine warp (cv2.warpAffine, INTER_LINEAR, BORDER_CONSTANT 0) and ImageNet normalisation.

def imagenet_normalize(images: jax.Array) -> jax.Array:
  """RGB pixels in [0, 255] (uint8 or float) -> float32 ``(x / 255 - mean) / std``."""
  x = images.astype(jnp.float32) / 255.0
  return (x - jnp.asarray(IMAGENET_MEAN, jnp.float32)) / jnp.asarray(IMAGENET_STD, jnp.float32)


def invert_affine(matrices: jax.Array) -> jax.Array:
  """Inverse of 2x3 affine matrices [..., 2, 3]."""
  a, b, c = matrices[..., 0, 0], matrices[..., 0, 1], matrices[..., 0, 2]
  d, e, f = matrices[..., 1, 0], matrices[..., 1, 1], matrices[..., 1, 2]
  det = a * e - b * d
  ia, ib, id_, ie = e / det, -b / det, -d / det, a / det
  ic = -(ia * c + ib * f)
  if_ = -(id_ * c + ie * f)
  return jnp.stack([jnp.stack([ia, ib, ic], -1), jnp.stack([id_, ie, if_], -1)], -2)


def warp_affine(images: jax.Array, matrices: jax.Array, out_size=256, *,
                inverse_map: bool = False) -> jax.Array:
  """Batched ``cv2.warpAffine(img, M, out_size, flags=INTER_LINEAR, borderValue=0)``.

  Each output pixel (x, y) samples the source at ``M^-1 (x, y, 1)`` (pixel centres at integer
  coordinates) with bilinear weights; neighbours outside the source count as 0. The weights are
  exact float32 (cv2 quantises the sub-pixel offset to 1/32 px, so values can differ from cv2 by
  about a grey level on strong edges).

  Args:
    images: [B, H, W, C] uint8 or float.
    matrices: [B, 2, 3] forward matrices source px -> output px (or output -> source with
      ``inverse_map=True``, like cv2.WARP_INVERSE_MAP).
    out_size: int or (width, height).
  Returns:
    float32 [B, out_h, out_w, C] (not rounded: cv2 would round to uint8 for uint8 input).
  """
  if isinstance(out_size, int):
    out_w = out_h = out_size
  else:
    out_w, out_h = int(out_size[0]), int(out_size[1])
  b, h, w, c = images.shape
  m = matrices.astype(jnp.float32)
  inv = m if inverse_map else invert_affine(m)
  xs = jnp.arange(out_w, dtype=jnp.float32)
  ys = jnp.arange(out_h, dtype=jnp.float32)
  sx = (inv[:, 0, 0, None, None] * xs[None, None, :] + inv[:, 0, 1, None, None] * ys[None, :, None]
        + inv[:, 0, 2, None, None])                                    # [B, Ho, Wo]
  sy = (inv[:, 1, 0, None, None] * xs[None, None, :] + inv[:, 1, 1, None, None] * ys[None, :, None]
        + inv[:, 1, 2, None, None])
  x0 = jnp.floor(sx)
  y0 = jnp.floor(sy)
  fx = sx - x0
  fy = sy - y0
  x0i = x0.astype(jnp.int32)
  y0i = y0.astype(jnp.int32)
  flat = images.reshape(b, h * w, c).astype(jnp.float32)

  def tap(yi, xi):
    ok = (xi >= 0) & (xi < w) & (yi >= 0) & (yi < h)
    idx = jnp.clip(yi, 0, h - 1) * w + jnp.clip(xi, 0, w - 1)
    vals = jnp.take_along_axis(flat, idx.reshape(b, -1, 1), axis=1).reshape(b, out_h, out_w, c)
    return vals * ok[..., None].astype(jnp.float32)

  top = tap(y0i, x0i) * (1 - fx)[..., None] + tap(y0i, x0i + 1) * fx[..., None]
  bot = tap(y0i + 1, x0i) * (1 - fx)[..., None] + tap(y0i + 1, x0i + 1) * fx[..., None]
  return top * (1 - fy)[..., None] + bot * fy[..., None]


def warp_and_normalize(crops: jax.Array, matrices: jax.Array, out_size=256) -> jax.Array:
  """Device-side query image: warp the crop with its 2x3 matrix, round to uint8 levels as
  cv2 does for uint8 images, then ImageNet-normalise (float32 [B, S, S, 3])."""
  warped = jnp.clip(jnp.round(warp_affine(crops, matrices, out_size)), 0.0, 255.0)
  return imagenet_normalize(warped)

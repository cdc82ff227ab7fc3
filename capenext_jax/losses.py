"""CapeNext training losses (official `PoseHead.get_loss` / `heatmap_loss`, docs/MODEL.md §3).

A keypoint counts when it is valid in the query and in the support: w = query_weight * mask_s.
Each sample is normalised by its number of counted keypoints (at least 1).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from capenext_jax.image_ops import gaussian_heatmaps
from capenext_jax.mp100.geometry import heatmap_side

HEATMAP_LOSS_WEIGHT = 2.0
PCK_THRESHOLD = 0.2


def bilinear_matrix(in_size: int, out_size: int) -> np.ndarray:
  """[out, in] matrix of torch's bilinear resize (align_corners=False, no antialias).

  Source coordinate (o + 0.5) * in / out - 0.5, clamped at 0; each output mixes the two
  nearest inputs. Downsampling therefore *samples* (e.g. 64 -> 16 averages rows 4i+1, 4i+2).
  """
  src = np.maximum((np.arange(out_size) + 0.5) * (in_size / out_size) - 0.5, 0.0)
  i0 = np.floor(src).astype(np.int64)
  i1 = np.minimum(i0 + 1, in_size - 1)
  frac = src - i0
  m = np.zeros((out_size, in_size), np.float64)
  np.add.at(m, (np.arange(out_size), i0), 1.0 - frac)
  np.add.at(m, (np.arange(out_size), i1), frac)
  return m.astype(np.float32)


def _resize(maps: jax.Array, ry: np.ndarray, rx: np.ndarray) -> jax.Array:
  """[..., H, W] -> [..., h, w] with the separable matrices ry [h, H], rx [w, W]."""
  return jnp.einsum('yh,...hw,xw->...yx', ry, maps, rx, precision=jax.lax.Precision.HIGHEST)


def heatmap_targets(shape_hw: tuple[int, int], query_joints: jax.Array, query_weight: jax.Array,
                    image_size: int, heatmap_size: int,
                    target_heatmaps: jax.Array | None = None) -> jax.Array:
  """Loss targets [B, N, h, w]: the heatmap_size^2 MSRA targets resized to h x w, each
  divided by its own max (+1e-10).

  Without `target_heatmaps` the MSRA maps are generated, but only at the pixels the resize
  reads (same values as generating the full map and resizing it).
  """
  h, w = shape_hw
  ry, rx = bilinear_matrix(heatmap_size, h), bilinear_matrix(heatmap_size, w)
  if target_heatmaps is None:
    rows, cols = np.nonzero(ry.any(0))[0], np.nonzero(rx.any(0))[0]
    maps, _ = gaussian_heatmaps(query_joints, query_weight, heatmap_size,
                                stride=image_size / heatmap_size, sigma=1.0, rows=rows,
                                cols=cols)
    small = _resize(maps, ry[:, rows], rx[:, cols])
  else:
    small = _resize(target_heatmaps.astype(jnp.float32), ry, rx)
  return small / (small.max(axis=(-2, -1), keepdims=True) + 1e-10)


def _per_sample_l1(pred: jax.Array, target: jax.Array, w: jax.Array,
                   normaliser: jax.Array) -> jax.Array:
  """Mean over the batch of sum_k w |pred - target|_1 / normaliser. pred/target [B, N, 2]."""
  return ((jnp.abs(pred - target).sum(-1) * w).sum(-1) / normaliser).mean()


def pck_accuracy(pred: jax.Array, target_px: jax.Array, w: jax.Array,
                 image_size: int) -> jax.Array:
  """mmpose `keypoint_pck_accuracy` at 0.2 of the crop size: per keypoint slot, the fraction
  of counted samples within the threshold, averaged over slots with a counted sample (0 if
  there is none). pred [B, N, 2] normalised, target_px [B, N, 2] crop px, w [B, N]."""
  dist = jnp.linalg.norm((pred * image_size - target_px) / image_size, axis=-1)
  counted = w > 0
  n = counted.sum(0)
  hits = (counted & (dist < PCK_THRESHOLD)).sum(0)
  has = n > 0
  acc = jnp.where(has, hits / jnp.maximum(n, 1), 0.0)
  return jnp.where(has.any(), acc.sum() / jnp.maximum(has.sum(), 1), 0.0)


def capenext_losses(outputs: dict, query_joints: jax.Array, query_weight: jax.Array,
                    support_mask: jax.Array, image_size: int = 256, heatmap_size: int = 64,
                    target_heatmaps: jax.Array | None = None) -> dict[str, jax.Array]:
  """Official CapeNext losses.

  Args:
    outputs: the model / head dict with keypoints [L, B, N, 2], proposals [B, N, 2] (global
      soft-argmax) and similarity [B, N, h, w] (logits).
    query_joints: [B, N, 2] targets in crop pixels.
    query_weight: [B, N] target_weight_q; support_mask: [B, N] mask_s.
    image_size: crop side; heatmap_size: MSRA target side (stride image_size / heatmap_size).
    target_heatmaps: optional [B, N, heatmap_size, heatmap_size] MSRA targets; generated from
      the joints and weights when omitted.
  Returns:
    heatmap_loss (already x2), proposal_loss, l1_loss_layer{l}, loss (the sum of all of
    them) and acc_pose (PCK@0.2 of the last layer; not a loss).
  """
  keypoints, sim = outputs['keypoints'], outputs['similarity']
  w = query_weight.astype(jnp.float32) * support_mask.astype(jnp.float32)
  normaliser = w.sum(-1)
  normaliser = jnp.where(normaliser == 0, 1.0, normaliser)
  target = query_joints / image_size

  heat = heatmap_targets(sim.shape[-2:], query_joints, query_weight, image_size, heatmap_size,
                         target_heatmaps)
  sq = ((jax.nn.sigmoid(sim) - heat) ** 2).mean(axis=(-2, -1))          # [B, N]
  losses = {
      'heatmap_loss': HEATMAP_LOSS_WEIGHT * ((sq * w).sum(-1) / normaliser).mean(),
      'proposal_loss': _per_sample_l1(outputs['proposals'], target, w, normaliser),
  }
  for l in range(keypoints.shape[0]):
    losses[f'l1_loss_layer{l}'] = _per_sample_l1(keypoints[l], target, w, normaliser)
  losses['loss'] = sum(losses.values())
  losses['acc_pose'] = pck_accuracy(keypoints[-1], query_joints, w, image_size)
  return losses


def batch_loss_fn(image_size: int, heatmap_size: int = 0):
  """The train step's `loss_fn(outputs, batch)`: `capenext_losses` of a pipeline batch
  (`query_joints`, `query_weight`, `support_mask`), targets of `heatmap_side`."""

  def loss_fn(outputs: dict, batch) -> dict[str, jax.Array]:
    return capenext_losses(outputs, batch['query_joints'], batch['query_weight'],
                           batch['support_mask'], image_size=image_size,
                           heatmap_size=heatmap_side(image_size, heatmap_size))

  return loss_fn

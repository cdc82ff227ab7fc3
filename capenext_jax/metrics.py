"""Evaluation metrics with the official per-instance definitions (mmpose 0.29 `top_down_eval`).

Numpy only. The official test (`_report_metric` of the MP-100 test dataset, docs/MODEL.md §6)
calls mmpose once per query instance and averages the per-instance numbers over all pairs:

* `dist_k = ||pred_k - gt_k|| / bbox_thr` over the valid keypoints k of the instance (`mask`);
* PCK@t = fraction of valid keypoints with `dist < t` (strict), 0 when none is valid;
* NME = mean `dist` over valid keypoints, 0 when none is valid;
* AUC = sum over t in {0, 0.05, ..., 0.95} of PCK@t / 20 (so a perfect prediction scores 0.95);
* EPE = mean pixel distance over valid keypoints, 0 when none is valid (mmpose divides by
  `max(1, n)`); such instances count in the mean like every other metric.

Precision: mmpose stores the per-keypoint distances in a float32 buffer and compares them with
the threshold cast to float32 (numpy's rule for a python float against a float32 array). We do
the same, so PCK and AUC reproduce the official numbers bit for bit, including distances that
round onto a threshold. Differences, norms and means are float64; mmpose sums the float32
distances in float32, so our NME and EPE differ from its values by ~1e-7 relative.
"""
from __future__ import annotations

import numpy as np

PCK_THRESHOLDS = (0.05, 0.1, 0.15, 0.2, 0.25)
AUC_STEPS = 20
# Key names follow the official report (`'PCK@' + str(thr)`).
METRIC_KEYS = tuple(f'PCK@{t}' for t in PCK_THRESHOLDS) + ('mPCK', 'NME', 'AUC', 'EPE')


# ----------------------------------------------------------------------------- distances
def _distances(pred: np.ndarray, gt: np.ndarray, norm: np.ndarray) -> np.ndarray:
  """Normalised distances rounded through float32, as mmpose's buffer holds them.

  pred, gt: [N, K, 2]; norm: [N, 2] per-axis normaliser (> 0). Returns float32 [N, K].
  The per-axis division comes before the norm, in the same order as mmpose.
  """
  d = (pred.astype(np.float64) - gt.astype(np.float64)) / norm[:, None, :]
  return np.sqrt(np.sum(d * d, axis=-1)).astype(np.float32)


def _hits(dist32: np.ndarray, mask: np.ndarray, thr: float) -> np.ndarray:
  """bool [N, K]: valid and strictly below `thr` (compared in float32, like mmpose)."""
  return mask & (dist32 < np.float32(thr))


def _instance_fraction(hits: np.ndarray, num_valid: np.ndarray) -> np.ndarray:
  """Per-row fraction of hits among valid keypoints; 0 for a row with none. [N]"""
  return np.where(num_valid > 0, hits.sum(axis=1) / np.maximum(num_valid, 1), 0.0)


def _instance_mean(dist32: np.ndarray, mask: np.ndarray, num_valid: np.ndarray) -> np.ndarray:
  """Per-row mean distance over valid keypoints, sum / max(1, n) as mmpose. [N]"""
  total = np.where(mask, dist32.astype(np.float64), 0.0).sum(axis=1)
  return total / np.maximum(num_valid, 1)


# ----------------------------------------------------------------------------- validation
def _check_inputs(pred, gt, mask, bbox_thr):
  """Arrays of pred, gt [N, K, 2], mask bool [N, K], bbox_thr float64 [N], or ValueError."""
  pred = np.asarray(pred)
  gt = np.asarray(gt)
  mask = np.asarray(mask)
  bbox_thr = np.asarray(bbox_thr, dtype=np.float64)
  if pred.ndim != 3 or pred.shape[-1] != 2 or pred.shape[0] == 0:
    raise ValueError(f'pred must be [N>0, K, 2], got {pred.shape}')
  if gt.shape != pred.shape:
    raise ValueError(f'gt shape {gt.shape} != pred shape {pred.shape}')
  if mask.shape != pred.shape[:2] or mask.dtype != np.bool_:
    raise ValueError(f'mask must be bool {pred.shape[:2]}, got {mask.dtype} {mask.shape}')
  if bbox_thr.shape != pred.shape[:1]:
    raise ValueError(f'bbox_thr must be [{pred.shape[0]}], got {bbox_thr.shape}')
  # mmpose masks out an instance whose normaliser is 0 and then overwrites it in place with 1e6,
  # so the official result for such a box depends on call order; no cleaned MP-100 box has one.
  bad = np.flatnonzero(~(np.isfinite(bbox_thr) & (bbox_thr > 0)))
  if bad.size:
    raise ValueError(f'bbox_thr must be finite and > 0; pair {bad[0]} has {bbox_thr[bad[0]]}')
  for name, arr in (('pred', pred), ('gt', gt)):
    bad = np.argwhere(mask & ~np.isfinite(arr).all(axis=-1))
    if bad.size:
      raise ValueError(f'{name} is not finite at pair {bad[0, 0]}, keypoint {bad[0, 1]}')
  return pred, gt, mask, bbox_thr


# ----------------------------------------------------------------------------- public API
def per_instance_metrics(pred, gt, mask, bbox_thr) -> dict[str, np.ndarray]:
  """Official per-instance metrics of each pair.

  pred, gt: [N, K, 2] original-image pixels; mask: bool [N, K] evaluation mask (query and every
  support visible); bbox_thr: [N] max(w, h) of the query's cleaned bbox.
  Returns {'PCK@0.05', ..., 'PCK@0.25', 'NME', 'AUC', 'EPE': float64 [N], 'num_valid': int [N]}.
  """
  pred, gt, mask, bbox_thr = _check_inputs(pred, gt, mask, bbox_thr)
  num_valid = mask.sum(axis=1)
  dist = _distances(pred, gt, np.repeat(bbox_thr[:, None], 2, axis=1))
  out = {f'PCK@{t}': _instance_fraction(_hits(dist, mask, t), num_valid) for t in PCK_THRESHOLDS}
  auc = np.zeros(len(pred))
  for i in range(AUC_STEPS):  # accumulated step by step, as keypoint_auc does
    auc += (1.0 / AUC_STEPS) * _instance_fraction(_hits(dist, mask, i / AUC_STEPS), num_valid)
  out['AUC'] = auc
  out['NME'] = _instance_mean(dist, mask, num_valid)
  pixel_dist = _distances(pred, gt, np.ones((len(pred), 2)))
  out['EPE'] = _instance_mean(pixel_dist, mask, num_valid)
  out['num_valid'] = num_valid
  return out


def _summarise(per_instance: dict[str, np.ndarray], rows: np.ndarray) -> dict:
  """Unweighted means over the selected pairs (`rows`, bool [N]) plus counts."""
  means = {f'PCK@{t}': float(np.mean(per_instance[f'PCK@{t}'][rows])) for t in PCK_THRESHOLDS}
  summary = {'num_pairs': int(rows.sum()),
             'num_empty_pairs': int((per_instance['num_valid'][rows] == 0).sum())}
  summary.update(means)
  summary['mPCK'] = sum(means.values()) / len(PCK_THRESHOLDS)
  for key in ('NME', 'AUC', 'EPE'):
    summary[key] = float(np.mean(per_instance[key][rows]))
  return summary


def score_pairs(pred, gt, mask, bbox_thr, category_ids=None) -> dict:
  """Score N evaluation pairs the way the official test does.

  pred, gt: [N, K, 2] original-image pixels; mask: bool [N, K]; bbox_thr: [N];
  category_ids: int [N] or None.
  Returns {'num_pairs', 'num_empty_pairs', *METRIC_KEYS} averaged over all pairs and, when
  category_ids is given, 'per_category': {category_id: same dict over that category's pairs}
  in increasing id order. Metrics are fractions (PCK 0.5 = 50 %), EPE in pixels.
  """
  per_instance = per_instance_metrics(pred, gt, mask, bbox_thr)
  scores = _summarise(per_instance, np.ones(len(per_instance['num_valid']), dtype=bool))
  if category_ids is not None:
    category_ids = np.asarray(category_ids)
    if category_ids.shape != (scores['num_pairs'],) or category_ids.dtype.kind not in 'iu':
      raise ValueError(f'category_ids must be int [{scores["num_pairs"]}], '
                       f'got {category_ids.dtype} {category_ids.shape}')
    scores['per_category'] = {int(c): _summarise(per_instance, category_ids == c)
                              for c in np.unique(category_ids)}
  return scores


def keypoint_pck_accuracy(pred, gt, mask, thr: float, normalize):
  """mmpose's `keypoint_pck_accuracy` (the training-time `acc_pose`).

  pred, gt: [N, K, 2]; mask: bool [N, K]; normalize: [N, 2] per-axis normaliser (> 0).
  Unlike the per-instance test metrics this pools the batch per keypoint slot: each slot's
  accuracy is the fraction of its valid samples with distance < thr (-1 when it has none), and
  the average is over the slots with at least one valid sample (0 when there are none).
  Returns (acc float64 [K], avg_acc float, cnt int = number of slots averaged).
  """
  pred, gt = np.asarray(pred), np.asarray(gt)
  normalize = np.asarray(normalize, dtype=np.float64)
  mask = np.asarray(mask, dtype=bool)
  if pred.ndim != 3 or gt.shape != pred.shape or mask.shape != pred.shape[:2]:
    raise ValueError(f'pred, gt [N, K, 2] and mask [N, K] expected, got '
                     f'{pred.shape}, {gt.shape}, {mask.shape}')
  if normalize.shape != (len(pred), 2) or not (normalize > 0).all():
    raise ValueError(f'normalize must be positive [{len(pred)}, 2], got {normalize.shape}')
  hits = _hits(_distances(pred, gt, normalize), mask, thr)
  num_valid = mask.sum(axis=0)
  acc = np.where(num_valid > 0, hits.sum(axis=0) / np.maximum(num_valid, 1), -1.0)
  cnt = int((num_valid > 0).sum())
  avg_acc = float(acc[num_valid > 0].mean()) if cnt else 0.0
  return acc, avg_acc, cnt

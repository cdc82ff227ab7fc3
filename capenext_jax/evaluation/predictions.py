"""Predictions files for `--score_predictions`: write, read, align with the official pairs, score.

Format (UTF-8 JSON, one pair per line for readability; any valid JSON layout is accepted):

    {"format": "capenext-predictions", "version": 1,
     "coordinates": "original_image_pixels",
     "pairs": [
      {"support_ann_ids": [900100000000000123], "query_ann_id": 900100000000004567,
       "category_id": 3, "keypoints": [[12.5, 40.25], [80.0, 33.75], ...]},
      ...]}

* `support_ann_ids` (non-empty list) and `query_ann_id` are the MP-100 annotation ids as JSON
  integers. They exceed 2**53, so they are kept as Python ints end to end: written exactly by
  `json` and parsed exactly (a float such as `9.001e17` is rejected, never rounded).
* `keypoints` lists the predicted (x, y) of the category's K keypoints (slots 0..K-1, not the
  100 padded slots) in original-image pixels, i.e. after `geometry.transform_preds`.
* `category_id` is optional; when present it must match the pair's category.
* Pairs may come in any order. Scoring matches them to the official pairs by the key
  (support ids, query id); a key that occurs several times among the official pairs (the episode
  sampler can repeat a pair) is matched occurrence by occurrence, in file order.
"""
from __future__ import annotations

import collections
import dataclasses
import json
import math
from pathlib import Path
from typing import Sequence

import numpy as np

from capenext_jax import metrics
from capenext_jax.atomic import new_file

FORMAT = 'capenext-predictions'
VERSION = 1
COORDINATES = 'original_image_pixels'
_PAIR_FIELDS = {'support_ann_ids', 'query_ann_id', 'keypoints', 'category_id'}


@dataclasses.dataclass(frozen=True)
class PredictionRecord:
  """One predicted pair. keypoints: float64 [K, 2] original-image (x, y)."""
  support_ann_ids: tuple[int, ...]
  query_ann_id: int
  keypoints: np.ndarray
  category_id: int | None = None

  @property
  def key(self) -> tuple[tuple[int, ...], int]:
    return tuple(self.support_ann_ids), self.query_ann_id


@dataclasses.dataclass(frozen=True)
class EvalPair:
  """One official evaluation pair with what scoring needs (docs/MODEL.md §6.1).

  gt_keypoints: [K, 2] query keypoints in original-image pixels (K = the category's count);
  mask: bool [K], query and every support visible (v > 0); bbox_thr: max(w, h) of the query's
  cleaned bbox (keep float64: the official value is a Python float).
  """
  support_ann_ids: tuple[int, ...]
  query_ann_id: int
  category_id: int
  gt_keypoints: np.ndarray
  mask: np.ndarray
  bbox_thr: float

  @property
  def key(self) -> tuple[tuple[int, ...], int]:
    return tuple(self.support_ann_ids), self.query_ann_id


# ----------------------------------------------------------------------------- writing
def _exact_int(value, what: str) -> int:
  """An id as a Python int; floats are refused because they may already have lost digits."""
  if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
    raise ValueError(f'{what} must be an integer, got {type(value).__name__} {value!r}')
  return int(value)


def _pair_json(i: int, rec: PredictionRecord) -> dict:
  kpts = np.asarray(rec.keypoints, dtype=np.float64)
  if kpts.ndim != 2 or kpts.shape[1] != 2 or len(kpts) == 0 or not np.isfinite(kpts).all():
    raise ValueError(f'pair {i}: keypoints must be finite [K>0, 2], got {kpts.shape}')
  out = {'support_ann_ids': [_exact_int(s, f'pair {i}: support_ann_ids')
                             for s in rec.support_ann_ids],
         'query_ann_id': _exact_int(rec.query_ann_id, f'pair {i}: query_ann_id'),
         'keypoints': kpts.tolist()}
  if not out['support_ann_ids']:
    raise ValueError(f'pair {i}: support_ann_ids is empty')
  if rec.category_id is not None:
    out['category_id'] = _exact_int(rec.category_id, f'pair {i}: category_id')
  return out


def write_predictions(path, records: Sequence[PredictionRecord]) -> None:
  """Write `records` (in evaluation order) to `path` in the format above."""
  lines = [json.dumps(_pair_json(i, r), allow_nan=False) for i, r in enumerate(records)]
  header = json.dumps({'format': FORMAT, 'version': VERSION, 'coordinates': COORDINATES})
  with new_file(Path(path)) as tmp:   # whole or absent
    tmp.write_text(header[:-1] + ', "pairs": [\n' + ',\n'.join(lines) + '\n]}\n',
                   encoding='utf-8')


# ----------------------------------------------------------------------------- reading
def _read_id(pair: dict, field: str, where: str) -> int:
  value = pair[field]
  if type(value) is not int:  # excludes bool and floats such as 9.001e17
    raise ValueError(f'{where}: field {field!r} must be a JSON integer, got {value!r}')
  return value


def _read_keypoints(value, where: str) -> np.ndarray:
  ok = isinstance(value, list) and len(value) > 0 and all(
      isinstance(p, list) and len(p) == 2 and all(
          type(v) in (int, float) and math.isfinite(v) for v in p) for p in value)
  if not ok:
    raise ValueError(f'{where}: field \'keypoints\' must be a non-empty list of [x, y] finite '
                     f'numbers')
  return np.asarray(value, dtype=np.float64)


def _read_pair(i: int, pair, path) -> PredictionRecord:
  where = f'{path}: pair {i}'
  if not isinstance(pair, dict):
    raise ValueError(f'{where}: must be an object, got {type(pair).__name__}')
  missing = {'support_ann_ids', 'query_ann_id', 'keypoints'} - pair.keys()
  unknown = pair.keys() - _PAIR_FIELDS
  if missing or unknown:
    raise ValueError(f'{where}: missing fields {sorted(missing)}, unknown fields {sorted(unknown)}')
  supports = pair['support_ann_ids']
  if not isinstance(supports, list) or not supports or any(type(s) is not int for s in supports):
    raise ValueError(f'{where}: field \'support_ann_ids\' must be a non-empty list of JSON '
                     f'integers, got {supports!r}')
  category = pair.get('category_id')
  return PredictionRecord(
      support_ann_ids=tuple(supports), query_ann_id=_read_id(pair, 'query_ann_id', where),
      keypoints=_read_keypoints(pair['keypoints'], where),
      category_id=None if category is None else _read_id(pair, 'category_id', where))


def read_predictions(path) -> list[PredictionRecord]:
  """Parse and validate a predictions file; errors name the file, the pair index and field."""
  with open(path, encoding='utf-8') as f:
    try:
      data = json.load(f)
    except json.JSONDecodeError as e:
      raise ValueError(f'{path}: not valid JSON ({e})') from e
  if not isinstance(data, dict) or data.get('format') != FORMAT:
    raise ValueError(f'{path}: not a {FORMAT!r} file (field \'format\')')
  if data.get('version') != VERSION or data.get('coordinates') != COORDINATES:
    raise ValueError(f'{path}: expected version {VERSION} and coordinates {COORDINATES!r}, got '
                     f'{data.get("version")!r} and {data.get("coordinates")!r}')
  if not isinstance(data.get('pairs'), list):
    raise ValueError(f'{path}: field \'pairs\' must be a list')
  return [_read_pair(i, p, path) for i, p in enumerate(data['pairs'])]


# ----------------------------------------------------------------------------- scoring
def _describe(key) -> str:
  return f'support_ann_ids={[int(s) for s in key[0]]}, query_ann_id={int(key[1])}'


def align_predictions(records: Sequence[PredictionRecord], pairs: Sequence[EvalPair]):
  """The prediction of each official pair, in `pairs` order. list[np.ndarray [K, 2]]

  Raises ValueError naming the pair that has no prediction, the prediction that matches no
  pair, or a prediction whose keypoint count or category disagrees with its pair.
  """
  queues = collections.defaultdict(collections.deque)
  for j, rec in enumerate(records):
    queues[rec.key].append(j)
  aligned = []
  for i, pair in enumerate(pairs):
    if not queues[pair.key]:
      raise ValueError(f'evaluation pair {i} ({_describe(pair.key)}) has no prediction')
    j = queues[pair.key].popleft()
    rec, k = records[j], len(pair.gt_keypoints)
    if len(rec.keypoints) != k:
      raise ValueError(f'prediction {j} ({_describe(rec.key)}) has {len(rec.keypoints)} '
                       f'keypoints, evaluation pair {i} expects {k}')
    if rec.category_id is not None and rec.category_id != pair.category_id:
      raise ValueError(f'prediction {j} ({_describe(rec.key)}) has category_id '
                       f'{rec.category_id}, evaluation pair {i} is category {pair.category_id}')
    aligned.append(rec.keypoints)
  extra = sorted(j for q in queues.values() for j in q)
  if extra:
    raise ValueError(f'{len(extra)} predictions match no evaluation pair, first: prediction '
                     f'{extra[0]} ({_describe(records[extra[0]].key)})')
  return aligned


def _pad(arrays: Sequence[np.ndarray], slots: int, fill) -> np.ndarray:
  """Stack [K_i, ...] arrays into [N, slots, ...], filling the tail rows with `fill`."""
  out = np.full((len(arrays), slots) + arrays[0].shape[1:], fill, dtype=arrays[0].dtype)
  for i, a in enumerate(arrays):
    out[i, :len(a)] = a
  return out


def score_predictions_file(predictions_path, episodes: Sequence[EvalPair]) -> dict:
  """Read a predictions file, align it with the official pairs (`episodes`) and score it.

  Returns `metrics.score_pairs(...)` with per-category results. Padded slots are masked out, so
  categories with different keypoint counts share one [N, max K] batch.
  """
  if not episodes:
    raise ValueError('no evaluation pairs given')
  for i, p in enumerate(episodes):
    k = len(p.gt_keypoints)
    if np.shape(p.gt_keypoints) != (k, 2) or np.shape(p.mask) != (k,):
      raise ValueError(f'evaluation pair {i}: gt_keypoints [K, 2] and mask [K] expected, got '
                       f'{np.shape(p.gt_keypoints)} and {np.shape(p.mask)}')
  preds = align_predictions(read_predictions(predictions_path), episodes)
  slots = max(len(p.gt_keypoints) for p in episodes)
  with np.errstate(over='ignore', invalid='ignore'):   # checked below, naming the file
    scores = metrics.score_pairs(
        pred=_pad(preds, slots, 0.0),
        gt=_pad([np.asarray(p.gt_keypoints, dtype=np.float64) for p in episodes], slots, 0.0),
        mask=_pad([np.asarray(p.mask, dtype=bool) for p in episodes], slots, False),
        bbox_thr=np.array([p.bbox_thr for p in episodes], dtype=np.float64),
        category_ids=np.array([p.category_id for p in episodes], dtype=np.int64))
  check_finite_scores(scores, predictions_path, preds, episodes)
  return scores


def check_finite_scores(scores: dict, predictions_path, preds: Sequence[np.ndarray],
                        episodes: Sequence[EvalPair]) -> None:
  """ValueError naming the file when a metric overflowed (finite coordinates as large as 1e308
  make the mean error inf): nothing of such a score would be printed or written."""
  rows = [scores, *scores.get('per_category', {}).values()]
  if all(math.isfinite(row[k]) for row in rows for k in metrics.METRIC_KEYS):
    return
  worst = int(np.argmax([np.abs(p).max() for p in preds]))
  raise ValueError(f'{predictions_path}: the scores are not finite: pair '
                   f'{_describe(episodes[worst].key)} has a keypoint at '
                   f'{np.abs(preds[worst]).max():.3g} px; keypoints must be original-image '
                   f'pixels')

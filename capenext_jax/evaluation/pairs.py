"""The official evaluation pairs of a split and everything scoring needs (docs/MODEL.md §6).

`EvalProtocol` says which pairs (shots, episodes per category, queries per episode) and how
they are batched; `EvalPairs.build(dataset, protocol)` draws them once (CPython `random`
seeded with 1, as the official code) and keeps the arrays that both the model path (the
Evaluator) and the model-free paths (`export_episodes`, `EvalPairs.score_file`) use.
"""
from __future__ import annotations

import dataclasses

import ml_collections
import numpy as np

from capenext_jax import metrics
from capenext_jax.evaluation import predictions
from capenext_jax.mp100 import episodes as ep
from capenext_jax.mp100.annotations import MP100Dataset, load_annotations

EPISODE_KEYS_DOC = """Episodes .npz (one row per evaluation pair, official order):
  support_ann_ids int64 [N, k]   support annotation ids (k = shots)
  query_ann_id    int64 [N]      query annotation id
  bbox_thr        float64 [N]    max(w, h) of the query's cleaned bbox (PCK normaliser)
  mask            bool [N, 100]  query and every support visible (raw v > 0); padded slots False
  pairs           int64 [N, k+1] db indices (support..., query) in the json's annotation order
  category_id     int64 [N]      the query's category id
  gt_keypoints    float64 [N, 100, 2]  query keypoints in original-image px (padded 0)
  num_keypoints   int32 [N]      the category's K
"""


@dataclasses.dataclass(frozen=True)
class EvalProtocol:
  """Which pairs are scored and the global batch size they go through the model in.

  Official: 1 or 5 shots, 15 queries per episode, 100 episodes per category on val and 200
  on test.
  """
  shots: int = 1
  num_episodes: int = 200
  num_queries: int = 15
  batch_size: int = 32

  def __post_init__(self):
    for name in ('shots', 'num_episodes', 'num_queries', 'batch_size'):
      value = getattr(self, name)
      if not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f'evaluation protocol: {name} must be a positive integer, got {value!r}')

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict, split: str) -> EvalProtocol:
    """The run config's protocol for 'val' or 'test' (`data.*_episodes`, `eval_batch_size`)."""
    d = config.data
    episodes = {'val': d.val_episodes, 'test': d.test_episodes}[split]
    return cls(shots=d.shots, num_episodes=episodes, num_queries=d.num_queries,
               batch_size=config.eval_batch_size)


@dataclasses.dataclass(frozen=True)
class EvalPairs:
  """The official pairs of one annotation file: arrays in the layout of EPISODE_KEYS_DOC, and
  the file's category names by id (for reports)."""
  arrays: dict[str, np.ndarray]
  category_names: dict[int, str]

  @classmethod
  def build(cls, dataset: MP100Dataset, protocol: EvalProtocol) -> EvalPairs:
    pairs = ep.official_pairs(dataset, protocol.shots, protocol.num_episodes,
                              protocol.num_queries)
    q = pairs[:, -1]
    return cls(dict(
        support_ann_ids=dataset.ann_id[pairs[:, :-1]].astype(np.int64),
        query_ann_id=dataset.ann_id[q].astype(np.int64),
        bbox_thr=dataset.bbox_thr[q].astype(np.float64),
        mask=ep.eval_mask(dataset, pairs),
        pairs=pairs,
        category_id=dataset.category_ids[dataset.category_index[q]].astype(np.int64),
        gt_keypoints=dataset.joints[q].astype(np.float64),
        num_keypoints=dataset.num_keypoints[q].astype(np.int32)),
               category_names={int(c): n for c, n in zip(dataset.category_ids,
                                                         dataset.raw_category_names)})

  def __len__(self) -> int:
    return len(self.arrays['query_ann_id'])

  @property
  def pairs(self) -> np.ndarray:
    """int64 [N, shots + 1]: db rows (support..., query) of every pair."""
    return self.arrays['pairs']

  def score(self, pred: np.ndarray) -> dict:
    """Official scores of predictions [N, 100, 2] in original-image px, aligned with the pairs."""
    a = self.arrays
    return metrics.score_pairs(pred, a['gt_keypoints'], a['mask'], a['bbox_thr'],
                               category_ids=a['category_id'])

  def score_file(self, predictions_path: str) -> dict:
    """Official scores of a predictions file (see `evaluation.predictions`) on the pairs."""
    return predictions.score_predictions_file(predictions_path, self.records())

  def records(self) -> list[predictions.EvalPair]:
    """The pairs as the records `predictions.score_predictions_file` matches against."""
    a = self.arrays
    return [predictions.EvalPair(
        support_ann_ids=tuple(int(s) for s in a['support_ann_ids'][i]),
        query_ann_id=int(a['query_ann_id'][i]), category_id=int(a['category_id'][i]),
        gt_keypoints=a['gt_keypoints'][i, :k], mask=a['mask'][i, :k],
        bbox_thr=float(a['bbox_thr'][i]))
        for i, k in enumerate(a['num_keypoints'])]

  def write_predictions(self, path: str, pred: np.ndarray) -> None:
    """`pred` [N, 100, 2] (original-image px) in the documented predictions format."""
    a = self.arrays
    predictions.write_predictions(path, [predictions.PredictionRecord(
        support_ann_ids=tuple(int(s) for s in a['support_ann_ids'][i]),
        query_ann_id=int(a['query_ann_id'][i]), keypoints=pred[i, :k],
        category_id=int(a['category_id'][i]))
        for i, k in enumerate(a['num_keypoints'])])


def pairs_of_file(annotations: str, protocol: EvalProtocol) -> EvalPairs:
  """The pairs of an annotation json read as the official test set (no image is opened)."""
  return EvalPairs.build(load_annotations(annotations, '', drop_missing_images=False), protocol)


def export_episodes(annotations: str, path: str, protocol: EvalProtocol) -> int:
  """Write the episodes .npz of `annotations` (EPISODE_KEYS_DOC). Returns the pair count."""
  pairs = pairs_of_file(annotations, protocol)
  np.savez(path, **pairs.arrays)
  return len(pairs)

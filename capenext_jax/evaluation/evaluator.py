"""The official evaluation of a model: one Evaluator for the training loop and eval.py.

    predict_fn = predict_fn.predict_fn(step, graphdef, data.dataset, mesh)   # the caller's
    evaluator = Evaluator(predict_fn, data, EvalProtocol(shots=1, num_episodes=200), mesh,
                          image_size=256)
    scores = evaluator.run(state)              # PCK@{0.05..0.25}, mPCK, NME, AUC, EPE
    pred = evaluator.predict(state)            # [N, 100, 2] original-image px

As big_vision's evaluators, the Evaluator takes a `predict_fn(state, batch)` built by its
caller and knows nothing of what a state is or how a step is compiled (`evaluation/predict_fn.py`
builds the one every caller uses: the jitted `device.step.make_predict_step` with the split's
text cache). The pairs are drawn once at construction (`EvalPairs`); every `run` sends them
through `predict_fn` in global batches sharded over the mesh (the last one padded and masked),
maps the last decoder layer's points back to original-image pixels and scores them with the
official per-instance definitions, overall and per category.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, Protocol

import jax
import numpy as np

from capenext_jax.device import forward as forward_lib
from capenext_jax.device import partition
from capenext_jax.evaluation.pairs import EvalPairs, EvalProtocol
from capenext_jax.mp100 import geometry
from capenext_jax.mp100.annotations import MP100Dataset

# predict_fn(state, device batch) -> {'keypoints': [B, K, 2] crop-normalised (0..1) points of
# the last decoder layer, 'pair_index': int32 [B], 'valid': bool [B]} (device arrays; the
# Evaluator gathers them once from every host at the end).
PredictFn = Callable[[Any, dict], dict]


class EvalData(Protocol):
  """What the Evaluator reads of a split (`data_pipeline.splits.Split` is one)."""
  dataset: MP100Dataset

  def eval_batches(self, pairs: np.ndarray, global_batch_size: int) -> Iterator[dict]:
    """This host's batches of `pairs` (int64 [N, shots + 1] db rows) in order, the last one
    padded: every batch holds `pair_index` int32 [B] and `valid` bool [B] besides the model
    inputs of `forward.DEVICE_KEYS`."""


class Evaluator:
  """Official scores of a model on one split's pairs, through the caller's `predict_fn`."""

  def __init__(self, predict_fn: PredictFn, data: EvalData, protocol: EvalProtocol, mesh, *,
               image_size: int):
    self.predict_fn, self.data, self.protocol, self.mesh = predict_fn, data, protocol, mesh
    self.image_size = image_size
    partition.check_batch_size('eval batch size', protocol.batch_size, mesh)
    self.pairs = EvalPairs.build(data.dataset, protocol)

  def predict(self, state, progress=None) -> np.ndarray:
    """float32 [N, 100, 2]: every pair's keypoints in original-image pixels, pair order.

    progress: optional `progress.Progress` over the pairs, told of each batch once it is
    computed (one batch stays in flight, so reporting does not stall the device).
    """
    keys = forward_lib.DEVICE_KEYS + ('pair_index', 'valid')
    batch_size, outputs = self.protocol.batch_size, []
    for b in self.data.eval_batches(self.pairs.pairs, batch_size):
      outputs.append(self.predict_fn(state, forward_lib.device_batch(b, self.mesh, keys)))
      if progress is not None and len(outputs) > 1:
        jax.block_until_ready(outputs[-2])
        progress.update(batch_size)
    if progress is not None and outputs:
      jax.block_until_ready(outputs[-1])
      progress.update(len(self.pairs) - batch_size * (len(outputs) - 1))
    out = partition.gather_batches(outputs, self.mesh)   # one gather at the end, no per-batch sync
    valid = out['valid']
    index, crop = out['pair_index'][valid], out['keypoints'][valid]
    if not np.array_equal(np.sort(index), np.arange(len(self.pairs))):
      raise RuntimeError('eval batches do not cover every pair exactly once')
    dataset, q = self.data.dataset, self.pairs.pairs[index, -1]
    pred = np.empty((len(index), crop.shape[1], 2), np.float32)
    pred[index] = geometry.transform_preds(crop * self.image_size, dataset.center[q],
                                          dataset.scale[q], self.image_size)
    return pred

  def run(self, state, progress=None) -> dict:
    """Official scores (see `metrics.score_pairs`) of `state` on the pairs."""
    return self.pairs.score(self.predict(state, progress))


def pck_at(scores: dict, thr: float = 0.2) -> float:
  return float(scores[f'PCK@{thr}'])

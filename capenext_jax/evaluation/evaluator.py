"""The official evaluation of a model state: one Evaluator for the training loop and eval.py.

    evaluator = Evaluator(graphdef, data, EvalProtocol(shots=1, num_episodes=200), mesh,
                          image_size=256)
    scores = evaluator.run(state)              # PCK@{0.05..0.25}, mPCK, NME, AUC, EPE
    pred = evaluator.predict(state)            # [N, 100, 2] original-image px

The pairs are drawn once at construction (`EvalPairs`); every `run` sends them through the
jitted eval step in global batches sharded over the mesh (the last one padded and masked), maps
the last decoder layer's points back to original-image pixels and scores them with the official
per-instance definitions, overall and per category.
"""
from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol

import jax
import numpy as np
from flax import nnx

from capenext_jax import forward as forward_lib
from capenext_jax import metrics
from capenext_jax.evaluation.pairs import EvalPairs, EvalProtocol
from capenext_jax.mp100.annotations import MP100Dataset
from capenext_jax.text.cache import replicated_text_cache
from capenext_jax.training import partition, step as step_lib
from capenext_jax.training.state import TrainState


class EvalData(Protocol):
  """What the Evaluator reads of a split (`data_pipeline.splits.Split` is one)."""
  dataset: MP100Dataset

  def eval_batches(self, pairs: np.ndarray, global_batch_size: int) -> Iterator[dict]:
    """This host's batches of `pairs` (int64 [N, shots + 1] db rows) in order, the last one
    padded: every batch holds `pair_index` int32 [B] and `valid` bool [B] besides the model
    inputs of `forward.DEVICE_KEYS`."""


class Evaluator:
  """Official scores of a model on one split's pairs.

  The frozen CLIP text embeddings of the split's categories are computed from the first state
  evaluated and reused (CLIP is frozen: every later state of a run has the same text tower).
  """

  def __init__(self, graphdef: nnx.GraphDef, data: EvalData, protocol: EvalProtocol, mesh, *,
               image_size: int):
    self.graphdef, self.data, self.protocol, self.mesh = graphdef, data, protocol, mesh
    self.image_size = image_size
    partition.check_batch_size('eval batch size', protocol.batch_size, mesh)
    self.pairs = EvalPairs.build(data.dataset, protocol)
    self._step = None

  def _eval_step(self, state: TrainState):
    """(jitted `step(state, batch, cache)`, the split's text cache), built on first use."""
    if self._step is None:
      cache = replicated_text_cache(self.graphdef, state, self.data.dataset, self.mesh)
      forward = forward_lib.make_forward(self.image_size)

      def last_layer(model, batch, cache):
        # pair_index / valid ride along through the device so that the gathered outputs of
        # every host carry their own bookkeeping (hosts hold different rows).
        return {'keypoints': forward(model, batch, cache)['keypoints'][-1],
                'pair_index': batch['pair_index'], 'valid': batch['valid']}

      self._step = step_lib.make_eval_step(self.graphdef, forward=last_layer), cache
    return self._step

  def predict(self, state: TrainState, progress=None) -> np.ndarray:
    """float32 [N, 100, 2]: every pair's keypoints in original-image pixels, pair order.

    progress: optional `progress.Progress` over the pairs, told of each batch once it is
    computed (one batch stays in flight, so reporting does not stall the device).
    """
    step, cache = self._eval_step(state)
    keys = forward_lib.DEVICE_KEYS + ('pair_index', 'valid')
    batch_size, outputs = self.protocol.batch_size, []
    for b in self.data.eval_batches(self.pairs.pairs, batch_size):
      outputs.append(step(state, forward_lib.device_batch(b, self.mesh, keys), cache))
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
    pred[index] = metrics.transform_preds(crop * self.image_size, dataset.center[q],
                                          dataset.scale[q], self.image_size)
    return pred

  def run(self, state: TrainState, progress=None) -> dict:
    """Official scores (see `metrics.score_pairs`) of `state` on the pairs."""
    return self.pairs.score(self.predict(state, progress))


def pck_at(scores: dict, thr: float = 0.2) -> float:
  return float(scores[f'PCK@{thr}'])

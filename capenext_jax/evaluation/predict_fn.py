"""The `predict_fn` an `Evaluator` runs: the jitted predict step with a split's text cache.

    step = device.step.make_predict_step(graphdef, image_size)    # once per program
    evaluator = Evaluator(predict_fn(step, graphdef, data.dataset, mesh), data, ...)

Built by the Evaluator's callers (the training loop, `evaluation/program.py`), so that the
Evaluator itself knows nothing of train states or compiled steps.
"""
from __future__ import annotations

from collections.abc import Callable

from flax import nnx

from capenext_jax.evaluation.evaluator import PredictFn
from capenext_jax.mp100.annotations import MP100Dataset
from capenext_jax.text.cache import replicated_text_cache


def predict_fn(step: Callable, graphdef: nnx.GraphDef, dataset: MP100Dataset,
               mesh) -> PredictFn:
  """`predict_fn(state, batch) = step(state, batch, cache)`, `cache` the frozen CLIP text of
  `dataset`'s categories, encoded from the first state it is called with and reused (CLIP is
  frozen: every later state of a run has the same text tower; a split never evaluated costs
  nothing).

  step: `device.step.make_predict_step(graphdef, image_size)`.
  """
  cache = []

  def predict(state, batch):
    if not cache:
      cache.append(replicated_text_cache(graphdef, state, dataset, mesh))
    return step(state, batch, cache[0])

  return predict

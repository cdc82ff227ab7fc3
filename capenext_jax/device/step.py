"""Jitted train and eval steps, generic over the model and the loss.

* `forward(model, batch, *context) -> outputs` calls the model; the default follows DESIGN.md's
  call. `context`: further arguments the steps take after the batch and hand to `forward`
  (the frozen-text cache): jit arguments, so new values of the same shapes reuse the compiled
  step, and large arrays are not baked into it as constants.
* `loss_fn(outputs, batch) -> {name: scalar}` must contain 'loss' (the differentiated total);
  every entry is logged.
The step never syncs with the host. It reports a `finite` flag per step; the loop checks it
with `check_finite` whenever it fetches metrics anyway, naming the first bad step and term.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from capenext_jax.device import flat, forward as forward_lib
from capenext_jax.device import partition
from capenext_jax.device.state import TrainState, merge_model

Batch = Mapping[str, jax.Array]
Forward = Callable[..., Any]   # (model, batch, *context) -> outputs
LossFn = Callable[[Any, Batch], Mapping[str, jax.Array]]
TEXT_KEYS = ('keypoint_text', 'category_text', 'keypoint_tokens', 'category_tokens')


def default_forward(model: nnx.Module, batch: Batch) -> Any:
  """`model(query_image, support_mask, adjacency, **text)` with the text inputs in the batch."""
  text = {k: batch[k] for k in TEXT_KEYS if k in batch}
  return model(batch['query_image'], batch['support_mask'], batch['adjacency'], **text)


def reseed_all(model: nnx.Module, key: jax.Array) -> None:
  """Give every RNG stream of `model` a fresh key derived from `key` (one per stream tag).

  `nnx.reseed` matches streams by tag, and a model built with `nnx.Rngs(0)` tags its dropout
  streams 'default', not 'dropout': reseeding only 'dropout' would silently reuse the same
  masks at every step.
  """
  tags = sorted({s.key.tag for _, s in nnx.iter_graph(model) if isinstance(s, nnx.RngStream)})
  nnx.reseed(model, **{t: jax.random.fold_in(key, i) for i, t in enumerate(tags)})


def make_train_step(graphdef: nnx.GraphDef, loss_fn: LossFn,
                    optimizer: optax.GradientTransformation, *,
                    forward: Forward = default_forward,
                    shardings: TrainState | None = None
                    ) -> Callable[..., tuple[TrainState, dict]]:
  """`train_step(state, batch, *context) -> (state, metrics)`, jitted, donating the input
  state; `context` goes to `forward`.

  metrics: every `loss_fn` term, 'grad_norm' (global L2 norm of the grads) and 'finite'
  (bool: all of them finite). shardings: the state's NamedShardings; when given the output
  state is pinned to them, so the layout cannot drift between steps.
  """

  def train_step(state: TrainState, batch: Batch, *context):
    key = jax.random.fold_in(state.rng, state.step)

    def loss_of(trainable):
      # Frozen arrays enter as constants: no tangents flow through CLIP, so its backward
      # pass is never built.
      model = merge_model(graphdef, gathered(state), partition.gather(trainable))
      model.train()
      reseed_all(model, key)
      terms = dict(loss_fn(forward(model, batch, *context), batch))
      # The forward pass in training mode moved the BatchNorm running statistics.
      batch_stats = nnx.to_pure_dict(nnx.state(model, nnx.BatchStat))
      return terms['loss'], (terms, batch_stats)

    grads, (terms, batch_stats) = jax.grad(loss_of, has_aux=True)(state.trainable)
    # Over the optimizer state's few buffers (flat.py), or leaf by leaf for a per-leaf state.
    trainable, opt_state, grad_norm = flat.update(optimizer, grads, state.opt_state,
                                                  state.trainable)
    metrics = dict(terms, grad_norm=grad_norm)
    metrics['finite'] = jnp.all(jnp.stack([jnp.isfinite(v).all() for v in metrics.values()]))
    new_state = state.replace(trainable=trainable, batch_stats=batch_stats,
                              opt_state=opt_state, step=state.step + 1)
    return new_state, metrics

  if shardings is None:
    return jax.jit(train_step, donate_argnums=0)
  replicated = NamedSharding(jax.tree.leaves(shardings)[0].mesh, P())
  return jax.jit(train_step, donate_argnums=0, out_shardings=(shardings, replicated))


def gathered(state: TrainState) -> TrainState:
  """The model part of `state` (params, batch statistics, frozen) gathered where a step uses
  it (`partition.gather`: FSDP), the optimizer state left as it is."""
  return state.replace(**partition.gather(dict(trainable=state.trainable,
                                               batch_stats=state.batch_stats,
                                               frozen=state.frozen)))


def make_eval_step(graphdef: nnx.GraphDef, *, forward: Forward = default_forward
                   ) -> Callable[..., Any]:
  """`eval_step(state, batch, *context) -> forward(model, batch, *context)` in eval mode (no
  dropout), jitted.

  `forward` may reduce the outputs (e.g. keep only the last layer's keypoints) to cut the
  device-to-host transfer.
  """

  def eval_step(state: TrainState, batch: Batch, *context):
    model = merge_model(graphdef, gathered(state))
    model.eval()
    return forward(model, batch, *context)

  return jax.jit(eval_step)


def check_finite(history: Sequence[tuple[int, Mapping[str, Any]]]) -> None:
  """Raise FloatingPointError at the first step whose metrics are not all finite.

  history: `(step, metrics)` pairs as fetched to host, in step order; `step` is the global
  iteration the metrics were computed at (the state's step before the update).
  """
  for step, metrics in history:
    if bool(np.asarray(metrics['finite'])):
      continue
    bad = sorted(k for k, v in metrics.items()
                 if k != 'finite' and not np.all(np.isfinite(np.asarray(v))))
    values = ', '.join(f'{k}={np.asarray(metrics[k])}' for k in bad)
    raise FloatingPointError(f'non-finite {", ".join(bad)} at step {step} ({values}); the '
                             'update was applied, so resume from an earlier checkpoint')


def make_predict_step(graphdef: nnx.GraphDef, image_size: int) -> Callable[..., dict]:
  """`predict_step(state, batch, cache) -> {'keypoints', 'pair_index', 'valid'}`, jitted: the
  last decoder layer's keypoints ([B, K, 2], crop-normalised) of `forward.make_forward`.

  pair_index / valid ride along through the device so that the gathered outputs of every host
  carry their own bookkeeping (hosts hold different rows). One step serves every split: the
  text cache is an argument, so another split's cache of the same shape reuses the executable.
  """
  forward = forward_lib.make_forward(image_size)

  def last_layer(model, batch, cache):
    return {'keypoints': forward(model, batch, cache)['keypoints'][-1],
            'pair_index': batch['pair_index'], 'valid': batch['valid']}

  return make_eval_step(graphdef, forward=last_layer)


def matmul_precision(precision: str, dtype: str) -> str:
  """`jax_default_matmul_precision` for a run config's `precision` and a model's compute
  `dtype`: `precision` itself, or for 'auto' the one that suits `dtype`: 'highest' for
  float32 (the parity mode: true float32 products, where GPUs would use TF32 and TPUs one
  bf16 pass), 'default' for bfloat16 (the platform's native bf16 matmuls; asking for more
  would only slow its float32 parts down)."""
  if precision != 'auto':
    return precision
  return 'highest' if dtype == 'float32' else 'default'

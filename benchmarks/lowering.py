"""The CapeNext train step lowered for an accelerator platform on any host (no device needed).

`lower_train_step` builds the real step (`device.step.make_train_step` with the headline
loss, Adam and the official schedule) over an abstract state, so nothing is allocated, and
lowers it for `platform` (default 'cuda'; lowering needs only jaxlib, not a GPU), with the
frozen CLIP image tower in the compute dtype as the training loop holds it. The text it
returns is StableHLO with debug locations: every op ends in `loc(#locN)`, and the `#locN`
aliases at the end of the module carry jax's name stack (`jit(train_step)/jvp(backbone)/...`,
`transpose(jvp(...))` in the backward), so ops can be attributed to the model's named scopes.
Custom calls (cuDNN attention, ...) appear as `stablehlo.custom_call @target`. Kernels are
chosen for `platform` (`layers.target_platform`: cuDNN attention, Swin's window order), and
on a machine without a GPU the one query jax makes of the CUDA plugin while tracing a cuDNN
attention, cuDNN's version, is answered as 9.8 (`assumed_cudnn_version`); the lowering rules
themselves are the real CUDA ones.

Imports only capenext_jax and jax/flax/optax/numpy (runs on accelerator hosts without TF).
"""
from __future__ import annotations

import contextlib

import jax
import jax.numpy as jnp
from flax import nnx

from capenext_jax import losses
from capenext_jax.models.capenext import (CapeNextConfig, abstract_model,
                                          frozen_in_compute_dtype)
from capenext_jax.device import state as state_lib, step as step_lib
from capenext_jax.models import layers
from capenext_jax.tools.bf16_fidelity import random_batch
from capenext_jax.training import schedule

HEATMAP = 64   # the official configs' targets are 64 px at every input size


def abstract_train_state(config: CapeNextConfig, tx) -> tuple[nnx.GraphDef, state_lib.TrainState]:
  """(graphdef, TrainState of ShapeDtypeStructs) of a randomly initialised model: nothing is
  computed or allocated."""
  return state_lib.abstract_train_state(abstract_model(config), tx, jax.random.PRNGKey(0))


def lower_train_step(config: CapeNextConfig, batch_size: int, *, platform: str = 'cuda',
                     precision: str | None = None) -> str:
  """StableHLO text (with debug locations) of one train step of `config` on `batch_size`
  1-shot episodes with cached text, lowered for `platform`.

  precision: the default matmul precision while tracing; None picks the runs' rule
  ('highest' for float32, 'default' for bfloat16, as `device.step.matmul_precision`).
  """
  tx = schedule.make_optimizer(schedule.default_optim_config(), steps_per_epoch=1000)
  graphdef, state = abstract_train_state(config, tx)
  # As the training loop steps it: the frozen CLIP image tower held in the compute dtype.
  state = state.replace(frozen=jax.eval_shape(
      lambda frozen: frozen_in_compute_dtype(frozen, config.dtype), state.frozen))
  train_step = step_lib.make_train_step(
      graphdef, losses.batch_loss_fn(config.image_size, HEATMAP), tx)
  batch = {k: jax.ShapeDtypeStruct((batch_size, *v.shape[1:]), v.dtype)
           for k, v in random_batch(config, 1, 0).items()}
  if precision is None:
    precision = 'highest' if jnp.dtype(config.dtype) == jnp.float32 else 'default'
  with layers.target_platform(platform), assumed_cudnn_version(platform), \
       jax.default_matmul_precision(precision):
    lowered = train_step.trace(state, batch).lower(lowering_platforms=(platform,))
  return lowered.as_text(debug_info=True)


@contextlib.contextmanager
def assumed_cudnn_version(platform: str, version: int = 90800):
  """While lowering for CUDA on a machine without a GPU: jax's trace-time cuDNN version
  query (which asks the CUDA plugin) answers `version`. Elsewhere, nothing changes."""
  if platform != 'cuda' or jax.default_backend() == 'gpu':
    yield
    return
  from jax._src.cudnn import fused_attention_stablehlo
  original = fused_attention_stablehlo.check_cudnn_version
  fused_attention_stablehlo.check_cudnn_version = lambda: version
  try:
    yield
  finally:
    fused_attention_stablehlo.check_cudnn_version = original

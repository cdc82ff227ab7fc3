"""Normalisation layers with PyTorch's semantics, their statistics in at least float32."""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

LN_EPS = 1e-5  # PyTorch's LayerNorm default, used everywhere in CapeNext (Flax defaults to 1e-6).
BN_EPS, BN_MOMENTUM = 1e-5, 0.1   # torch.nn.BatchNorm2d defaults


def at_least_float32(dtype) -> jnp.dtype:
  """The dtype normalisation statistics are computed in: float32 for bfloat16 / float16 /
  float32 inputs, float64 for float64 ones (a float64 run, as the parity tests' training-mode
  check, must not drop to float32 there: a BatchNorm over a 2x2 map with a small variance
  loses ~1e-5 relative in float32)."""
  return jnp.promote_types(dtype, jnp.float32)


class LayerNorm(nnx.LayerNorm):
  """`nnx.LayerNorm` (same parameters) computed in at least float32 whatever the input dtype;
  the result is in the input's dtype."""

  def __call__(self, x: jax.Array, *, mask: jax.Array | None = None) -> jax.Array:
    return super().__call__(x.astype(at_least_float32(x.dtype)), mask=mask).astype(x.dtype)


def layer_norm(dim: int, *, rngs: nnx.Rngs, epsilon: float = LN_EPS) -> LayerNorm:
  """LayerNorm over the last axis with PyTorch's eps (1e-5), weight 1 and bias 0."""
  return LayerNorm(dim, epsilon=epsilon, rngs=rngs)


class BatchNorm(nnx.Module):
  """`torch.nn.BatchNorm2d` over the last (channel) axis of NHWC maps.

  Training mode (`use_running_average=False`, set by `model.train()`; the default, as torch):
  normalise with the mean and biased variance over every axis but the channels. Under jit with
  the batch sharded over a mesh these are means over the *global* batch (GSPMD adds the
  cross-device sums), so data parallelism does not change the statistics. The running
  statistics then move by `momentum` toward the batch mean and the *unbiased* variance.
  Eval mode (`model.eval()`): normalise with the running statistics.

  Params `scale` (torch `weight`), `bias`; statistics `mean`, `var` (`running_mean`,
  `running_var`) are `nnx.BatchStat`: model state outside the optimiser (training/state.py).
  """

  def __init__(self, num_features: int, *, momentum: float = BN_MOMENTUM,
               epsilon: float = BN_EPS):
    self.scale = nnx.Param(jnp.ones((num_features,), jnp.float32))
    self.bias = nnx.Param(jnp.zeros((num_features,), jnp.float32))
    self.mean = nnx.BatchStat(jnp.zeros((num_features,), jnp.float32))
    self.var = nnx.BatchStat(jnp.ones((num_features,), jnp.float32))
    self.momentum, self.epsilon = momentum, epsilon
    self.use_running_average = False

  def __call__(self, x: jax.Array) -> jax.Array:
    """Statistics and normalisation in at least float32; the result in x's dtype."""
    dtype, x = x.dtype, x.astype(at_least_float32(x.dtype))
    if self.use_running_average:
      mean, var = self.mean[...], self.var[...]
    else:
      axes = tuple(range(x.ndim - 1))
      count = x.size // x.shape[-1]
      if count < 2:
        raise ValueError(f'BatchNorm in training mode needs more than one value per channel, '
                         f'got input {x.shape}')
      mean = jnp.mean(x, axes)
      var = jnp.mean(jnp.square(x - mean), axes)
      m = self.momentum
      self.mean.value = (1 - m) * self.mean[...] + m * jax.lax.stop_gradient(mean)
      self.var.value = (1 - m) * self.var[...] + m * jax.lax.stop_gradient(var) * (
          count / (count - 1))
    y = (x - mean) * (jax.lax.rsqrt(var + self.epsilon) * self.scale[...]) + self.bias[...]
    return y.astype(dtype)

"""Normalisation layers with PyTorch's semantics, their statistics in at least float32."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from capenext_jax.models.layers.cpu_kernels import sum_rows

LN_EPS = 1e-5  # PyTorch's LayerNorm default, used everywhere in CapeNext (Flax defaults to 1e-6).
BN_EPS, BN_MOMENTUM = 1e-5, 0.1   # torch.nn.BatchNorm2d defaults


def at_least_float32(dtype) -> jnp.dtype:
  """The dtype normalisation statistics are computed in: float32 for bfloat16 / float16 /
  float32 inputs, float64 for float64 ones (a float64 run, as the parity tests' training-mode
  check, must not drop to float32 there: a BatchNorm over a 2x2 map with a small variance
  loses ~1e-5 relative in float32)."""
  return jnp.promote_types(dtype, jnp.float32)


class LayerNorm(nnx.LayerNorm):
  """`nnx.LayerNorm` (same parameters, same forward values) computed in at least float32
  whatever the input dtype; the result is in the input's dtype. Without a `mask`, through
  `normalize_last_axis` and its hand-written backward."""

  def __call__(self, x: jax.Array, *, mask: jax.Array | None = None) -> jax.Array:
    plain = (mask is None and self.reduction_axes in (-1, (-1,)) and self.use_scale
             and self.use_bias and self.use_fast_variance and self.axis_name is None)
    if plain:   # every LayerNorm of CapeNext
      return normalize_last_axis(x, self.scale[...], self.bias[...], self.epsilon)
    return super().__call__(x.astype(at_least_float32(x.dtype)), mask=mask).astype(x.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def normalize_last_axis(x: jax.Array, scale: jax.Array, bias: jax.Array,
                        epsilon: float) -> jax.Array:
  """LayerNorm over the last axis: (x - mean) * rsqrt(var + eps) * scale + bias in at least
  float32, returned in x's dtype. x [..., C], scale / bias [C]. The forward is Flax's
  (`nnx.LayerNorm`: var = max(0, E[x^2] - E[x]^2)), value for value.

  The backward keeps x in its own dtype plus two float32 statistics per row and rebuilds the
  normalised x from them: autodiff of the float32 forward saves float32 copies of the rows
  (x - mean and its scaled forms), twice the bytes of a bfloat16 x, and reads them back
  (docs/DESIGN.md, "Hand-written backward passes")."""
  return _normalize_fwd(x, scale, bias, epsilon)[0]


def _normalize_fwd(x, scale, bias, epsilon):
  acc = at_least_float32(x.dtype)
  x32 = lambda: x.astype(acc)   # noqa: E731  (one copy per pass, as in the backward)
  mean = jnp.mean(x32(), axis=-1, keepdims=True)
  var = jnp.maximum(0.0, jnp.mean(jnp.square(x32()), axis=-1, keepdims=True) - jnp.square(mean))
  rstd = jax.lax.rsqrt(var + epsilon)
  y = (x32() - mean) * (rstd * scale.astype(acc)) + bias.astype(acc)
  return y.astype(x.dtype), (x, scale, bias, mean, rstd)


def _normalize_bwd(epsilon, residuals, dy):
  """dx = rstd * (g - mean(g) - xhat * mean(g * xhat)) with g = dy * scale and xhat =
  (x - mean) * rstd; dscale = sum of dy * xhat and dbias = sum of dy over the rows.

  Each pass (the row means, dx, the two column sums) reads x and dy as stored and converts
  them itself: no float32 row-sized tensor is written between passes (xhat and g are
  recomputed where they are used, as XLA fuses a cheap elementwise producer into each of its
  consumers)."""
  del epsilon
  x, scale, bias, mean, rstd = residuals
  acc = mean.dtype
  s = scale.astype(acc)
  x_centred = lambda: x.astype(acc) - mean   # noqa: E731  (one copy per pass)
  g = lambda: dy.astype(acc) * s              # noqa: E731
  g_mean = jnp.mean(g(), axis=-1, keepdims=True)
  g_xhat_mean = jnp.mean(g() * x_centred(), axis=-1, keepdims=True) * rstd
  dx = rstd * (g() - g_mean - x_centred() * (rstd * g_xhat_mean))
  rows = lambda t: t.reshape(-1, t.shape[-1])   # noqa: E731
  d_scale = sum_rows(rows(dy.astype(acc) * (x_centred() * rstd))).astype(scale.dtype)
  d_bias = sum_rows(rows(dy.astype(acc))).astype(bias.dtype)
  return dx.astype(x.dtype), d_scale, d_bias


normalize_last_axis.defvjp(_normalize_fwd, _normalize_bwd)


def l2_normalize(x: jax.Array, scale: jax.Array | None = None) -> jax.Array:
  """`F.normalize(x, dim=-1)` (x / max(||x||, 1e-12)) times `scale`, in at least float32,
  returned in x's dtype. x [..., d]; scale: None (1) or an array that broadcasts against x and
  is constant along its last axis (a per-row factor such as Swin V2's per-head logit scale,
  [h, 1]).

  Hand-written backward: it keeps x in its own dtype and the float32 norms [..., 1], where
  autodiff kept float32 copies of x and of the unit vectors (Swin V2's cosine attention
  normalises q and k of every window)."""
  if scale is None:
    scale = jnp.ones((), at_least_float32(x.dtype))
  if scale.ndim and scale.shape[-1] != 1:
    raise ValueError(f'l2_normalize: scale {scale.shape} must be constant along the last axis '
                     f'(shape [..., 1] or a scalar)')
  return _scaled_unit(x, scale)


@jax.custom_vjp
def _scaled_unit(x, scale):
  return _scaled_unit_fwd(x, scale)[0]


def _scaled_unit_fwd(x, scale):
  acc = at_least_float32(x.dtype)
  norm = jnp.linalg.norm(x.astype(acc), axis=-1, keepdims=True)
  y = (x.astype(acc) / jnp.maximum(norm, 1e-12)) * scale.astype(acc)
  return y.astype(x.dtype), (x, scale, norm)


def _scaled_unit_bwd(residuals, dy):
  """With u = x / n, n = max(||x||, eps) and s the row's scale: dx = s (dy - u <dy, u>) / n
  where ||x|| > eps (the norm's own gradient), s dy / n where the floor holds; dscale = the
  sum of <dy, u> over the rows s multiplies. Two passes read x and dy: the row dots, then dx."""
  x, scale, norm = residuals
  acc = norm.dtype
  n = jnp.maximum(norm, 1e-12)
  s = scale.astype(acc)
  row_dot = jnp.sum(dy.astype(acc) * x.astype(acc), axis=-1, keepdims=True) / n   # <dy, u>
  radial = jnp.where(norm > 1e-12, s * row_dot / n, 0.0)
  dx = (dy.astype(acc) * s - x.astype(acc) * radial) / n
  return dx.astype(x.dtype), _sum_to_shape(row_dot, scale.shape).astype(scale.dtype)


def _sum_to_shape(t: jax.Array, shape: tuple[int, ...]) -> jax.Array:
  """t summed over the axes that broadcasting an array of `shape` against t added or
  stretched: the gradient of that broadcast."""
  lead = t.ndim - len(shape)
  axes = tuple(range(lead)) + tuple(lead + i for i, s in enumerate(shape)
                                    if s == 1 and t.shape[lead + i] != 1)
  return jnp.sum(t, axis=axes, keepdims=True).reshape(shape)


_scaled_unit.defvjp(_scaled_unit_fwd, _scaled_unit_bwd)


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

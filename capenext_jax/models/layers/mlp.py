"""Activations and the transformer MLP."""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from capenext_jax.models.layers.linear import trunc_normal_linear


@jax.custom_vjp
def gelu(x: jax.Array) -> jax.Array:
  """Exact GELU, written as `torch.nn.GELU()` computes it: x/2 * (1 + erf(x/sqrt 2)), in x's
  dtype.

  (jax.nn.gelu defaults to the tanh approximation, and its exact form goes through erfc,
  which XLA:CPU evaluates with a slower exp-based branch.) Hand-written backward: it keeps only
  x and computes Phi(x) + x phi(x) in at least float32, where autodiff kept the erf term and
  the products of the forward as tensors of their own (several per MLP, each of the hidden
  layer's size).
  """
  return _gelu_values(x)


def _gelu_values(x):
  return 0.5 * x * (1.0 + jax.lax.erf(x * (1.0 / math.sqrt(2.0))))


def _gelu_fwd(x):
  return _gelu_values(x), x


def _gelu_bwd(x, dy):
  """d gelu / dx = Phi(x) + x phi(x): the normal CDF and density."""
  x32 = x.astype(jnp.promote_types(x.dtype, jnp.float32))
  cdf = 0.5 * (1.0 + jax.lax.erf(x32 * (1.0 / math.sqrt(2.0))))
  pdf = jnp.exp(-0.5 * jnp.square(x32)) * (1.0 / math.sqrt(2.0 * math.pi))
  return ((dy.astype(x32.dtype) * (cdf + x32 * pdf)).astype(x.dtype),)


gelu.defvjp(_gelu_fwd, _gelu_bwd)


def quick_gelu(x: jax.Array) -> jax.Array:
  """CLIP's QuickGELU: x * sigmoid(1.702 x)."""
  return x * jax.nn.sigmoid(1.702 * x)


class Mlp(nnx.Module):
  """fc2(gelu(fc1(x))): the MLP of Swin V2's and the ViTs' blocks (timm's `Mlp`, exact GELU,
  trunc-normal(0.02) weights)."""

  def __init__(self, dim: int, hidden: int, *, rngs: nnx.Rngs):
    self.fc1 = trunc_normal_linear(dim, hidden, rngs=rngs)
    self.fc2 = trunc_normal_linear(hidden, dim, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.fc2(gelu(self.fc1(x)))

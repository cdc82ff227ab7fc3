"""Activations and the transformer MLP."""
from __future__ import annotations

import math

import jax
from flax import nnx

from capenext_jax.models.layers.linear import trunc_normal_linear


def gelu(x: jax.Array) -> jax.Array:
  """Exact GELU, written as `torch.nn.GELU()` computes it: x/2 * (1 + erf(x/sqrt 2)).

  (jax.nn.gelu defaults to the tanh approximation, and its exact form goes through erfc,
  which XLA:CPU evaluates with a slower exp-based branch.)
  """
  return 0.5 * x * (1.0 + jax.lax.erf(x * (1.0 / math.sqrt(2.0))))


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

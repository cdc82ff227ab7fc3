"""Dropout and stochastic depth with counter-based hash masks."""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx


def _fmix32(x: jax.Array) -> jax.Array:
  """MurmurHash3's 32-bit finaliser: a bijection of uint32 with full avalanche."""
  x = x ^ (x >> 16)
  x = x * jnp.uint32(0x85EBCA6B)
  x = x ^ (x >> 13)
  x = x * jnp.uint32(0xC2B2AE35)
  return x ^ (x >> 16)


def hash_bits(key: jax.Array, shape: tuple[int, ...]) -> jax.Array:
  """uint32 [*shape] pseudo-random bits: two hash rounds of (element index, key words).

  Indices are uint32, so a tensor of 2^32 or more elements is split at an axis into outer
  axes and inner ones of fewer than 2^32 elements: the inner flat index is hashed, and the
  outer flat index is folded into the key words (`_fold_outer`, the identity for outer index
  0). Below 2^32 elements there are no outer axes, and every bit is the plain flat-index hash.
  """
  words = jax.random.key_data(key).reshape(-1).astype(jnp.uint32)
  split = next((k for k in range(len(shape) + 1) if math.prod(shape[k:]) < 2**32), None)
  if split is None or math.prod(shape[:split]) >= 2**32:
    raise ValueError(f'hash_bits: shape {shape} cannot be split into two index ranges of '
                     f'fewer than 2^32 elements each')
  outer, inner = shape[:split], shape[split:]
  index = jax.lax.iota(jnp.uint32, math.prod(inner)).reshape(inner)
  outer_index = jax.lax.iota(jnp.uint32, math.prod(outer)).reshape(outer + (1,) * len(inner))
  return hash_block(words, outer_index, index)


def hash_block(words: jax.Array, outer_index: jax.Array, index: jax.Array) -> jax.Array:
  """The bits of `hash_bits` at (outer flat index, inner flat index), both uint32 arrays that
  broadcast together; words: the key's uint32 data. (Exposed so tests can look at slices of
  tensors too large to build.)"""
  w0, w1 = _fold_outer(words[0], words[-1], outer_index)
  x = _fmix32(index ^ _fmix32(w0))
  return _fmix32(x + _fmix32(w1 ^ jnp.uint32(0x9E3779B9)))


def _fold_outer(w0: jax.Array, w1: jax.Array, outer_index: jax.Array):
  """Key words of outer index o: both words xor-ed with a different hash of o. fmix32(0) is 0,
  so outer index 0 keeps the key; changing both words (not only the first, which would just
  xor-shift the inner indices) keeps the blocks of different o unrelated."""
  return w0 ^ _fmix32(outer_index), w1 ^ _fmix32(outer_index * jnp.uint32(0x9E3779B9))


def next_key(stream: nnx.RngStream) -> jax.Array:
  """`stream()`: the same key and counter step, with a plain (unindexed) counter update.
  `stream()` updates the counter by index, and flax then compares the new traced counter's
  `.sharding`, whose "not available" error message walks the whole trace so far: a cost that
  grew with the model at every dropout of a traced train step (see init_rngs)."""
  count = stream.count.get_value()
  stream.count.set_value(count + 1)
  return jax.random.fold_in(stream.key.get_value(), count)


class Dropout(nnx.Module):
  """`torch.nn.Dropout`: zero each element with probability `rate`, scale the rest by
  1/(1-rate); identity in eval mode.

  The keep decisions come from `hash_bits`, a counter-based hash of the element index and a
  fresh key per call, instead of `jax.random.bits`: XLA:CPU generates random numbers in
  separate, slow kernels (over 10% of a CPU training step went to dropout masks), while the
  hash fuses into the op that consumes the mask. Masks are deterministic in (key, index).
  """

  def __init__(self, rate: float, *, rngs: nnx.Rngs, rng_collection: str = 'dropout'):
    if not 0.0 <= rate < 1.0:
      raise ValueError(f'dropout rate must be in [0, 1), got {rate}')
    self.rate = rate
    self.deterministic = False
    self.rngs = rngs[rng_collection].fork() if rate > 0 else None

  def __call__(self, x: jax.Array) -> jax.Array:
    keep = self.keep_mask(self.mask_shape(x))
    if keep is None:
      return x
    return jnp.where(keep, x * (1.0 / (1.0 - self.rate)), jnp.zeros_like(x))

  def keep_mask(self, shape: tuple[int, ...]) -> jax.Array | None:
    """bool [*shape]: which elements this call keeps (a fresh key, as `__call__` draws), or
    None in eval mode or at rate 0 (everything kept). For callers that apply the mask
    themselves (`layers.softmax_attention`)."""
    if self.deterministic or self.rate == 0.0:
      return None
    threshold = jnp.uint32(min(round((1.0 - self.rate) * 2.0**32), 2**32 - 1))
    return hash_bits(next_key(self.rngs), shape) < threshold

  def mask_shape(self, x: jax.Array) -> tuple[int, ...]:
    """Shape of the keep decisions, broadcast against x."""
    return x.shape


class DropPath(Dropout):
  """Per-sample stochastic depth (timm's `drop_path`): zero a sample's whole residual branch
  with probability `rate` and scale the kept ones by 1/(1-rate). Identity in eval mode."""

  def mask_shape(self, x: jax.Array) -> tuple[int, ...]:
    return (x.shape[0],) + (1,) * (x.ndim - 1)

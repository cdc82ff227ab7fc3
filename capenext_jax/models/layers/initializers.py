"""Initialisers: PyTorch's and timm's weight inits, and the Rngs a model is built with."""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


class _BuildStream(nnx.RngStream):
  """An `nnx.RngStream` whose keys are computed while the model is built, also under a trace.

  A key depends only on the seed and the draw's index, both known then. Traced, each
  `fold_in` would be a threefry loop in the init program, as many as the model has weights (137
  in the tiny test model, beside the loops that draw the weights): XLA:CPU compiled the tiny
  model's init in 4.9 s with them, 2.4 s without. The threefry keys (jax's default) are hashed
  in Python integers (`threefry_fold_in`), equal to `jax.random.fold_in`'s: its eager dispatch
  per draw was 6% of the test suite's CPU time. Forks (dropout streams, which the model keeps
  and draws from in the train step) are plain `nnx.RngStream`s."""

  def __init__(self, key: jax.Array, *, tag: str):
    super().__init__(key, tag=tag)
    # The key's words as Python integers, read once (None: not a single threefry key).
    threefry = str(jax.random.key_impl(key)) == 'threefry2x32' and not key.shape
    with jax.ensure_compile_time_eval():   # also for a fork built under a trace
      self.key_words = (tuple(int(w) for w in np.asarray(jax.random.key_data(key)))
                        if threefry else None)

  def __call__(self) -> jax.Array:
    with jax.ensure_compile_time_eval():
      if self.key_words is None:
        return super().__call__()
      words = threefry_fold_in(self.key_words, int(self.count.get_value()))
      self.count[...] += 1
      return jax.random.wrap_key_data(np.asarray(words, np.uint32), impl='threefry2x32')

  def fork(self, **kwargs) -> nnx.RngStream:
    return nnx.RngStream(super().fork(**kwargs).key.get_value(), tag=self.tag)


_THREEFRY_ROTATIONS = ((13, 15, 26, 6), (17, 29, 16, 24))
_U32 = 0xFFFFFFFF


def threefry_fold_in(words: tuple[int, int], data: int) -> tuple[int, int]:
  """The key words of `jax.random.fold_in(key, data)` for a threefry2x32 key with words
  `words`, in Python integers: Threefry-2x32 (20 rounds, key injected every 4, as jax's
  `_threefry2x32_lowering`) of the counter words (0, data). data: 0 <= data < 2**32."""
  k0, k1 = words
  ks = (k0, k1, k0 ^ k1 ^ 0x1BD11BDA)
  x0, x1 = ks[0], (data + ks[1]) & _U32
  for i in range(5):
    for r in _THREEFRY_ROTATIONS[i % 2]:
      x0 = (x0 + x1) & _U32
      x1 = ((x1 << r) | (x1 >> (32 - r))) & _U32
      x1 ^= x0
    x0 = (x0 + ks[(i + 1) % 3]) & _U32
    x1 = (x1 + ks[(i + 2) % 3] + i + 1) & _U32
  return x0, x1


def init_rngs(seed: int) -> nnx.Rngs:
  """`nnx.Rngs(seed)` for building a model: the same keys, drawn on the host, so the model's
  init program holds only the draws of its weights (`_BuildStream`), and building under a trace
  (jit, eval_shape) stays linear in the model's size.

  Each draw of a plain `nnx.Rngs` updates a traced counter, and flax's update asks the new
  tracer for its `.sharding`; jax's "not available" error message behind that attribute walks
  the whole trace built so far, so tracing a model's construction grew quadratically (the
  full-size `init_state` took 45 s on CPU with it, 35 s without: benchmarks/startup.py). A
  numpy counter is never traced. Its reads hand out copies, because the trace holds on to the
  numpy constants it sees and the counter is updated in place. The model keeps no reference to
  these counters (dropout streams are forks).
  """
  with jax.ensure_compile_time_eval():   # the stream's key, too, is computed now
    rngs = nnx.Rngs(seed)
    # Set after construction: nnx.Rngs turns a stream it is given into a plain RngStream.
    rngs.default = _BuildStream(rngs.default.key.get_value(), tag='default')
  count = rngs.default.count
  count.set_raw_value(np.zeros(count.shape, np.uint32))
  count.set_metadata('on_get_value', lambda _, count: np.array(count))
  return rngs


def uniform(bound: float):
  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)
  return init


def xavier_uniform(fan_in: int, fan_out: int):
  """`nn.init.xavier_uniform_` for a matrix whose torch shape is `[fan_out, fan_in]`."""
  return uniform(math.sqrt(6.0 / (fan_in + fan_out)))


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def trunc_normal(key, shape, std: float = 0.02, dtype=jnp.float32):
  """timm's `trunc_normal_(std)`: the bounds are +-2 absolute, i.e. +-100 std at 0.02. Jitted
  so that eager model construction compiles one program per weight shape, not one per op."""
  return std * jax.random.truncated_normal(key, -2.0 / std, 2.0 / std, shape, dtype)


def kaiming_normal_fan_out(key, shape, dtype=jnp.float32):
  """`nn.init.kaiming_normal_(w, mode='fan_out', nonlinearity='relu')` of a conv kernel
  `[kh, kw, in, out]` (torchvision's and mmpose's ResNet init)."""
  kh, kw, _, out = shape
  return math.sqrt(2.0 / (out * kh * kw)) * jax.random.normal(key, shape, dtype)

"""Building blocks shared by every CapeNext sub-model, with PyTorch semantics.

All modules are batch-first. Linear layers are `Linear`, an `nnx.Linear` (kernel `[in, out]`)
with a backward pass arranged for speed, so an official PyTorch weight `W [out, in]` converts
as `kernel = W.T`.

Mixed precision: every layer computes in the dtype of its input (its float32 parameters are
cast at use, so their gradients come back float32), except where float32 is needed for
accuracy: LayerNorm / BatchNorm statistics and softmax run in float32 (float64 stays float64:
`at_least_float32`) and hand back the input dtype. A model therefore runs in bfloat16 when its
inputs are bfloat16 (`CapeNext` casts them to `CapeNextConfig.dtype`). `remat` wraps a block
call in `nnx.remat` (`CapeNextConfig.remat`).
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

LN_EPS = 1e-5  # PyTorch's LayerNorm default, used everywhere in CapeNext (Flax defaults to 1e-6).


# ----------------------------------------------------------------------------- initialisers
def init_rngs(seed: int) -> nnx.Rngs:
  """`nnx.Rngs(seed)` for building a model: the same keys, drawn with counters that live on
  the host, so building under a trace (jit, eval_shape) stays linear in the model's size.

  Each draw of a plain `nnx.Rngs` updates a traced counter, and flax's update asks the new
  tracer for its `.sharding`; jax's "not available" error message behind that attribute walks
  the whole trace built so far, so tracing a model's construction grew quadratically (the
  full-size `init_state` took 45 s on CPU with it, 35 s without: benchmarks/startup.py). A
  numpy counter is never traced. Its reads hand out copies, because the trace holds on to the
  numpy constants it sees and the counter is updated in place. The model keeps no reference to these counters (dropout streams are forks).
  """
  rngs = nnx.Rngs(seed)
  for _, stream in rngs.items():
    stream.count.set_raw_value(np.zeros(stream.count.shape, np.uint32))
    stream.count.set_metadata('on_get_value', lambda _, count: np.array(count))
  return rngs


def _uniform(bound: float):
  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)
  return init


def xavier_uniform(fan_in: int, fan_out: int):
  """`nn.init.xavier_uniform_` for a matrix whose torch shape is `[fan_out, fan_in]`."""
  return _uniform(math.sqrt(6.0 / (fan_in + fan_out)))


def linear(in_features: int, out_features: int, *, rngs: nnx.Rngs, use_bias: bool = True,
           init: str = 'torch', fan_out_for_xavier: int | None = None) -> Linear:
  """A `Linear` initialised as PyTorch would.

  init: 'torch' (nn.Linear default), 'xavier' (xavier-uniform weight, zero bias) or 'zeros'.
  fan_out_for_xavier: the fan-out xavier sees when the torch weight is a slice of a packed
    matrix (e.g. MHA `in_proj_weight [3E, E]` has fan_out 3E).
  """
  if init == 'torch':
    k_init = b_init = _uniform(1.0 / math.sqrt(in_features))
  elif init == 'xavier':
    k_init = xavier_uniform(in_features, fan_out_for_xavier or out_features)
    b_init = jax.nn.initializers.zeros
  elif init == 'zeros':
    k_init = b_init = jax.nn.initializers.zeros
  else:
    raise ValueError(f'unknown init {init!r}')
  return Linear(in_features, out_features, use_bias=use_bias, kernel_init=k_init,
                bias_init=b_init, rngs=rngs)


# ----------------------------------------------------------------------------- linear
class Linear(nnx.Linear):
  """`nnx.Linear` (same parameters, same forward) computed by `dense`, whose backward pass is
  written for speed, in the dtype of its input (the parameters are cast to it). nnx.Linear's
  dtype / dot_general options are not used by CapeNext and are ignored here."""

  def __call__(self, x: jax.Array) -> jax.Array:
    return dense(x, self.kernel[...].astype(x.dtype),
                 None if self.bias is None else self.bias[...].astype(x.dtype))


@jax.custom_vjp
def dense(x: jax.Array, kernel: jax.Array, bias: jax.Array | None) -> jax.Array:
  """x [..., in] @ kernel [in, out] (+ bias [out]) -> [..., out].

  Gradients equal autodiff's; the kernel gradient goes through `contract_tokens` and the bias
  gradient through `sum_rows` (XLA:CPU runs both far faster than autodiff's forms: a Swin-T
  training step got ~10% faster).
  """
  return _dense_fwd(x, kernel, bias)[0]


def _dense_fwd(x, kernel, bias):
  y = x @ kernel
  return (y if bias is None else y + bias), (x, kernel, bias)


def _dense_bwd(residuals, dy):
  x, kernel, bias = residuals
  x2, dy2 = x.reshape(-1, x.shape[-1]), dy.reshape(-1, dy.shape[-1])
  d_bias = None if bias is None else sum_rows(dy2)
  return dy @ kernel.T, contract_tokens(x2, dy2), d_bias


dense.defvjp(_dense_fwd, _dense_bwd)


def sum_rows(x: jax.Array) -> jax.Array:
  """x [R, C] summed over rows -> [C], as a ones-vector matrix product: the reduction that
  autodiff emits for a broadcast add ran at a fraction of memory speed on XLA:CPU."""
  return jnp.ones((x.shape[0],), x.dtype) @ x


def contract_tokens(a: jax.Array, b: jax.Array) -> jax.Array:
  """sum_t a[..., t, m] b[..., t, n] -> [..., m, n]: `swapaxes(a) @ b`, the backward-pass
  product that contracts over tokens (kernel gradients, attention's dV and dK).

  The contracted axis is the major one of both operands, so one of them has to be transposed.
  XLA:CPU transposed the larger one or handed the product to a slow generic matmul; on CPU the
  smaller operand (and then the small result) is transposed explicitly, behind barriers so
  XLA cannot fold the transposes back, and the product is an ordinary one. Other backends,
  whose matmuls read transposed operands natively, get the plain product.
  """
  def on_cpu(a, b):
    barrier, swap = jax.lax.optimization_barrier, lambda t: jnp.swapaxes(t, -1, -2)
    if a.shape[-1] <= b.shape[-1]:
      return barrier(swap(a)) @ b
    return swap(barrier(barrier(swap(b)) @ a))

  return jax.lax.platform_dependent(a, b, cpu=on_cpu,
                                    default=lambda a, b: jnp.swapaxes(a, -1, -2) @ b)


def to_input_dtype(args, *, dtype=None, inexact=True):
  """A `promote_dtype` for nnx layers (Conv): cast the parameters to the input's dtype
  (args[0]) instead of promoting the input to float32."""
  del dtype, inexact
  return tuple(None if a is None else jnp.asarray(a, args[0].dtype) for a in args)


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


# ----------------------------------------------------------------------------- remat
REMAT_NONE, REMAT_BLOCKS = 'none', 'blocks'


def remat_policy(remat: str):
  """The `jax.checkpoint` policy of a `CapeNextConfig.remat` value: 'blocks' saves nothing
  inside a block (only its inputs), any other name is a `jax.checkpoint_policies` member."""
  if remat == REMAT_BLOCKS:
    return jax.checkpoint_policies.nothing_saveable
  policy = getattr(jax.checkpoint_policies, remat, None)
  if remat.startswith('_') or not callable(policy):
    raise ValueError(f"remat {remat!r}: expected 'none', 'blocks' or a "
                     f'jax.checkpoint_policies name (e.g. dots_saveable)')
  return policy


def check_remat(remat: str) -> None:
  if remat != REMAT_NONE:
    remat_policy(remat)


def run_block(block: nnx.Module, *args, remat: str = REMAT_NONE):
  """`block(*args)`; under `nnx.remat` with `remat`'s policy unless it is 'none', so the
  backward pass recomputes the block's activations instead of keeping them."""
  if remat == REMAT_NONE:
    return block(*args)
  return nnx.remat(lambda m, *a: m(*a), policy=remat_policy(remat))(block, *args)


# ----------------------------------------------------------------------------- attention kernels
ATTENTION_AUTO, ATTENTION_REFERENCE = 'auto', 'reference'
ATTENTIONS = (ATTENTION_AUTO, ATTENTION_REFERENCE, 'fused', 'xla', 'cudnn')


def attention_implementation(attention: str) -> str | None:
  """What a `CapeNextConfig.attention` value runs: 'reference' (the hand-written attention,
  fastest on XLA:CPU), or the `implementation` argument of `jax.nn.dot_product_attention`
  (None: JAX picks, 'xla', 'cudnn'). 'auto' is the reference on CPU and None elsewhere
  (decided when tracing, by the default backend)."""
  if attention not in ATTENTIONS:
    raise ValueError(f'attention {attention!r}: expected one of {ATTENTIONS}')
  if attention == ATTENTION_AUTO:
    return ATTENTION_REFERENCE if jax.default_backend() == 'cpu' else None
  return None if attention == 'fused' else attention


# ----------------------------------------------------------------------------- activations
def gelu(x: jax.Array) -> jax.Array:
  """Exact GELU, written as `torch.nn.GELU()` computes it: x/2 * (1 + erf(x/sqrt 2)).

  (jax.nn.gelu defaults to the tanh approximation, and its exact form goes through erfc,
  which XLA:CPU evaluates with a slower exp-based branch.)
  """
  return 0.5 * x * (1.0 + jax.lax.erf(x * (1.0 / math.sqrt(2.0))))


def quick_gelu(x: jax.Array) -> jax.Array:
  """CLIP's QuickGELU: x * sigmoid(1.702 x)."""
  return x * jax.nn.sigmoid(1.702 * x)


# ----------------------------------------------------------------------------- attention
class MultiHeadAttention(nnx.Module):
  """`torch.nn.MultiheadAttention` (batch-first here) with separate q/k/v projections.

  The packed torch `in_proj_weight [3E, E]` splits into `q_proj`, `k_proj`, `v_proj`; when
  kdim or vdim differ from embed_dim torch stores them separately (`q_proj_weight` ...), which
  maps the same way. q is scaled by 1/sqrt(head_dim) after its projection and bias; heads are
  split channel-major (`c = h * head_dim + i`).

  Init follows torch: xavier-uniform projection weights (over the packed `[3E, E]` matrix when
  packed), zero projection biases, `out_proj` with nn.Linear's default weight and a zero bias.
  """

  def __init__(self, embed_dim: int, num_heads: int, *, kdim: int | None = None,
               vdim: int | None = None, dropout: float = 0.0, rngs: nnx.Rngs):
    if embed_dim % num_heads:
      raise ValueError(f'embed_dim {embed_dim} is not divisible by num_heads {num_heads}')
    kdim, vdim = kdim or embed_dim, vdim or embed_dim
    packed = kdim == embed_dim and vdim == embed_dim
    self.embed_dim, self.num_heads = embed_dim, num_heads
    self.head_dim = embed_dim // num_heads

    def proj(in_dim):
      fan_out = 3 * embed_dim if packed else embed_dim
      return linear(in_dim, embed_dim, rngs=rngs, init='xavier', fan_out_for_xavier=fan_out)

    self.q_proj, self.k_proj, self.v_proj = proj(embed_dim), proj(kdim), proj(vdim)
    self.out_proj = linear(embed_dim, embed_dim, rngs=rngs)
    self.out_proj.bias.value = jnp.zeros_like(self.out_proj.bias.value)
    self.attn_dropout = Dropout(dropout, rngs=rngs)

  def __call__(self, query: jax.Array, key: jax.Array, value: jax.Array, *,
               key_padding_mask: jax.Array | None = None,
               attn_mask: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """Attention of `query` over `key`/`value`.

    Args:
      query: [B, Lq, E]; key: [B, Lk, kdim]; value: [B, Lk, vdim].
      key_padding_mask: [B, Lk] bool, True = ignore that key (torch convention).
      attn_mask: [Lq, Lk] bool (True = ignore) or additive float mask.
    Returns:
      out [B, Lq, E] and the attention weights averaged over heads [B, Lq, Lk].
    """
    b, lq, _ = query.shape
    lk = key.shape[1]
    # Heads split channel-major, then moved before the tokens: [B, H, L, hd]. With the heads
    # between the token axes, XLA:CPU ran both attention products at about half speed.
    split = lambda t, l: t.reshape(b, l, self.num_heads, self.head_dim).transpose(0, 2, 1, 3)
    v = split(self.v_proj(value), lk)
    if lk == 1 and key_padding_mask is None and attn_mask is None:
      # Softmax over a single key is exactly 1 whatever q and k are (the fusion module's
      # cross-attentions): skip both projections. Dropout still acts on that weight.
      weights = jnp.ones((b, self.num_heads, lq, 1), v.dtype)
      return self._attend(weights, v, b, lq)
    q = split(self.q_proj(query), lq) * (1.0 / math.sqrt(self.head_dim))
    k = split(self.k_proj(key), lk)
    logits = jnp.einsum('bhqd,bhkd->bhqk', q, k, preferred_element_type=jnp.float32)
    if attn_mask is not None:
      if attn_mask.dtype == jnp.bool_:
        logits = jnp.where(attn_mask[None, None], -jnp.inf, logits)
      else:
        logits = logits + attn_mask[None, None]
    if key_padding_mask is not None:
      logits = jnp.where(key_padding_mask[:, None, None, :], -jnp.inf, logits)
    return self._attend(jax.nn.softmax(logits, axis=-1).astype(v.dtype), v, b, lq)

  def _attend(self, weights: jax.Array, v: jax.Array, b: int, lq: int):
    """weights [B, H, Lq, Lk] (before dropout), v [B, H, Lk, hd] -> (out, head-mean weights)."""
    mean_weights = weights.mean(axis=1)
    weights = self.attn_dropout(weights)
    out = jnp.einsum('bhqk,bhkd->bhqd', weights, v).transpose(0, 2, 1, 3)
    out = out.reshape(b, lq, self.embed_dim)
    return self.out_proj(out), mean_weights


# ----------------------------------------------------------------------------- dropout
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
    if self.deterministic or self.rate == 0.0:
      return x
    keep = 1.0 - self.rate
    bits = hash_bits(next_key(self.rngs), self.mask_shape(x))
    threshold = jnp.uint32(min(round(keep * 2.0**32), 2**32 - 1))
    return jnp.where(bits < threshold, x * (1.0 / keep), jnp.zeros_like(x))

  def mask_shape(self, x: jax.Array) -> tuple[int, ...]:
    """Shape of the keep decisions, broadcast against x."""
    return x.shape


# ----------------------------------------------------------------------------- stochastic depth
class DropPath(Dropout):
  """Per-sample stochastic depth (timm's `drop_path`): zero a sample's whole residual branch
  with probability `rate` and scale the kept ones by 1/(1-rate). Identity in eval mode."""

  def mask_shape(self, x: jax.Array) -> tuple[int, ...]:
    return (x.shape[0],) + (1,) * (x.ndim - 1)


# ----------------------------------------------------------------------------- convolutions
BN_EPS, BN_MOMENTUM = 1e-5, 0.1   # torch.nn.BatchNorm2d defaults


def patch_conv(in_channels: int, out_channels: int, patch: int, *, rngs: nnx.Rngs) -> nnx.Conv:
  """Non-overlapping patch conv (kernel = stride = patch) with PyTorch's Conv2d default init
  (Swin V2's and the ViTs' references leave their patch conv at it)."""
  bound = 1.0 / math.sqrt(in_channels * patch * patch)
  init = lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -bound, bound)
  return nnx.Conv(in_channels, out_channels, kernel_size=(patch, patch), strides=(patch, patch),
                  padding='VALID', kernel_init=init, bias_init=init,
                  promote_dtype=to_input_dtype, rngs=rngs)


def conv2d(in_channels: int, out_channels: int, kernel_size: int, *, rngs: nnx.Rngs,
           stride: int = 1, padding: int | None = None, use_bias: bool = False,
           kernel_init=None) -> nnx.Conv:
  """`torch.nn.Conv2d` on NHWC maps: symmetric zero padding (default (k - 1) // 2), kernel
  `[kh, kw, in, out]` (a torch weight `[out, in, kh, kw]` converts as `.transpose(2, 3, 1, 0)`).

  kernel_init: default torch's (uniform +-1/sqrt(fan_in)), which the bias always uses.
  """
  pad = (kernel_size - 1) // 2 if padding is None else padding
  bound = _uniform(1.0 / math.sqrt(in_channels * kernel_size * kernel_size))
  return nnx.Conv(in_channels, out_channels, kernel_size=(kernel_size, kernel_size),
                  strides=(stride, stride), padding=((pad, pad), (pad, pad)), use_bias=use_bias,
                  kernel_init=kernel_init or bound, bias_init=bound,
                  promote_dtype=to_input_dtype, rngs=rngs)


def kaiming_normal_fan_out(key, shape, dtype=jnp.float32):
  """`nn.init.kaiming_normal_(w, mode='fan_out', nonlinearity='relu')` of a conv kernel
  `[kh, kw, in, out]` (torchvision's and mmpose's ResNet init)."""
  kh, kw, _, out = shape
  return math.sqrt(2.0 / (out * kh * kw)) * jax.random.normal(key, shape, dtype)


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

"""Swin Transformer V2 image backbone (CapeNext's `backbone`, docs/MODEL.md §1.6).

Images are NHWC. Between stages tokens are a `[B, H, W, C]` grid (row-major, so a flattened
grid is exactly the official `[B, L, C]` token order). Inside a stage, off CPU, they are kept in window
order (`window_partition` flattened to `[B, L, C]`): the blocks' LayerNorms, MLPs and residuals
are token-wise, so only a shifted block moves tokens, by one constant permutation into the
shifted windows and its inverse back (`shift_permutation`, `token_permutation`), where the
official code rolls the grid and partitions it, then merges and rolls back, in every block
(`BasicLayer.token_order`: the window order off CPU, the official order on CPU).
Window attention works on all windows at once through reshapes; the position biases of a
stage's blocks come from one batched MLP (`stage_position_biases`); the shift masks,
relative-position tables, indices and permutations are numpy constants derived from the
config (never parameters).

Param tree (`nnx.to_pure_dict(nnx.state(model, nnx.Param))`), mirroring the official names:
  patch_embed.{proj (Conv), norm}
  layers[s].blocks[b].{norm1, norm2, mlp.{fc1, fc2},
                       attn.{logit_scale [h,1,1], q_bias, v_bias, qkv (no bias), proj,
                             cpb_mlp_0, cpb_mlp_2 (no bias)}}
  layers[s].downsample.{reduction (no bias), norm}      (every stage but the last)
  norm
"""
from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from capenext_jax.models import layers

CPB_HIDDEN = 512        # hidden width of the continuous position bias MLP (hard-coded upstream)
MASK_VALUE = -100.0     # additive logit between tokens of different shifted-window regions
MAX_LOGIT_SCALE = math.log(100.0)  # the official clamp, log(1 / 0.01)


@dataclasses.dataclass(frozen=True)
class SwinV2Config:
  """Swin-V2 sizes; the defaults are CapeNext's headline Swin-V2-T at 256 px."""
  img_size: int = 256
  patch_size: int = 4
  in_chans: int = 3
  embed_dim: int = 96
  depths: tuple[int, ...] = (2, 2, 6, 2)
  num_heads: tuple[int, ...] = (3, 6, 12, 24)
  window_size: int = 16
  mlp_ratio: float = 4.0
  drop_path_rate: float = 0.2
  pretrained_window_sizes: tuple[int, ...] = (0, 0, 0, 0)

  def __post_init__(self):
    n = len(self.depths)
    if len(self.num_heads) != n or len(self.pretrained_window_sizes) != n:
      raise ValueError(f'depths {self.depths}, num_heads {self.num_heads} and '
                       f'pretrained_window_sizes {self.pretrained_window_sizes} differ in length')
    if self.img_size % self.patch_size:
      raise ValueError(f'img_size {self.img_size} is not a multiple of patch_size {self.patch_size}')
    if (self.img_size // self.patch_size) % 2 ** (n - 1):
      raise ValueError(f'patch grid {self.img_size // self.patch_size} cannot be halved {n - 1} times')
    for s in range(n):
      dim, res, (window, _) = self.stage_dim(s), self.stage_resolution(s), self.stage_window(s)
      if dim % self.num_heads[s]:
        raise ValueError(f'stage {s}: dim {dim} is not divisible by num_heads {self.num_heads[s]}')
      if res % window:
        raise ValueError(f'stage {s}: resolution {res} is not a multiple of window_size {window}')
      if window < 2:
        # The official table divides by (window - 1): a 1x1 window gives NaN there.
        raise ValueError(f'stage {s}: window {window} < 2 is not supported')

  @property
  def num_features(self) -> int:
    """Channels of the last stage (8 * embed_dim for four stages)."""
    return self.stage_dim(len(self.depths) - 1)

  @property
  def output_resolution(self) -> int:
    """Side of the `__call__` feature map: last stage grid upsampled x2 (S / 16 for 4 stages)."""
    return 2 * self.stage_resolution(len(self.depths) - 1)

  def stage_dim(self, s: int) -> int:
    return self.embed_dim * 2 ** s

  def stage_resolution(self, s: int) -> int:
    """Token grid side at the input of stage s."""
    return self.img_size // self.patch_size // 2 ** s

  def stage_window(self, s: int) -> tuple[int, int]:
    """(window, shift of the odd blocks) of stage s: a grid no larger than the window is one
    unshifted window covering the grid."""
    res = self.stage_resolution(s)
    if res <= self.window_size:
      return res, 0
    return self.window_size, self.window_size // 2


# ----------------------------------------------------------------------------- constants
def window_partition(x, window: int):
  """[B, H, W, C] -> [B, nW, window*window, C], windows and their tokens row-major.
  Works on numpy and jax arrays alike."""
  b, h, w, c = x.shape
  x = x.reshape(b, h // window, window, w // window, window, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, (h // window) * (w // window), window * window, c)


def window_merge(x, window: int, h: int, w: int):
  """Inverse of `window_partition`: [B, nW, window*window, C] -> [B, H, W, C]."""
  b, _, _, c = x.shape
  x = x.reshape(b, h // window, w // window, window, window, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, h, w, c)


@functools.lru_cache(maxsize=None)
def relative_coords_table(window: int, pretrained_window: int = 0) -> np.ndarray:
  """Log-spaced relative offsets fed to the position-bias MLP.

  Returns float32 `[2w-1, 2w-1, 2]`: entry (a, b) holds (dh, dw) = (a - w + 1, b - w + 1)
  scaled to [-8, 8] by the (pretrained) window and mapped through sign(t) log2(|t| + 1) / 3.
  Computed in float32 as upstream so the table matches its buffer bit for bit.
  """
  offsets = np.arange(-(window - 1), window, dtype=np.float32)
  table = np.stack(np.meshgrid(offsets, offsets, indexing='ij'), axis=-1)
  span = (pretrained_window if pretrained_window > 0 else window) - 1
  table = table / np.float32(span) * np.float32(8)
  table = np.sign(table) * np.log2(np.abs(table) + np.float32(1)) / np.float32(3)
  return _frozen(table.astype(np.float32))


@functools.lru_cache(maxsize=None)
def relative_position_index(window: int) -> np.ndarray:
  """int64 `[N, N]` (N = window^2): row of the flattened coords table for each token pair,
  `(hi - hj + w - 1) * (2w - 1) + (wi - wj + w - 1)`."""
  hh, ww = np.meshgrid(np.arange(window), np.arange(window), indexing='ij')
  hh, ww = hh.reshape(-1), ww.reshape(-1)
  dh = hh[:, None] - hh[None, :] + window - 1
  dw = ww[:, None] - ww[None, :] + window - 1
  return _frozen((dh * (2 * window - 1) + dw).astype(np.int64))


@functools.lru_cache(maxsize=None)
def shifted_window_mask(resolution: int, window: int, shift: int) -> np.ndarray:
  """float32 `[nW, N, N]` additive mask of a shifted block: -100 between tokens that come from
  different regions of the rolled grid (they are not neighbours in the image), else 0."""
  region = np.zeros((1, resolution, resolution, 1), np.float32)
  bounds = (slice(0, -window), slice(-window, -shift), slice(-shift, None))
  for i, (hs, ws) in enumerate((hs, ws) for hs in bounds for ws in bounds):
    region[:, hs, ws, :] = i
  ids = window_partition(region, window)[0, :, :, 0]          # [nW, N]
  return _frozen(np.where(ids[:, None, :] != ids[:, :, None], MASK_VALUE, 0.0).astype(np.float32))


@functools.lru_cache(maxsize=None)
def shift_permutation(resolution: int, window: int, shift: int) -> tuple[np.ndarray, np.ndarray]:
  """(perm, inverse) int32 `[L]`, L = resolution^2: tokens in window order (the windows of the
  unshifted grid, `window_partition` flattened) indexed by `perm` are the tokens of the grid
  rolled by (-shift, -shift), in the window order of its partition; `inverse` undoes it."""
  grid = np.arange(resolution * resolution).reshape(1, resolution, resolution, 1)
  grid_of_window_order = window_partition(grid, window).reshape(-1)
  rolled = np.roll(grid, (-shift, -shift), axis=(1, 2))
  grid_of_shifted_order = window_partition(rolled, window).reshape(-1)
  window_order_of_grid = np.argsort(grid_of_window_order)
  perm = window_order_of_grid[grid_of_shifted_order].astype(np.int32)
  return _frozen(perm), _frozen(np.argsort(perm).astype(np.int32))


@functools.lru_cache(maxsize=None)
def token_permutation(resolution: int, window: int, shift: int, inverse: bool = False):
  """`permute(x [B, L, C]) -> x[:, perm]` for `shift_permutation`'s perm (its inverse when
  `inverse`), a gather whose gradient is the inverse gather (autodiff's would be a
  scatter-add)."""
  perm, inv = shift_permutation(resolution, window, shift)
  forward, backward = (inv, perm) if inverse else (perm, inv)

  @jax.custom_vjp
  def permute(x):
    return x[:, forward]

  permute.defvjp(lambda x: (permute(x), None), lambda _, d: (d[:, backward],))
  return permute


def _frozen(a: np.ndarray) -> np.ndarray:
  """Read-only, since the cached constants are shared by every caller."""
  a.setflags(write=False)
  return a


# ----------------------------------------------------------------------------- initialisers
def _zero_layer_norm(dim: int, *, rngs: nnx.Rngs) -> nnx.LayerNorm:
  """Res-post-norm LayerNorm, zeroed as by `_init_respostnorm` (blocks start as identities)."""
  norm = layers.layer_norm(dim, rngs=rngs)
  norm.scale.value = jnp.zeros_like(norm.scale.value)
  return norm


# ----------------------------------------------------------------------------- modules
class PatchEmbed(nnx.Module):
  """Non-overlapping patch conv then LayerNorm: [B, S, S, 3] -> [B, S/p, S/p, C]."""

  def __init__(self, config: SwinV2Config, *, rngs: nnx.Rngs):
    p = config.patch_size
    self.proj = layers.patch_conv(config.in_chans, config.embed_dim, p, rngs=rngs)
    self.norm = layers.layer_norm(config.embed_dim, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.norm(self.proj(x))


class WindowAttention(nnx.Module):
  """Cosine window self-attention with a continuous (MLP) relative position bias.

  `attention` (set by CapeNext from `CapeNextConfig.attention`) picks the kernel
  (`layers.attention_implementation`): 'reference' `biased_attention` (hand-written backward),
  else `fused_biased_attention` with that implementation ('cudnn': cuDNN's fused attention
  where it takes the call, XLA elsewhere; 'xla' / None: XLA). 'auto' is the reference on CPU,
  'cudnn' on CUDA GPUs, 'xla' elsewhere.
  """

  def __init__(self, dim: int, num_heads: int, window: int, pretrained_window: int, *,
               rngs: nnx.Rngs):
    self.num_heads, self.window, self.pretrained_window = num_heads, window, pretrained_window
    self.attention = layers.ATTENTION_AUTO
    self.logit_scale = nnx.Param(jnp.full((num_heads, 1, 1), math.log(10.0), jnp.float32))
    self.q_bias = nnx.Param(jnp.zeros((dim,), jnp.float32))
    self.v_bias = nnx.Param(jnp.zeros((dim,), jnp.float32))
    self.qkv = layers.trunc_normal_linear(dim, 3 * dim, use_bias=False, rngs=rngs)
    self.proj = layers.trunc_normal_linear(dim, dim, rngs=rngs)
    self.cpb_mlp_0 = layers.trunc_normal_linear(2, CPB_HIDDEN, rngs=rngs)
    self.cpb_mlp_2 = layers.trunc_normal_linear(CPB_HIDDEN, num_heads, use_bias=False, rngs=rngs)

  def position_bias(self) -> jax.Array:
    """[heads, N, N] bias 16 * sigmoid(cpb_mlp(table)) gathered per token pair."""
    table = jnp.asarray(relative_coords_table(self.window, self.pretrained_window))
    per_offset = self.cpb_mlp_2(jax.nn.relu(self.cpb_mlp_0(table.reshape(-1, 2))))
    n = self.window * self.window
    bias = per_offset[relative_position_index(self.window).reshape(-1)].reshape(n, n, -1)
    return 16.0 * jax.nn.sigmoid(bias.transpose(2, 0, 1))

  def __call__(self, x: jax.Array, mask: np.ndarray | None,
               position_bias: jax.Array | None = None) -> jax.Array:
    """x: [B, nW, N, C] windows; mask: [nW, N, N] additive or None; position_bias: this
    block's `position_bias()` when already computed (`stage_position_biases`).
    Returns [B, nW, N, C]."""
    if position_bias is None:
      position_bias = self.position_bias()
    b, nw, n, c = x.shape
    h = self.num_heads
    # The qkv Linear has no bias: upstream adds (q_bias, 0, v_bias), so k is never biased.
    # Given to `dense` as its bias, whose gradient is a matrix-vector product (the reduction
    # autodiff emits for a broadcast add ran far slower).
    bias = jnp.concatenate([self.q_bias.value, jnp.zeros_like(self.v_bias.value),
                            self.v_bias.value]).astype(x.dtype)
    qkv = layers.dense(x, self.qkv.kernel[...].astype(x.dtype), bias)
    qkv = qkv.reshape(b, nw, n, 3, h, c // h)
    # The per-head scale multiplies q (N*d values per head) rather than the logits (N*N):
    # the same product, but no pass over the large logits tensor, and its backward needs no
    # saved copy of the unscaled logits.
    scale = jnp.exp(jnp.minimum(self.logit_scale.value, MAX_LOGIT_SCALE))   # [h, 1, 1]
    mask = None if mask is None else jnp.asarray(mask)
    implementation = layers.attention_implementation(self.attention)
    if implementation == layers.ATTENTION_REFERENCE:
      # Head-major [3, B, nW, h, N, d]: every attention product is then a plain batched
      # matmul (with heads between window and token, XLA:CPU ran the logits product at half
      # speed).
      q, k, v = qkv.transpose(3, 0, 1, 4, 2, 5)
      q, k = layers.l2_normalize(q, scale), layers.l2_normalize(k)
      out = biased_attention(q, k, v, position_bias, mask).transpose(0, 1, 3, 2, 4)
    else:
      # Token-major [B, nW, N, h, d], the layout the qkv product writes (no transpose).
      q, k, v = (qkv[:, :, :, i] for i in range(3))
      q, k = layers.l2_normalize(q, scale.reshape(h, 1)), layers.l2_normalize(k)
      out = fused_biased_attention(q, k, v, position_bias, mask, implementation)
    return self.proj(out.reshape(b, nw, n, c))


def stage_position_biases(attentions: list[WindowAttention]) -> jax.Array:
  """[blocks, heads, N, N]: every block's `position_bias()` (one stage: same window, table
  and heads) from one batched MLP and one gather, instead of a matmul chain, a gather and its
  scatter-add backward per block. CPU computes them block by block as before (its numbers
  stay as they were); `stage_position_biases_batched` is the accelerators' form."""
  def per_block(_):
    return jnp.stack([a.position_bias() for a in attentions])

  return jax.lax.platform_dependent(jnp.zeros(()), cpu=per_block,
                                    default=lambda _: stage_position_biases_batched(attentions))


def stage_position_biases_batched(attentions: list[WindowAttention]) -> jax.Array:
  """`stage_position_biases` as batched products: 16 sigmoid(relu(T W0_b + b0_b) W2_b)
  gathered per token pair, for the blocks b at once."""
  first = attentions[0]
  table = jnp.asarray(relative_coords_table(first.window, first.pretrained_window)).reshape(-1, 2)
  w0 = jnp.stack([a.cpb_mlp_0.kernel[...] for a in attentions])     # [blocks, 2, hidden]
  b0 = jnp.stack([a.cpb_mlp_0.bias[...] for a in attentions])       # [blocks, hidden]
  w2 = jnp.stack([a.cpb_mlp_2.kernel[...] for a in attentions])     # [blocks, hidden, heads]
  hidden = jax.nn.relu(jnp.einsum('tk,bkh->bth', table, w0) + b0[:, None])
  per_offset = jnp.einsum('bth,bhn->btn', hidden, w2)                # [blocks, T, heads]
  n = first.window * first.window
  bias = per_offset[:, relative_position_index(first.window).reshape(-1)]
  bias = bias.reshape(len(attentions), n, n, -1).transpose(0, 3, 1, 2)
  return 16.0 * jax.nn.sigmoid(bias)


@jax.custom_vjp
def biased_attention(q: jax.Array, k: jax.Array, v: jax.Array, position_bias: jax.Array,
                     mask: jax.Array | None) -> jax.Array:
  """softmax(q k^T + position_bias + mask) v over all windows and heads at once.

  q, k, v: [B, nW, h, N, d]; position_bias: [h, N, N], shared by every window; mask: constant
  [nW, N, N] or None (no gradient). Returns [B, nW, h, N, d].

  The hand-written backward is the autodiff one, reorganised for XLA:CPU: the softmax term
  uses rowsum(dO * O) (d values per row) instead of rowsum(dP * P) (N values per row), dV and
  dK go through `layers.contract_tokens`, and the bias gradient, a sum over batch and windows,
  through `layers.sum_rows`. With the head-major layout this halves Swin attention's share
  of a CPU training step.
  """
  return _biased_attention_fwd(q, k, v, position_bias, mask)[0]


def _biased_attention_fwd(q, k, v, position_bias, mask):
  # Logits, softmax and the bias gradient in float32 whatever the dtype of q, k, v (the
  # products then read the weights and the logit gradient in that dtype).
  logits = jnp.einsum('bwhqd,bwhkd->bwhqk', q, k, preferred_element_type=jnp.float32)
  logits = logits + position_bias
  if mask is not None:
    logits = logits + mask[:, None]
  weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
  out = jnp.einsum('bwhqk,bwhkd->bwhqd', weights, v)
  return out, (q, k, v, weights, out)


def _biased_attention_bwd(residuals, d_out):
  q, k, v, weights, out = residuals
  d_v = layers.contract_tokens(weights, d_out)                      # P^T dO
  d_weights = jnp.einsum('bwhqd,bwhkd->bwhqk', d_out, v, preferred_element_type=jnp.float32)
  # Softmax backward: dL = P * (dP - rowsum(dP * P)), and rowsum(dP * P) = rowsum(dO * O).
  row = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1, keepdims=True)
  d_logits = weights.astype(jnp.float32) * (d_weights - row)
  bias_shape = d_logits.shape[2:]                                   # summed over batch, windows
  d_bias = layers.sum_rows(d_logits.reshape(-1, math.prod(bias_shape)))
  d_logits = d_logits.astype(q.dtype)
  d_q = jnp.einsum('bwhqk,bwhkd->bwhqd', d_logits, k)
  d_k = layers.contract_tokens(d_logits, q)                         # dL^T Q
  return d_q, d_k, d_v, d_bias.reshape(bias_shape), None


biased_attention.defvjp(_biased_attention_fwd, _biased_attention_bwd)


def fused_biased_attention(q: jax.Array, k: jax.Array, v: jax.Array, position_bias: jax.Array,
                           mask: jax.Array | None, implementation: str | None) -> jax.Array:
  """`biased_attention` through `layers.dot_product_attention` (cuDNN's fused attention on
  CUDA GPUs, with its logged XLA fallback; XLA elsewhere).

  q, k, v: [B, nW, N, h, d] (token-major, as the qkv product writes them); position_bias
  [h, N, N]; mask: constant [nW, N, N] or None. Windows are independent, like samples and
  heads. Without a mask they go into the batch axis ([B*nW, N, h, d], a free reshape) and the
  bias is the position bias alone, [1, h, N, N]. With the shifted-window mask they go into
  the heads axis ([B, N, nW*h, d], one transpose of q, k, v and out) so that the bias,
  position bias plus mask, stays one [1, nW*h, N, N] array shared by the batch rather than a
  per-sample copy. cuDNN adds the bias in q's dtype (bfloat16 in training: the position bias
  is at most 16, so its rounding is at most 2^-4) and returns its gradient, which flows back
  to the position-bias MLP. The logit scale is already in q, hence scale=1.
  Returns [B, nW, N, h, d].
  """
  b, nw, n, h, d = q.shape
  if mask is None:
    fold = lambda t: t.reshape(b * nw, n, h, d)
    out = layers.dot_product_attention(fold(q), fold(k), fold(v), bias=position_bias[None],
                                       scale=1.0, implementation=implementation,
                                       site=f'Swin window attention ({n} tokens, {h} heads)')
    return out.reshape(b, nw, n, h, d)
  fold = lambda t: t.transpose(0, 2, 1, 3, 4).reshape(b, n, nw * h, d)
  bias = (position_bias[None] + mask[:, None]).reshape(1, nw * h, n, n)
  out = layers.dot_product_attention(
      fold(q), fold(k), fold(v), bias=bias, scale=1.0, implementation=implementation,
      site=f'Swin shifted-window attention ({n} tokens, {nw}x{h} heads)')
  return out.reshape(b, n, nw, h, d).transpose(0, 2, 1, 3, 4)


class SwinBlock(nnx.Module):
  """Res-post-norm block: x + DropPath(LN1(attn(x))), then x + DropPath(LN2(mlp(x)))."""

  def __init__(self, config: SwinV2Config, stage: int, shifted: bool, drop_path: float, *,
               rngs: nnx.Rngs):
    dim = config.stage_dim(stage)
    self.resolution = config.stage_resolution(stage)
    self.window, shift = config.stage_window(stage)
    self.shift = shift if shifted else 0
    self.norm1 = _zero_layer_norm(dim, rngs=rngs)
    self.attn = WindowAttention(dim, config.num_heads[stage], self.window,
                                config.pretrained_window_sizes[stage], rngs=rngs)
    self.norm2 = _zero_layer_norm(dim, rngs=rngs)
    self.mlp = layers.Mlp(dim, int(dim * config.mlp_ratio), rngs=rngs)
    self.drop_path = layers.DropPath(drop_path, rngs=rngs)

  def __call__(self, x: jax.Array, position_bias: jax.Array | None = None) -> jax.Array:
    """x: [B, H, W, C] grid, or [B, L, C] tokens in window order (`window_partition` of the
    stage's grid, flattened) -> same shape; position_bias: the attention's, when already
    computed."""
    if x.ndim == 4:
      return self._on_grid(x)
    b, length, c = x.shape
    mask = None
    y = x
    if self.shift:
      y = token_permutation(self.resolution, self.window, self.shift)(y)
      mask = shifted_window_mask(self.resolution, self.window, self.shift)
    n = self.window * self.window
    y = self.attn(y.reshape(b, length // n, n, c), mask, position_bias).reshape(b, length, c)
    if self.shift:
      y = token_permutation(self.resolution, self.window, self.shift, inverse=True)(y)
    x = x + self.drop_path(self.norm1(y))
    return x + self.drop_path(self.norm2(self.mlp(x)))

  def _on_grid(self, x: jax.Array) -> jax.Array:
    """The official order: roll, partition, attend, merge, roll back (CPU's path)."""
    _, h, w, _ = x.shape
    mask = None
    y = x
    if self.shift:
      y = jnp.roll(y, (-self.shift, -self.shift), axis=(1, 2))
      mask = shifted_window_mask(self.resolution, self.window, self.shift)
    y = self.attn(window_partition(y, self.window), mask)
    y = window_merge(y, self.window, h, w)
    if self.shift:
      y = jnp.roll(y, (self.shift, self.shift), axis=(1, 2))
    x = x + self.drop_path(self.norm1(y))
    return x + self.drop_path(self.norm2(self.mlp(x)))


TOKEN_ORDERS = ('auto', 'grid', 'window')


class PatchMerging(nnx.Module):
  """2x2 neighbourhood to channels, Linear(4C -> 2C, no bias), then LN: [B,H,W,C] -> [B,H/2,W/2,2C]."""

  def __init__(self, dim: int, *, rngs: nnx.Rngs):
    self.reduction = layers.trunc_normal_linear(4 * dim, 2 * dim, use_bias=False, rngs=rngs)
    self.norm = layers.layer_norm(2 * dim, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    b, h, w, c = x.shape
    # Upstream concatenates (even row, even col), (odd, even), (even, odd), (odd, odd): the
    # column parity is the slower index, hence the (col, row) parity order below.
    x = x.reshape(b, h // 2, 2, w // 2, 2, c).transpose(0, 1, 3, 4, 2, 5)
    return self.norm(self.reduction(x.reshape(b, h // 2, w // 2, 4 * c)))


class BasicLayer(nnx.Module):
  """One stage: `depth` blocks (odd ones shifted) and the PatchMerging of non-final stages."""

  def __init__(self, config: SwinV2Config, stage: int, drop_paths: list[float], *,
               rngs: nnx.Rngs):
    self.blocks = nnx.List([SwinBlock(config, stage, shifted=bool(i % 2), drop_path=rate,
                                      rngs=rngs) for i, rate in enumerate(drop_paths)])
    last = stage == len(config.depths) - 1
    self.downsample = None if last else PatchMerging(config.stage_dim(stage), rngs=rngs)
    self.remat = layers.REMAT_NONE   # CapeNextConfig.remat, set by CapeNext
    # 'window': tokens in window order through the stage, one permutation per shifted block
    # and the position biases from one batched MLP; 'grid': the official order block by
    # block; 'auto' (default): 'grid' on CPU (its float32 and bfloat16 numbers stay as they
    # were: the other order rounds sums differently), 'window' elsewhere (decided when
    # tracing, by the default backend, as `layers.attention_implementation`).
    self.token_order = 'auto'

  def __call__(self, x: jax.Array) -> jax.Array:
    """x: [B, H, W, C] grid -> the next stage's grid (or this one's, for the last stage)."""
    if self.token_order not in TOKEN_ORDERS:
      raise ValueError(f'token_order {self.token_order!r}: expected one of {TOKEN_ORDERS}')
    if self.token_order == 'grid' or (self.token_order == 'auto'
                                      and layers.current_platform() == 'cpu'):
      for block in self.blocks:
        x = layers.run_block(block, x, remat=self.remat)
      return x if self.downsample is None else self.downsample(x)
    b, h, w, c = x.shape
    window = self.blocks[0].window
    biases = stage_position_biases([block.attn for block in self.blocks])
    tokens = window_partition(x, window).reshape(b, h * w, c)
    for block, bias in zip(self.blocks, biases):
      tokens = layers.run_block(block, tokens, bias, remat=self.remat)
    x = window_merge(tokens.reshape(b, -1, window * window, c), window, h, w)
    return x if self.downsample is None else self.downsample(x)


class SwinTransformerV2(nnx.Module):
  """Swin-V2 `forward_features` with bilinear x2 upsampling (no classifier head).

  `model(x)`: x [B, S, S, in_chans] NHWC -> [B, 2S/(p 2^(n-1)), same, num_features]
  ([B, 16, 16, 768] for the headline config). `model.forward_with_intermediates(x)` also
  returns the patch embedding and every stage output as official `[B, L, C]` tokens.
  """

  def __init__(self, config: SwinV2Config, *, rngs: nnx.Rngs):
    self.config = config
    self.patch_embed = PatchEmbed(config, rngs=rngs)
    # Stochastic depth grows linearly over all blocks of all stages.
    rates = np.linspace(0.0, config.drop_path_rate, sum(config.depths)).tolist()
    starts = np.cumsum((0,) + tuple(config.depths)).tolist()
    self.layers = nnx.List([
        BasicLayer(config, s, rates[starts[s]:starts[s + 1]], rngs=rngs)
        for s in range(len(config.depths))])
    self.norm = layers.layer_norm(config.num_features, rngs=rngs)

  def forward_with_intermediates(self, x: jax.Array) -> dict:
    """x: [B, S, S, in_chans] NHWC.

    Returns a dict with
      'patch_embed': [B, L0, C] tokens after the patch LayerNorm (row-major);
      'stages': list of [B, L, C] stage outputs (after their PatchMerging, if any);
      'out': [B, 2h, 2w, num_features] NHWC: final LN of the last stage ([B, h, w, C] grid), then
        the bilinear (half-pixel centres) x2 upsample.
    """
    size = self.config.img_size
    if x.ndim != 4 or x.shape[1:] != (size, size, self.config.in_chans):
      raise ValueError(f'expected images [B, {size}, {size}, {self.config.in_chans}] NHWC, '
                       f'got {x.shape}')
    tokens = lambda t: t.reshape(t.shape[0], -1, t.shape[-1])
    x = self.patch_embed(x)
    result = {'patch_embed': tokens(x), 'stages': []}
    for layer in self.layers:
      x = layer(x)
      result['stages'].append(tokens(x))
    x = self.norm(x)
    b, h, w, c = x.shape
    # For x2 upsampling jax's bilinear resize equals torch's align_corners=False Upsample.
    result['out'] = jax.image.resize(x, (b, 2 * h, 2 * w, c), method='bilinear')
    return result

  def __call__(self, x: jax.Array) -> jax.Array:
    """x: [B, S, S, in_chans] NHWC -> [B, S/16, S/16, num_features] (four stages)."""
    return self.forward_with_intermediates(x)['out']

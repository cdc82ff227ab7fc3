"""Attention: the choice of kernel (`CapeNextConfig.attention`), the fused-kernel call with its
cuDNN eligibility checks and XLA fallback, and torch's MultiheadAttention."""
from __future__ import annotations

import contextlib
import functools
import logging
import math

import jax
import jax.extend.backend
import jax.numpy as jnp
from flax import nnx

from capenext_jax.models.layers.dropout import Dropout
from capenext_jax.models.layers.linear import linear

ATTENTION_AUTO, ATTENTION_REFERENCE = 'auto', 'reference'
ATTENTIONS = (ATTENTION_AUTO, ATTENTION_REFERENCE, 'fused', 'xla', 'cudnn')
CUDNN_MIN_VERSION = 90000     # cuDNN 9: flash attention with a bias and its gradient
_CUDNN_DTYPES = (jnp.bfloat16, jnp.float16)

_log = logging.getLogger(__name__)
_logged: set[tuple[str, str]] = set()
_target_platform: str | None = None


@contextlib.contextmanager
def target_platform(platform: str):
  """Decide kernels for `platform` ('cuda', 'rocm', 'tpu', 'cpu') instead of the default
  backend's: for lowering a step for another platform (`lower(lowering_platforms=...)`), e.g.
  a CUDA step inspected on a CPU machine. Affects traces started inside the block."""
  global _target_platform
  previous, _target_platform = _target_platform, platform
  try:
    yield
  finally:
    _target_platform = previous


def current_platform() -> str:
  """'cpu', 'cuda', 'rocm', 'tpu' (or another backend name): the platform kernels are chosen
  for, `target_platform`'s when set, else the default backend's (a GPU is told apart by its
  platform version string, as jax's own cuDNN checks do)."""
  if _target_platform is not None:
    return _target_platform
  backend = jax.default_backend()
  if backend != 'gpu':
    return backend
  version = jax.extend.backend.get_backend().platform_version.lower()
  return 'rocm' if 'rocm' in version else 'cuda'


def attention_implementation(attention: str) -> str | None:
  """What a `CapeNextConfig.attention` value runs: 'reference' (the hand-written attention,
  fastest on XLA:CPU), or the `implementation` argument of `jax.nn.dot_product_attention`
  (None: JAX picks, which is its unfused XLA attention; 'xla'; 'cudnn': cuDNN's fused
  attention where `cudnn_refusal` finds nothing against the call, XLA elsewhere). 'auto' is the
  reference on CPU, 'cudnn' on CUDA GPUs and 'xla' elsewhere (TPU, ROCm), decided when tracing
  by `current_platform()`."""
  if attention not in ATTENTIONS:
    raise ValueError(f'attention {attention!r}: expected one of {ATTENTIONS}')
  if attention == ATTENTION_AUTO:
    platform = current_platform()
    if platform == 'cpu':
      return ATTENTION_REFERENCE
    return 'cudnn' if platform == 'cuda' else 'xla'
  return None if attention == 'fused' else attention


def cudnn_version() -> int | None:
  """The cuDNN version jax's fused attention checks at trace time (e.g. 90800), or None
  where jax finds no cuDNN (a machine without the CUDA plugin)."""
  try:
    from jax._src.cudnn import fused_attention_stablehlo   # private: where jax itself asks
    return int(fused_attention_stablehlo.check_cudnn_version())
  except Exception:  # noqa: BLE001 (RuntimeError without cuDNN; ImportError if jax moved it)
    return None


def _max_head_dim() -> int:
  """cuDNN's flash attention takes head dims up to 256 on Hopper and later, else 128."""
  try:
    from jax._src.cudnn import fused_attention_stablehlo
    return 256 if fused_attention_stablehlo.check_compute_capability('9.0') else 128
  except Exception:  # noqa: BLE001 (no GPU to ask, e.g. lowering for CUDA on a CPU)
    return 128


def cudnn_refusal(q: jax.Array, k: jax.Array, v: jax.Array, bias: jax.Array | None = None,
                  *, dropout: bool = False, mask: bool = False) -> str | None:
  """Why cuDNN's fused attention (as `jax.nn.dot_product_attention` calls it) cannot take
  this call, or None when it can. q [B, T, N, H], k / v [B, S, K, H]; bias broadcastable to
  [B, N, T, S]; `dropout`: the call drops out attention probabilities (jax's wrapper takes no
  dropout); `mask`: an explicit mask or additive mask the caller would have to pass.

  Mirrors jax's checks (jax/_src/cudnn/fused_attention_stablehlo.py: check_layout,
  check_is_flash_attention), which otherwise raise at trace time."""
  version = cudnn_version()
  if version is None:
    return 'cuDNN not detected'
  if version < CUDNN_MIN_VERSION:
    return f'cuDNN {version} < {CUDNN_MIN_VERSION}'
  if q.dtype not in _CUDNN_DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
    return f'dtype {q.dtype} (cuDNN takes bfloat16 / float16)'
  head_dim, h_max = q.shape[-1], _max_head_dim()
  if head_dim % 8 or head_dim > h_max or v.shape[-1] != head_dim:
    return f'head dim {head_dim} (cuDNN: a multiple of 8, at most {h_max})'
  t, s = q.shape[1], k.shape[1]
  if bias is not None:
    if bias.ndim != 4 or bias.shape[2:] != (t, s):
      return f'bias shape {bias.shape} for {t} queries x {s} keys'
    if t % 2 or s % 2:
      return f'odd sequence length with a bias ({t} x {s}; cuDNN needs even ones to train)'
  if dropout:
    return 'dropout on the attention probabilities (jax.nn.dot_product_attention has none)'
  if mask:
    return 'an explicit attention mask'
  return None


def log_fallback(site: str, reason: str) -> None:
  """One log line per (call site, reason) and process: at trace time, not per step."""
  if (site, reason) not in _logged:
    _logged.add((site, reason))
    _log.warning('attention %s: cuDNN cannot take this call (%s): XLA attention instead',
                 site, reason)


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, *,
                          implementation: str | None, site: str,
                          bias: jax.Array | None = None,
                          kv_lengths: jax.Array | None = None,
                          scale: float | None = None) -> jax.Array:
  """`jax.nn.dot_product_attention` with `implementation` ('cudnn', 'xla' or None) where
  'cudnn' falls back to XLA (one log line naming `site` and why) when `cudnn_refusal` finds
  the call unsupported, instead of raising at trace time.

  q [B, T, N, H], k / v [B, S, N, H]; bias broadcastable to [B, N, T, S] (cast to q's dtype
  for cuDNN, which adds it in that dtype; its gradient comes back in the bias' own dtype);
  kv_lengths [B] int32: only keys [0, length) of each sample count (cuDNN's padding mask).
  Returns [B, T, N, H] in q's dtype.
  """
  if implementation == 'cudnn':
    reason = cudnn_refusal(q, k, v, bias)
    if reason is None:
      bias = None if bias is None else bias.astype(q.dtype)
    else:
      log_fallback(site, reason)
      implementation = 'xla'
  return jax.nn.dot_product_attention(q, k, v, bias=bias, scale=scale,
                                      key_value_seq_lengths=kv_lengths,
                                      implementation=implementation)


def valid_keys_first(key_padding_mask: jax.Array, *keys: jax.Array):
  """Reorder each sample's keys so its valid ones come first (a stable sort on the mask), for
  a kernel that takes key padding as lengths. Attention is invariant under a permutation of
  its keys (with the values permuted alike), so the result is exact.

  key_padding_mask [B, S] bool, True = ignore; keys: arrays [B, S, ...]. Returns
  (lengths [B] int32, the reordered arrays...)."""
  order = jnp.argsort(key_padding_mask, axis=1, stable=True)
  lengths = jnp.sum(~key_padding_mask, axis=1).astype(jnp.int32)
  gather = lambda t: jnp.take_along_axis(t, order.reshape(order.shape + (1,) * (t.ndim - 2)),
                                         axis=1)
  return (lengths, *(gather(t) for t in keys))


class MultiHeadAttention(nnx.Module):
  """`torch.nn.MultiheadAttention` (batch-first here) with separate q/k/v projections.

  The packed torch `in_proj_weight [3E, E]` splits into `q_proj`, `k_proj`, `v_proj`; when
  kdim or vdim differ from embed_dim torch stores them separately (`q_proj_weight` ...), which
  maps the same way. q is scaled by 1/sqrt(head_dim) after its projection and bias; heads are
  split channel-major (`c = h * head_dim + i`).

  Init follows torch: xavier-uniform projection weights (over the packed `[3E, E]` matrix when
  packed), zero projection biases, `out_proj` with nn.Linear's default weight and a zero bias.

  `attention` (set by CapeNext from `CapeNextConfig.attention`): where it resolves to 'cudnn'
  (CUDA GPUs under 'auto'), calls without an `attn_mask` and without active dropout on the
  probabilities run cuDNN's fused attention, key padding as sequence lengths after moving each
  sample's valid keys first (`valid_keys_first`, exact). Training with attention dropout keeps
  the explicit softmax: jax's fused-attention call has no dropout, and dropping out the output
  or the logits instead would be a different model. Everything else runs the explicit softmax
  (XLA attention off CPU).
  """

  def __init__(self, embed_dim: int, num_heads: int, *, kdim: int | None = None,
               vdim: int | None = None, dropout: float = 0.0, rngs: nnx.Rngs):
    if embed_dim % num_heads:
      raise ValueError(f'embed_dim {embed_dim} is not divisible by num_heads {num_heads}')
    kdim, vdim = kdim or embed_dim, vdim or embed_dim
    packed = kdim == embed_dim and vdim == embed_dim
    self.embed_dim, self.num_heads = embed_dim, num_heads
    self.head_dim = embed_dim // num_heads
    self.attention = ATTENTION_AUTO

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
      out [B, Lq, E] and the attention weights averaged over heads [B, Lq, Lk] (on the
      fused path computed apart, so a caller that drops them costs nothing).
    """
    b, lq, _ = query.shape
    lk = key.shape[1]
    # Heads split channel-major, then moved before the tokens: [B, H, L, hd]. (With the heads
    # between the token axes, XLA:CPU ran both attention products at about half speed.)
    split = lambda t, l: t.reshape(b, l, self.num_heads, self.head_dim)
    heads_first = lambda t: t.transpose(0, 2, 1, 3)
    merge = lambda out: self.out_proj(heads_first(out).reshape(b, lq, self.embed_dim))
    scale = 1.0 / math.sqrt(self.head_dim)
    v = split(self.v_proj(value), lk)
    if lk == 1 and key_padding_mask is None and attn_mask is None:
      # Softmax over a single key is exactly 1 whatever q and k are (the fusion module's
      # cross-attentions): skip both projections. Dropout still acts on that weight.
      weights = jnp.ones((b, self.num_heads, lq, 1), v.dtype)
      out = jnp.einsum('bhqk,bhkd->bhqd', self.attn_dropout(weights), heads_first(v))
      return merge(out), weights.mean(axis=1)
    q, k = split(self.q_proj(query), lq), split(self.k_proj(key), lk)
    if attention_implementation(self.attention) == 'cudnn':
      site = f'MultiHeadAttention(E={self.embed_dim}, heads={self.num_heads}, {lq}x{lk})'
      dropout = self.attn_dropout.rate > 0 and not self.attn_dropout.deterministic
      reason = cudnn_refusal(q, k, v, dropout=dropout, mask=attn_mask is not None)
      if reason is None:
        lengths, fk, fv = (None, k, v) if key_padding_mask is None else valid_keys_first(
            key_padding_mask, k, v)
        out = dot_product_attention(q, fk, fv, implementation='cudnn', site=site,
                                    kv_lengths=lengths, scale=scale)
        # The head-mean weights apart (a caller that drops them costs nothing).
        probs = attention_probabilities(heads_first(q) * scale, heads_first(k),
                                        key_padding_mask)
        return (self.out_proj(out.reshape(b, lq, self.embed_dim)),
                probs.astype(q.dtype).mean(axis=1))
      log_fallback(site, reason)
    keep = self.attn_dropout.keep_mask((b, self.num_heads, lq, lk))
    out, mean_weights = softmax_attention(
        heads_first(q) * scale, heads_first(k), heads_first(v), key_padding_mask, keep,
        self.attn_dropout.rate, attn_mask=attn_mask)
    return merge(out), mean_weights


def attention_probabilities(q: jax.Array, k: jax.Array, key_padding_mask: jax.Array | None,
                            attn_mask: jax.Array | None = None) -> jax.Array:
  """float32 (at least) softmax(q k^T + mask) [B, H, Lq, Lk] of q [B, H, Lq, d] (already
  scaled) and k [B, H, Lk, d]; key_padding_mask [B, Lk] bool (True = ignore) or None;
  attn_mask [Lq, Lk] bool (True = ignore) or additive float, or None."""
  logits = jnp.einsum('bhqd,bhkd->bhqk', q, k, preferred_element_type=jnp.float32)
  if attn_mask is not None:
    if attn_mask.dtype == jnp.bool_:
      logits = jnp.where(attn_mask[None, None], -jnp.inf, logits)
    else:
      logits = logits + attn_mask[None, None]
  if key_padding_mask is not None:
    logits = jnp.where(key_padding_mask[:, None, None, :], -jnp.inf, logits)
  return jax.nn.softmax(logits, axis=-1)


def softmax_attention(q: jax.Array, k: jax.Array, v: jax.Array,
                      key_padding_mask: jax.Array | None, keep: jax.Array | None,
                      rate: float, *, attn_mask: jax.Array | None = None
                      ) -> tuple[jax.Array, jax.Array]:
  """Explicit-softmax attention with dropout on the probabilities, and a hand-written backward.

  q [B, H, Lq, d] (already scaled), k [B, H, Lk, d], v [B, H, Lk, dv]; key_padding_mask
  [B, Lk] bool (True = ignore) or None; keep: bool [B, H, Lq, Lk] dropout decisions or None
  (no dropout), `rate` their drop probability; attn_mask [Lq, Lk] bool (True = ignore) or
  additive float (it gets its gradient), or None. Returns (out [B, H, Lq, dv], the
  probabilities before dropout averaged over heads [B, Lq, Lk]), both in q's dtype. Logits and
  softmax are float32 (at least): `attention_probabilities`, which also gives the cuDNN path's
  head-mean weights.

  The backward keeps the float32 probabilities (as autodiff did) and the dropped-out ones the
  forward writes anyway (in q's dtype), and its two logit products read the logit gradient in
  q's dtype, as flash attention's backward does: autodiff multiplied
  float32 copies of it and of q and k, the largest tensors of a bfloat16 step's head backward.
  In float32 it is autodiff's arithmetic up to rounding. A dropped-out probability that is 0
  stands for a dropped element without harm where the probability itself rounded to 0: the
  softmax gradient multiplies by it. (Row sums from rowsum(dO * O), flash attention's other
  saving, were tried: with O rounded to bfloat16 they doubled the bfloat16 gradients' error.)
  """
  return _softmax_attention(q, k, v, key_padding_mask, attn_mask, keep,
                            0.0 if keep is None else rate)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def _softmax_attention(q, k, v, key_padding_mask, attn_mask, keep, rate):
  return _attention_forward(q, k, v, key_padding_mask, attn_mask, keep, rate)[0]


def _attention_forward(q, k, v, key_padding_mask, attn_mask, keep, rate):
  exact_probs = attention_probabilities(q, k, key_padding_mask, attn_mask)
  probs = exact_probs.astype(q.dtype)
  dropped = probs if keep is None else jnp.where(keep, probs * (1.0 / (1.0 - rate)),
                                                 jnp.zeros_like(probs))
  out = jnp.einsum('bhqk,bhkd->bhqd', dropped, v)
  return (out, probs.mean(axis=1)), (q, k, v, attn_mask, exact_probs, dropped)


def _softmax_attention_fwd(q, k, v, key_padding_mask, attn_mask, keep, rate):
  # symbolic_zeros: the primals come wrapped (`.value`), so that the backward can tell an
  # unused head-mean output (the usual case) from a zero one and skip its terms.
  value = lambda a: None if a is None else a.value
  return _attention_forward(value(q), value(k), value(v), value(key_padding_mask),
                            value(attn_mask), value(keep), rate)


def _softmax_attention_bwd(rate, residuals, cotangents):
  q, k, v, attn_mask, exact_probs, dropped = residuals
  d_out, d_mean = (None if isinstance(c, jax.custom_derivatives.SymbolicZero) else c
                   for c in cotangents)
  acc = jnp.promote_types(q.dtype, jnp.float32)
  p = exact_probs.astype(acc)
  d_probs = jnp.zeros((), acc)      # dL/d(probabilities before dropout)
  row_sums = jnp.zeros((), acc)     # sum_k p_k * d_probs_k, per row
  dv = jnp.zeros_like(v)
  if d_out is not None:
    d_dropped = jnp.einsum('bhqd,bhkd->bhqk', d_out, v)
    d_kept = d_dropped if rate == 0.0 else jnp.where(
        dropped != 0, d_dropped * (1.0 / (1.0 - rate)), jnp.zeros_like(d_dropped))
    d_probs = d_kept.astype(acc)
    row_sums = jnp.sum(p * d_probs, axis=-1, keepdims=True)
    dv = jnp.einsum('bhqk,bhqd->bhkd', dropped, d_out).astype(v.dtype)
  if d_mean is not None:
    share = d_mean[:, None].astype(acc) / p.shape[1]
    d_probs = d_probs + share
    row_sums = row_sums + jnp.sum(p * share, axis=-1, keepdims=True)
  d_logits = p * (d_probs - row_sums)
  d_mask = None    # a boolean mask (or none) has no gradient; an additive one sums the logits'
  if attn_mask is not None and attn_mask.dtype != jnp.bool_:
    d_mask = jnp.sum(d_logits, axis=(0, 1)).astype(attn_mask.dtype)
  # Products in q's dtype: a bfloat16 matmul accumulates in float32 on every backend.
  d_logits = d_logits.astype(q.dtype)
  dq = jnp.einsum('bhqk,bhkd->bhqd', d_logits, k)
  dk = jnp.einsum('bhqk,bhqd->bhkd', d_logits, q)
  return dq, dk, dv, None, d_mask, None


_softmax_attention.defvjp(_softmax_attention_fwd, _softmax_attention_bwd, symbolic_zeros=True)

"""Attention: the choice of kernel (`CapeNextConfig.attention`) and torch's MultiheadAttention."""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from capenext_jax.models.layers.dropout import Dropout
from capenext_jax.models.layers.linear import linear

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

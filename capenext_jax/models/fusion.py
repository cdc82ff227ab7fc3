"""CapeNext's multi-modal fusion (official `SimpleMultiModalModule`, docs/MODEL.md §1.5).

The per-keypoint CLIP text embeddings are enriched with two per-sample vectors, the CLIP
category-prompt embedding and the CLIP query-image embedding:

  1. X = [C; I]  (token 0 category, token 1 image), self-attention layer, then
     X = norm1(X + Dropout(inter_ffn(X)));
  2. T = text_cross_attention_layer(J, C'), V = image_cross_attention_layer(J, I'): each joint
     attends to a single key, so in eval the result is the same vector for every joint;
  3. Wf = sigmoid(weight_category(T)) * T + sigmoid(weight_image(V)) * V;
  4. W2 = norm2(Wf + Dropout(weighted_ffn(Wf)));  J' = norm3(J + Dropout(W2)).

Joints never interact, so masked (zero) rows cannot affect valid rows; they do come out
non-zero, and the pose head multiplies them by the support mask again.

Ablations (`use_category` / `use_image`, not in the official code): the missing stream is
removed everywhere rather than replaced by a constant. Its token leaves the stack of step 1
(the remaining single token attends to itself, with weight 1), its cross-attention layer and
its gate are not built (so they have no parameters), and step 3 keeps only the present term,
`Wf = sigmoid(w_s(S)) * S`. Steps 1, 2 (for the present stream) and 4 are unchanged.

The official module also defines `non_linear` (never called; not built here, the converter
skips its keys) and debug bookkeeping (cosine scores and a print; dropped, it has no effect on
outputs and crashes in training).
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from capenext_jax.models import layers


@dataclasses.dataclass(frozen=True)
class FusionConfig:
  embed_dim: int = 512
  num_heads: int = 8
  dropout: float = 0.1
  use_category: bool = True  # False: the "without category text" ablation
  use_image: bool = True     # False: the "without query image" ablation


class FeedForward(nnx.Module):
  """Linear(E -> 4E), ReLU, Dropout, Linear(4E -> E), PyTorch default inits."""

  def __init__(self, dim: int, dropout: float, *, rngs: nnx.Rngs):
    self.fc1 = layers.linear(dim, 4 * dim, rngs=rngs)
    self.fc2 = layers.linear(4 * dim, dim, rngs=rngs)
    self.dropout = layers.Dropout(dropout, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.fc2(self.dropout(jax.nn.relu(self.fc1(x))))


class AttentionLayer(nnx.Module):
  """Official `AttentionLayer`: attention, norm1, FFN, norm2.

  The FFN residual adds to the layer's *input* `query`, not to the attention-updated tensor,
  so the attention result reaches the output only through the FFN (docs/MODEL.md §8.1 item 6).
  """

  def __init__(self, dim: int, num_heads: int, dropout: float, *, rngs: nnx.Rngs):
    self.attn = layers.MultiHeadAttention(dim, num_heads, dropout=dropout, rngs=rngs)
    self.norm1 = layers.layer_norm(dim, rngs=rngs)
    self.norm2 = layers.layer_norm(dim, rngs=rngs)
    self.ffn = FeedForward(dim, dropout, rngs=rngs)
    # One instance used twice, as in the official layer; every call draws a fresh mask.
    self.dropout = layers.Dropout(dropout, rngs=rngs)

  def __call__(self, query: jax.Array, key: jax.Array) -> jax.Array:
    """query [B, n, E], key (= value) [B, m, E] -> [B, n, E]."""
    attended, _ = self.attn(query, key, key)
    h = self.norm1(query + self.dropout(attended))
    return self.norm2(query + self.dropout(self.ffn(h)))


class MultiModalFusion(nnx.Module):
  """`SimpleMultiModalModule` (see the module docstring), batch-first."""

  def __init__(self, config: FusionConfig = FusionConfig(), *, rngs: nnx.Rngs):
    if not (config.use_category or config.use_image):
      raise ValueError('FusionConfig: at least one of use_category / use_image must be True')
    self.config = config
    e, h, p = config.embed_dim, config.num_heads, config.dropout
    self.inter_attention_layer = AttentionLayer(e, h, p, rngs=rngs)
    self.text_cross_attention_layer = (
        AttentionLayer(e, h, p, rngs=rngs) if config.use_category else None)
    self.image_cross_attention_layer = (
        AttentionLayer(e, h, p, rngs=rngs) if config.use_image else None)
    self.norm1 = layers.layer_norm(e, rngs=rngs)
    self.norm2 = layers.layer_norm(e, rngs=rngs)
    self.norm3 = layers.layer_norm(e, rngs=rngs)
    self.weight_category = layers.linear(e, 1, rngs=rngs) if config.use_category else None
    self.weight_image = layers.linear(e, 1, rngs=rngs) if config.use_image else None
    self.inter_ffn = FeedForward(e, p, rngs=rngs)
    self.weighted_ffn = FeedForward(e, p, rngs=rngs)
    self.dropout = layers.Dropout(p, rngs=rngs)

  def __call__(self, image_emb: jax.Array, joint_text: jax.Array,
               category_emb: jax.Array) -> jax.Array:
    """image_emb [B, E], joint_text [B, N, E], category_emb [B, E] -> fused text [B, N, E]."""
    tokens = []
    if self.config.use_category:
      tokens.append(category_emb[:, None])
    if self.config.use_image:
      tokens.append(image_emb[:, None])
    x = jnp.concatenate(tokens, axis=1)                     # [B, 1 or 2, E]
    x = self.inter_attention_layer(x, x)
    x = self.norm1(x + self.dropout(self.inter_ffn(x)))

    fused = 0.0
    slot = 0
    if self.config.use_category:
      t = self.text_cross_attention_layer(joint_text, x[:, slot:slot + 1])
      fused = fused + jax.nn.sigmoid(self.weight_category(t)) * t
      slot += 1
    if self.config.use_image:
      v = self.image_cross_attention_layer(joint_text, x[:, slot:slot + 1])
      fused = fused + jax.nn.sigmoid(self.weight_image(v)) * v
    fused = self.norm2(fused + self.dropout(self.weighted_ffn(fused)))
    return self.norm3(joint_text + self.dropout(fused))

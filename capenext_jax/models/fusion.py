"""CapeNext's multi-modal fusion and the official ablation variants (docs/MODEL.md §1.5).

`FusionConfig.module` names the official class of `fuse_feature_module.py` (selected there by
`additional_module_cfg['module_name']`, `configs/info.py`); `build_fusion` builds our port. All
take (image_emb [B, E], joint_text [B, N, E], category_emb [B, E]) and return [B, N, E]; the
variants that do not read an input ignore it.

`SimpleMultiModalModule` (the paper's model): the per-keypoint CLIP text embeddings are
enriched with two per-sample vectors, the CLIP category-prompt embedding and the CLIP
query-image embedding:

  1. X = [C; I]  (token 0 category, token 1 image), self-attention layer, then
     X = norm1(X + Dropout(inter_ffn(X)));
  2. T = text_cross_attention_layer(J, C'), V = image_cross_attention_layer(J, I'): each joint
     attends to a single key, so in eval the result is the same vector for every joint;
  3. Wf = sigmoid(weight_category(T)) * T + sigmoid(weight_image(V)) * V;
  4. W2 = norm2(Wf + Dropout(weighted_ffn(Wf)));  J' = norm3(J + Dropout(W2)).

Joints never interact, so masked (zero) rows cannot affect valid rows; they do come out
non-zero, and the pose head multiplies them by the support mask again.

The ablations, each the official class of that name:
- `SimpleMultiModalWithoutCategoryTextEmbedding` / `...WithoutQueryImgEmbedding`: one stream
  removed everywhere. Its token leaves the stack of step 1 (the remaining single token attends
  to itself, with weight 1), its cross-attention layer and gate are not built, and step 3 keeps
  only `sigmoid(w_s(S)) * S` (the official gate of the category-only variant is named
  `weight_text`; the converter maps it to our `weight_category`).
- `SimpleMultiModalDoubleEncoder`: two `SimpleMultiModalModule`s in a row, the second reading
  the first's joint output (same image and category inputs).
- `SimpleMultiModalTripleEncoder`: the official forward applies `encoder_layer1`, then
  `encoder_layer2` *twice*; its `encoder_layer3` is built but never called. We reproduce the
  forward and do not build the unused layer (the converter skips its keys, as `non_linear`).
- `CrossAttentionLayer`: the joints attend to the query-image embedding alone (one key):
  J' = norm2(Dropout(ffn(norm1(J + Dropout(attn(J, I)))))), with no residual around the FFN.
  `CrossAttentionEncoder`: three of them in a row, each attending to the same image embedding.
  The official detector cannot run these two (they lack the `process` method it calls); the
  wiring here (image embedding as the single key / value, per their `func_args`) is the one
  their parity fixtures use.

Not ported: `SimpleTransformerEncoder`. No official configuration can build or run it: the
detector refuses the name (it is missing from the `available_module_args` registry of
configs/info.py, whose nearby entry `SimpleTransformerEncoderLayer` names no class), and every
call of the class raises (its attention layer, `non_linear` and `norm1` are built at embed_dim
but fed the 2*embed_dim concatenation of image and category). There is no model to reproduce.
The official modules also define `non_linear` (never called; not built here, the converter
skips its keys) and debug bookkeeping (cosine scores and a print; dropped, it has no effect on
outputs and crashes in training).
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from capenext_jax.models import layers


SIMPLE = 'SimpleMultiModalModule'
WITHOUT_CATEGORY = 'SimpleMultiModalWithoutCategoryTextEmbedding'
WITHOUT_IMAGE = 'SimpleMultiModalWithoutQueryImgEmbedding'
# Stacked variants: which of the stacked modules the forward applies, in order (1-based, as the
# official attribute names encoder_layer1, encoder_layer2).
STACKS = {'SimpleMultiModalDoubleEncoder': (1, 2), 'SimpleMultiModalTripleEncoder': (1, 2, 2)}
CROSS_ATTENTION_LAYER = 'CrossAttentionLayer'
CROSS_ATTENTION_ENCODER = 'CrossAttentionEncoder'
CROSS_ATTENTION_ENCODER_LAYERS = 3   # the official `available_module_args` num_layers
MODULES = (SIMPLE, *STACKS, WITHOUT_CATEGORY, WITHOUT_IMAGE, CROSS_ATTENTION_LAYER,
           CROSS_ATTENTION_ENCODER)


@dataclasses.dataclass(frozen=True)
class FusionConfig:
  embed_dim: int = 512
  num_heads: int = 8
  dropout: float = 0.1
  module: str = SIMPLE   # the official class name (one of MODULES)

  def __post_init__(self):
    if self.module == 'SimpleTransformerEncoder':
      raise ValueError('fusion module SimpleTransformerEncoder is not available: the official '
                       'detector refuses the name (not in configs/info.py) and the class raises '
                       'on every input (layers built for embed_dim features are fed the '
                       '2*embed_dim concatenation of the image and category embeddings), so no '
                       f'model of it exists to reproduce; expected one of {", ".join(MODULES)}')
    if self.module not in MODULES:
      raise ValueError(f'fusion module {self.module!r}: expected one of {", ".join(MODULES)}')

  @property
  def uses_category(self) -> bool:
    """Whether the module reads the category-prompt embedding."""
    return self.module not in (WITHOUT_CATEGORY, CROSS_ATTENTION_LAYER, CROSS_ATTENTION_ENCODER)

  @property
  def uses_image(self) -> bool:
    """Whether the module reads the query-image embedding."""
    return self.module != WITHOUT_IMAGE

  @staticmethod
  def upgrade(d: dict) -> dict:
    """A fusion config dict written before `module` existed -> today's fields: the ablation
    switches `use_category` / `use_image` become the official class names they equal."""
    d = dict(d)
    use_category, use_image = d.pop('use_category', True), d.pop('use_image', True)
    if not (use_category or use_image):
      raise ValueError('fusion config: use_category and use_image are both false')
    if not (use_category and use_image):
      d['module'] = WITHOUT_IMAGE if use_category else WITHOUT_CATEGORY
    return d


class FeedForward(nnx.Module):
  """Linear(E -> 4E), ReLU, Dropout, Linear(4E -> E), PyTorch default inits."""

  def __init__(self, dim: int, dropout: float, *, rngs: nnx.Rngs):
    self.fc1 = layers.linear(dim, 4 * dim, rngs=rngs)
    self.fc2 = layers.linear(4 * dim, dim, rngs=rngs)
    self.dropout = layers.Dropout(dropout, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.fc2(self.dropout(jax.nn.relu(self.fc1(x))))


class AttentionLayer(nnx.Module):
  """Official `AttentionLayer`: attention, norm1, FFN, norm2; or with ffn_residual=False the
  official `CrossAttentionLayer` (same parameters).

  The FFN residual adds to the layer's *input* `query`, not to the attention-updated tensor,
  so the attention result reaches the output only through the FFN (docs/MODEL.md §8.1 item 6).
  `CrossAttentionLayer` normalises the dropped-out FFN output without any residual.
  """

  def __init__(self, dim: int, num_heads: int, dropout: float, *, rngs: nnx.Rngs,
               ffn_residual: bool = True):
    self.ffn_residual = ffn_residual
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
    out = self.dropout(self.ffn(h))
    return self.norm2(query + out if self.ffn_residual else out)


class MultiModalFusion(nnx.Module):
  """`SimpleMultiModalModule` and its two one-stream ablations (module docstring), batch-first."""

  def __init__(self, config: FusionConfig = FusionConfig(), *, rngs: nnx.Rngs):
    if config.module not in (SIMPLE, WITHOUT_CATEGORY, WITHOUT_IMAGE):
      raise ValueError(f'MultiModalFusion builds {SIMPLE} and its one-stream ablations, not '
                       f'{config.module} (use build_fusion)')
    self.config = config
    e, h, p = config.embed_dim, config.num_heads, config.dropout
    use_category, use_image = config.uses_category, config.uses_image
    self.inter_attention_layer = AttentionLayer(e, h, p, rngs=rngs)
    self.text_cross_attention_layer = (
        AttentionLayer(e, h, p, rngs=rngs) if use_category else None)
    self.image_cross_attention_layer = (
        AttentionLayer(e, h, p, rngs=rngs) if use_image else None)
    self.norm1 = layers.layer_norm(e, rngs=rngs)
    self.norm2 = layers.layer_norm(e, rngs=rngs)
    self.norm3 = layers.layer_norm(e, rngs=rngs)
    self.weight_category = layers.linear(e, 1, rngs=rngs) if use_category else None
    self.weight_image = layers.linear(e, 1, rngs=rngs) if use_image else None
    self.inter_ffn = FeedForward(e, p, rngs=rngs)
    self.weighted_ffn = FeedForward(e, p, rngs=rngs)
    self.dropout = layers.Dropout(p, rngs=rngs)

  def __call__(self, image_emb: jax.Array, joint_text: jax.Array,
               category_emb: jax.Array) -> jax.Array:
    """image_emb [B, E], joint_text [B, N, E], category_emb [B, E] -> fused text [B, N, E]."""
    tokens = []
    if self.config.uses_category:
      tokens.append(category_emb[:, None])
    if self.config.uses_image:
      tokens.append(image_emb[:, None])
    x = jnp.concatenate(tokens, axis=1)                     # [B, 1 or 2, E]
    x = self.inter_attention_layer(x, x)
    x = self.norm1(x + self.dropout(self.inter_ffn(x)))

    fused = 0.0
    slot = 0
    if self.config.uses_category:
      t = self.text_cross_attention_layer(joint_text, x[:, slot:slot + 1])
      fused = fused + jax.nn.sigmoid(self.weight_category(t)) * t
      slot += 1
    if self.config.uses_image:
      v = self.image_cross_attention_layer(joint_text, x[:, slot:slot + 1])
      fused = fused + jax.nn.sigmoid(self.weight_image(v)) * v
    fused = self.norm2(fused + self.dropout(self.weighted_ffn(fused)))
    return self.norm3(joint_text + self.dropout(fused))


class StackedFusion(nnx.Module):
  """`SimpleMultiModalDoubleEncoder` / `...TripleEncoder`: `SimpleMultiModalModule`s applied in
  the official order (`STACKS`), each reading the previous joint output."""

  def __init__(self, config: FusionConfig, *, rngs: nnx.Rngs):
    self.order = STACKS[config.module]
    layer = dataclasses.replace(config, module=SIMPLE)
    # Only the layers the forward uses are built (the triple's third one is not).
    self.encoder_layer1 = MultiModalFusion(layer, rngs=rngs)
    self.encoder_layer2 = MultiModalFusion(layer, rngs=rngs)

  def __call__(self, image_emb: jax.Array, joint_text: jax.Array,
               category_emb: jax.Array) -> jax.Array:
    """image_emb [B, E], joint_text [B, N, E], category_emb [B, E] -> [B, N, E]."""
    for i in self.order:
      joint_text = getattr(self, f'encoder_layer{i}')(image_emb, joint_text, category_emb)
    return joint_text


class CrossAttentionFusion(nnx.Module):
  """`CrossAttentionLayer` (one layer, official keys at the top level) or `CrossAttentionEncoder`
  (`layers.{i}`): the joints attend to the query-image embedding; the category is not read."""

  def __init__(self, config: FusionConfig, *, rngs: nnx.Rngs):
    e, h, p = config.embed_dim, config.num_heads, config.dropout
    self.encoder = config.module == CROSS_ATTENTION_ENCODER
    if self.encoder:
      self.layers = nnx.List([AttentionLayer(e, h, p, rngs=rngs, ffn_residual=False)
                              for _ in range(CROSS_ATTENTION_ENCODER_LAYERS)])
    else:
      self.layer = AttentionLayer(e, h, p, rngs=rngs, ffn_residual=False)

  def __call__(self, image_emb: jax.Array, joint_text: jax.Array,
               category_emb: jax.Array | None = None) -> jax.Array:
    """image_emb [B, E], joint_text [B, N, E] (category_emb ignored) -> [B, N, E]."""
    del category_emb
    image = image_emb[:, None]
    for layer in (self.layers if self.encoder else [self.layer]):
      joint_text = layer(joint_text, image)
    return joint_text


def build_fusion(config: FusionConfig, *, rngs: nnx.Rngs) -> nnx.Module:
  """The port of the official class `config.module` names."""
  if config.module in STACKS:
    return StackedFusion(config, rngs=rngs)
  if config.module in (CROSS_ATTENTION_LAYER, CROSS_ATTENTION_ENCODER):
    return CrossAttentionFusion(config, rngs=rngs)
  return MultiModalFusion(config, rngs=rngs)

"""OpenAI CLIP (ViT image tower + causal text tower) in Flax NNX, frozen inside CapeNext.

Parameter names follow OpenAI's `clip.model.CLIP` (`transformer.resblocks.{i}.attn`, `ln_1`,
`mlp.c_fc`, `mlp.c_proj`, `ln_2`, `ln_final`, `text_projection`, `visual.conv1` ...) with the
towers under `text` and `vision`; `convert/clip.py` maps OpenAI and Hugging Face weights onto
them. Both encoders return un-normalised features, like OpenAI's `encode_text` /
`encode_image`.
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from capenext_jax.models.layers import (MultiHeadAttention, PatchConv, layer_norm, linear,
                                        quick_gelu, to_input_dtype)


@dataclasses.dataclass(frozen=True)
class CLIPConfig:
  """`clip.model.CLIP` constructor arguments; defaults are ViT-B/32.

  vision_heads: None means OpenAI's rule `vision_width // 64`; set it for checkpoints (e.g.
    small Hugging Face models) whose vision head size is not 64.
  """
  embed_dim: int = 512
  image_resolution: int = 224
  vision_layers: int = 12
  vision_width: int = 768
  vision_patch_size: int = 32
  context_length: int = 77
  vocab_size: int = 49408
  transformer_width: int = 512
  transformer_heads: int = 8
  transformer_layers: int = 12
  vision_heads: int | None = None

  @property
  def vision_num_heads(self) -> int:
    return self.vision_heads or self.vision_width // 64

  @property
  def grid_size(self) -> int:
    return self.image_resolution // self.vision_patch_size


def _normal(std: float):
  return jax.nn.initializers.normal(stddev=std)


class MLP(nnx.Module):
  """`c_fc` (width -> 4 width), QuickGELU, `c_proj` (4 width -> width)."""

  def __init__(self, width: int, *, rngs: nnx.Rngs):
    self.c_fc = linear(width, 4 * width, rngs=rngs)
    self.c_proj = linear(4 * width, width, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.c_proj(quick_gelu(self.c_fc(x)))


class ResidualAttentionBlock(nnx.Module):
  """Pre-norm block: `x + attn(ln_1 x)`, then `x + mlp(ln_2 x)`."""

  def __init__(self, width: int, heads: int, *, rngs: nnx.Rngs):
    self.attn = MultiHeadAttention(width, heads, rngs=rngs)
    self.ln_1 = layer_norm(width, rngs=rngs)
    self.mlp = MLP(width, rngs=rngs)
    self.ln_2 = layer_norm(width, rngs=rngs)

  def __call__(self, x: jax.Array, attn_mask: jax.Array | None = None) -> jax.Array:
    """x: [N, L, W]; attn_mask: [L, L] bool, True = masked. Returns [N, L, W]."""
    h = self.ln_1(x)
    x = x + self.attn(h, h, h, attn_mask=attn_mask)[0]
    return x + self.mlp(self.ln_2(x))


class Transformer(nnx.Module):
  """A stack of `ResidualAttentionBlock`s (`resblocks.{i}`)."""

  def __init__(self, width: int, layers: int, heads: int, *, rngs: nnx.Rngs):
    self.resblocks = nnx.List([ResidualAttentionBlock(width, heads, rngs=rngs)
                               for _ in range(layers)])

  def __call__(self, x: jax.Array, attn_mask: jax.Array | None = None
               ) -> tuple[jax.Array, list[jax.Array]]:
    """x: [N, L, W]. Returns the output [N, L, W] and every block's output (for parity)."""
    outs = []
    for block in self.resblocks:
      x = block(x, attn_mask)
      outs.append(x)
    return x, outs


class CLIPTextTower(nnx.Module):
  """Token + position embedding, causal transformer, `ln_final`, pooling at the first EOT,
  `@ text_projection`."""

  def __init__(self, config: CLIPConfig, *, rngs: nnx.Rngs):
    width = config.transformer_width
    # Embedding / projection inits as OpenAI's `initialize_parameters`; blocks keep torch's
    # defaults (CLIP is always loaded from a checkpoint and frozen).
    self.token_embedding = nnx.Embed(config.vocab_size, width, embedding_init=_normal(0.02),
                                     rngs=rngs)
    self.positional_embedding = nnx.Param(
        _normal(0.01)(rngs.params(), (config.context_length, width)))
    self.transformer = Transformer(width, config.transformer_layers, config.transformer_heads,
                                   rngs=rngs)
    self.ln_final = layer_norm(width, rngs=rngs)
    self.text_projection = nnx.Param(
        _normal(width ** -0.5)(rngs.params(), (width, config.embed_dim)))

  def __call__(self, tokens: jax.Array, *, capture: bool = False):
    """Encode token ids.

    Args:
      tokens: int32 [N, L], L <= context_length, SOT ... EOT then padding (0 or EOT).
      capture: also return intermediates `{'block{i}': [N,L,W], 'ln_final': [N,L,W]}`.
    Returns:
      features [N, E] (not normalised), plus the intermediates dict when `capture`.
    """
    n, length = tokens.shape
    x = self.token_embedding(tokens) + self.positional_embedding[:length]
    causal = jnp.triu(jnp.ones((length, length), bool), k=1)
    x, blocks = self.transformer(x, causal)
    x = self.ln_final(x)
    # The EOT id is the largest id, so argmax (first maximum) finds the first EOT even when
    # the padding is EOT (Hugging Face); the causal mask makes later tokens irrelevant to it.
    pooled = x[jnp.arange(n), jnp.argmax(tokens, axis=-1)]
    features = pooled @ self.text_projection[...].astype(pooled.dtype)
    if not capture:
      return features
    return features, {**{f'block{i}': b for i, b in enumerate(blocks)}, 'ln_final': x}


class CLIPVisionTower(nnx.Module):
  """ViT: patch conv (no bias), class token, position embedding, `ln_pre`, transformer,
  `ln_post` on the class token, `@ proj`."""

  def __init__(self, config: CLIPConfig, *, rngs: nnx.Rngs):
    width, patch = config.vision_width, config.vision_patch_size
    self.image_resolution = config.image_resolution
    self.conv1 = PatchConv(3, width, kernel_size=(patch, patch), strides=(patch, patch),
                           padding='VALID', use_bias=False, promote_dtype=to_input_dtype,
                           rngs=rngs)
    scale = width ** -0.5
    self.class_embedding = nnx.Param(_normal(scale)(rngs.params(), (width,)))
    self.positional_embedding = nnx.Param(
        _normal(scale)(rngs.params(), (config.grid_size ** 2 + 1, width)))
    self.ln_pre = layer_norm(width, rngs=rngs)
    self.transformer = Transformer(width, config.vision_layers, config.vision_num_heads,
                                   rngs=rngs)
    self.ln_post = layer_norm(width, rngs=rngs)
    self.proj = nnx.Param(_normal(scale)(rngs.params(), (width, config.embed_dim)))

  def __call__(self, images: jax.Array, *, capture: bool = False):
    """Encode images.

    Args:
      images: float32 NHWC [N, R, R, 3], R = image_resolution (normalised as the caller
        wants: CapeNext feeds ImageNet-normalised pixels).
      capture: also return intermediates `{'conv1': [N,g,g,W], 'ln_pre': [N,1+g*g,W],
        'block{i}': [N,1+g*g,W], 'ln_post': [N,W]}`.
    Returns:
      features [N, E] (not normalised), plus the intermediates dict when `capture`.
    """
    r = self.image_resolution
    if images.shape[1:] != (r, r, 3):
      raise ValueError(f'CLIP images must be NHWC [N, {r}, {r}, 3], got {images.shape}')
    n = images.shape[0]
    patches = self.conv1(images)
    x = patches.reshape(n, -1, patches.shape[-1])  # row-major (y, x), as torch's flatten
    cls = jnp.broadcast_to(self.class_embedding[...].astype(x.dtype), (n, 1, x.shape[-1]))
    x = jnp.concatenate([cls, x], axis=1) + self.positional_embedding[...].astype(x.dtype)
    x = self.ln_pre(x)
    x_pre = x
    x, blocks = self.transformer(x)
    pooled = self.ln_post(x[:, 0])
    features = pooled @ self.proj[...].astype(pooled.dtype)
    if not capture:
      return features
    return features, {'conv1': patches, 'ln_pre': x_pre,
                      **{f'block{i}': b for i, b in enumerate(blocks)}, 'ln_post': pooled}


def vision_in_compute_dtype(vision: dict, dtype) -> dict:
  """The image tower's parameters (a pure dict of `CLIPVisionTower`'s state) with every one
  the forward casts to its input's dtype at use (matmul and conv weights, biases, class and
  position embeddings, `proj`) held in `dtype`, and the LayerNorms' (`ln_*`, which compute in
  float32) left as they are. A frozen tower run in bfloat16 then reads its weights as they
  are instead of casting 88 M float32 values at every step; its outputs are bit for bit the
  same (both round the same float32 values to `dtype` once)."""
  dtype = jnp.dtype(dtype)

  def cast(tree, under_norm=False):
    if isinstance(tree, dict):
      return {k: cast(v, under_norm or str(k).startswith('ln_')) for k, v in tree.items()}
    if under_norm or not jnp.issubdtype(tree.dtype, jnp.floating):
      return tree
    return tree.astype(dtype)

  return cast(vision)


class CLIP(nnx.Module):
  """OpenAI CLIP: `.text` and `.vision` towers plus `logit_scale`.

  `logit_scale` is unused by CapeNext; it is kept as a parameter so that checkpoints round
  trip exactly (`clip_to_openai(clip_from_openai(sd)) == sd`).
  """

  def __init__(self, config: CLIPConfig, *, rngs: nnx.Rngs):
    self.config = config
    self.text = CLIPTextTower(config, rngs=rngs)
    self.vision = CLIPVisionTower(config, rngs=rngs)
    self.logit_scale = nnx.Param(jnp.asarray(math.log(1 / 0.07), jnp.float32))

  def encode_text(self, tokens: jax.Array) -> jax.Array:
    """tokens int32 [N, 77] -> [N, E], not normalised."""
    return self.text(tokens)

  def encode_image(self, images: jax.Array) -> jax.Array:
    """images float32 NHWC [N, R, R, 3] -> [N, E], not normalised."""
    return self.vision(images)

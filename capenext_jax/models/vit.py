"""Plain Vision Transformers as CapeNext image backbones: timm's ViT-B/16 and DINOv2 ViT-S/14.

Both references share one architecture (pre-norm blocks, fused qkv with bias, exact GELU MLP,
LayerNorm eps 1e-6, a CLS token and a learned absolute position embedding); DINOv2 adds a
per-channel LayerScale on both residual branches and carries a (here unused) mask token.
`VisionTransformer` is that network, returning the final-normed patch tokens as a grid with
the CLS token dropped. The two CapeNext backbones wrap it as the official model does:

  vit_b16     `ViTFeatureExtractor`: 224 px input, 14x14 grid of 768, then `channel_adaptor`
              (a 1x1 conv 768 -> 768, part of CapeNext).
  dinov2_s14  `DinoV2Backbone`: the query resized to 224 px (bilinear, half-pixel, no
              antialias), `get_intermediate_layers(n=1, reshape=True)`: 16x16 grid of 384, the
              position embedding interpolated from its 37x37 grid as DINOv2 does it.

Images are NHWC. Param trees mirror the reference names:
  VisionTransformer: cls_token [1,1,D], pos_embed [1,1+G²,D], mask_token [1,D] (DINOv2 only),
    patch_embed.proj (Conv), blocks[i].{norm1, attn.{qkv, proj}, norm2, mlp.{fc1, fc2},
    ls1.gamma, ls2.gamma (DINOv2 only)}, norm
  ViTFeatureExtractor: vit_backbone.{...}, channel_adaptor (Linear = the 1x1 conv)
  DinoV2Backbone: the VisionTransformer's own tree
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

VIT_LN_EPS = 1e-6   # timm's and DINOv2's LayerNorm eps (not PyTorch's 1e-5 default)
CUBIC_A = -0.75     # PyTorch's bicubic convolution coefficient


@dataclasses.dataclass(frozen=True)
class ViTConfig:
  """Sizes of the shared `VisionTransformer`.

  pos_size: the side the position embedding is laid out for (grid pos_size / patch_size).
  input_size: the side of the images the network runs on. When it differs from pos_size the
    position embedding is resampled the way DINOv2 does it (`interpolate_offset` must be set);
    timm's fixed-size ViT runs at pos_size.
  layer_scale: DINOv2's LayerScale init value (1.0 in its hub models); None: no LayerScale.
  mask_token: DINOv2 models carry a `mask_token` parameter (used only for masked training).
  interpolate_offset: DINOv2's scale-factor offset (0.1 in its hub models); None: no resampling.
  """
  pos_size: int = 224
  input_size: int = 224
  patch_size: int = 16
  in_chans: int = 3
  embed_dim: int = 768
  depth: int = 12
  num_heads: int = 12
  mlp_ratio: float = 4.0
  layer_scale: float | None = None
  mask_token: bool = False
  interpolate_offset: float | None = None

  def __post_init__(self):
    for name in ('pos_size', 'input_size'):
      if getattr(self, name) % self.patch_size:
        raise ValueError(f'{name} {getattr(self, name)} is not a multiple of patch_size '
                         f'{self.patch_size}')
    if self.embed_dim % self.num_heads:
      raise ValueError(f'embed_dim {self.embed_dim} is not divisible by num_heads '
                       f'{self.num_heads}')
    if self.input_size != self.pos_size and self.interpolate_offset is None:
      raise ValueError(f'input_size {self.input_size} differs from pos_size {self.pos_size}: '
                       f'set interpolate_offset (DINOv2 resampling) or run at pos_size')

  @property
  def pos_grid(self) -> int:
    """Side of the position embedding's patch grid."""
    return self.pos_size // self.patch_size

  @property
  def grid(self) -> int:
    """Side of the output patch grid."""
    return self.input_size // self.patch_size


@dataclasses.dataclass(frozen=True)
class TimmViTConfig:
  """The `vit_b16` backbone: timm's ViT at its native size, then `channel_adaptor`. The
  defaults are timm's `vit_base_patch16_224` and the official 768 adaptor channels.

  img_size: side of the query image (the data pipeline's crop size, 224 in the official
    configs); the position embedding is laid out for it.
  """
  img_size: int = 224
  patch_size: int = 16
  embed_dim: int = 768
  depth: int = 12
  num_heads: int = 12
  mlp_ratio: float = 4.0
  adaptor_channels: int = 768

  def __post_init__(self):
    if self.img_size % self.patch_size:
      raise ValueError(f'img_size {self.img_size} is not a multiple of patch_size '
                       f'{self.patch_size} (timm\'s ViT runs at its position-embedding size)')
    self.vit  # validates the remaining sizes

  @property
  def vit(self) -> ViTConfig:
    return ViTConfig(pos_size=self.img_size, input_size=self.img_size,
                     patch_size=self.patch_size, embed_dim=self.embed_dim, depth=self.depth,
                     num_heads=self.num_heads, mlp_ratio=self.mlp_ratio)

  @property
  def num_features(self) -> int:
    return self.adaptor_channels

  @property
  def output_resolution(self) -> int:
    return self.img_size // self.patch_size


@dataclasses.dataclass(frozen=True)
class DinoV2Config:
  """The `dinov2_s14` backbone. The defaults are DINOv2's hub `dinov2_vits14` (img_size 518,
  LayerScale 1.0, interpolate_offset 0.1, no antialias, no registers) run at 224 px on the
  official 256 px query.

  img_size: side of the query image (the data pipeline's crop size), resized to input_size.
  input_size: the side the ViT runs at. pos_size: the side its position embedding is laid out for.
  """
  img_size: int = 256
  input_size: int = 224
  pos_size: int = 518
  patch_size: int = 14
  embed_dim: int = 384
  depth: int = 12
  num_heads: int = 6
  mlp_ratio: float = 4.0
  layer_scale: float = 1.0
  interpolate_offset: float = 0.1

  def __post_init__(self):
    self.vit  # validates the sizes

  @property
  def vit(self) -> ViTConfig:
    return ViTConfig(pos_size=self.pos_size, input_size=self.input_size,
                     patch_size=self.patch_size, embed_dim=self.embed_dim, depth=self.depth,
                     num_heads=self.num_heads, mlp_ratio=self.mlp_ratio,
                     layer_scale=self.layer_scale, mask_token=True,
                     interpolate_offset=self.interpolate_offset)

  @property
  def num_features(self) -> int:
    return self.embed_dim

  @property
  def output_resolution(self) -> int:
    return self.input_size // self.patch_size


# ----------------------------------------------------------------------------- resampling
@functools.lru_cache(maxsize=None)
def bicubic_matrix(in_size: int, out_size: int, scale_factor: float) -> np.ndarray:
  """float32 [out_size, in_size]: PyTorch's `interpolate(mode='bicubic', align_corners=False,
  antialias=False, scale_factor=scale_factor)` along one axis, as a matrix.

  As PyTorch does it: the source coordinate uses the given scale factor (not in/out), in float32:
  src = (dst + 0.5) * float32(1 / scale_factor) - 0.5; the four taps floor(src)-1 .. floor(src)+2
  are clamped to the border, with the cubic-convolution weights (A = -0.75) of t = src - floor.
  """
  scale = np.float32(1.0 / scale_factor)
  src = (np.arange(out_size, dtype=np.float32) + np.float32(0.5)) * scale - np.float32(0.5)
  base = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
  t = np.clip(src - base.astype(np.float32), 0, 1).astype(np.float32)
  a = np.float32(CUBIC_A)

  def near(x):   # |x| <= 1
    return ((a + 2) * x - (a + 3)) * x * x + 1

  def far(x):    # 1 < |x| < 2
    return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

  weights = np.stack([far(t + 1), near(t), near(1 - t), far(2 - t)], axis=1)
  out = np.zeros((out_size, in_size), np.float32)
  for tap in range(4):
    np.add.at(out, (np.arange(out_size), np.clip(base - 1 + tap, 0, in_size - 1)),
              weights[:, tap])
  out.setflags(write=False)
  return out


def dinov2_position_resample(pos_grid: int, grid: int, offset: float) -> np.ndarray:
  """float32 [grid, pos_grid]: DINOv2's `interpolate_pos_encoding` along one axis: bicubic with
  scale_factor (grid + offset) / pos_grid, no antialias (its hub models)."""
  scale_factor = float(grid + offset) / pos_grid
  if math.floor(pos_grid * scale_factor) != grid:
    raise ValueError(f'DINOv2 resampling of a {pos_grid}-grid by {scale_factor} does not give '
                     f'{grid} (offset {offset})')
  return bicubic_matrix(pos_grid, grid, scale_factor)


# ----------------------------------------------------------------------------- initialisers
def _layer_norm(dim: int, *, rngs: nnx.Rngs) -> layers.LayerNorm:
  return layers.layer_norm(dim, epsilon=VIT_LN_EPS, rngs=rngs)


# ----------------------------------------------------------------------------- modules
class PatchEmbed(nnx.Module):
  """Non-overlapping patch conv (no norm): [B, S, S, C] -> [B, S/p, S/p, D]."""

  def __init__(self, config: ViTConfig, *, rngs: nnx.Rngs):
    p = config.patch_size
    self.proj = layers.patch_conv(config.in_chans, config.embed_dim, p, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.proj(x)


class Attention(nnx.Module):
  """Multi-head self-attention with a fused qkv projection (channels `[3, heads, head_dim]`).

  `attention` (CapeNextConfig.attention, set by CapeNext) picks the kernel as in Swin's
  `WindowAttention`: the explicit softmax below, or `layers.dot_product_attention` (cuDNN's
  fused attention on CUDA GPUs under 'auto', with a logged XLA fallback).
  """

  def __init__(self, dim: int, num_heads: int, *, rngs: nnx.Rngs):
    self.num_heads = num_heads
    self.qkv = layers.trunc_normal_linear(dim, 3 * dim, rngs=rngs)
    self.proj = layers.trunc_normal_linear(dim, dim, rngs=rngs)
    self.attention = layers.ATTENTION_AUTO

  def __call__(self, x: jax.Array) -> jax.Array:
    """x: [B, N, C] -> [B, N, C]."""
    b, n, c = x.shape
    h = self.num_heads
    scale = 1.0 / math.sqrt(c // h)
    implementation = layers.attention_implementation(self.attention)
    if implementation != layers.ATTENTION_REFERENCE:
      q, k, v = self.qkv(x).reshape(b, n, 3, h, c // h).transpose(2, 0, 1, 3, 4)
      out = layers.dot_product_attention(q, k, v, scale=scale, implementation=implementation,
                                         site=f'ViT attention ({n} tokens, {h} heads)')
      return self.proj(out.reshape(b, n, c))
    # Head-major [3, B, h, N, d], so both attention products are plain batched matmuls.
    q, k, v = self.qkv(x).reshape(b, n, 3, h, c // h).transpose(2, 0, 3, 1, 4)
    q = q * scale
    logits = jnp.einsum('bhqd,bhkd->bhqk', q, k, preferred_element_type=jnp.float32)
    weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    out = jnp.einsum('bhqk,bhkd->bhqd', weights, v)
    return self.proj(out.transpose(0, 2, 1, 3).reshape(b, n, c))


class LayerScale(nnx.Module):
  """DINOv2's per-channel residual scale `x * gamma`."""

  def __init__(self, dim: int, init_value: float):
    self.gamma = nnx.Param(jnp.full((dim,), init_value, jnp.float32))

  def __call__(self, x: jax.Array) -> jax.Array:
    return x * self.gamma.value.astype(x.dtype)


class Block(nnx.Module):
  """Pre-norm block: x + ls1(attn(norm1(x))), then x + ls2(mlp(norm2(x)))."""

  def __init__(self, config: ViTConfig, *, rngs: nnx.Rngs):
    dim = config.embed_dim
    self.norm1 = _layer_norm(dim, rngs=rngs)
    self.attn = Attention(dim, config.num_heads, rngs=rngs)
    self.norm2 = _layer_norm(dim, rngs=rngs)
    self.mlp = layers.Mlp(dim, int(dim * config.mlp_ratio), rngs=rngs)
    scaled = config.layer_scale is not None
    self.ls1 = LayerScale(dim, config.layer_scale) if scaled else None
    self.ls2 = LayerScale(dim, config.layer_scale) if scaled else None

  def __call__(self, x: jax.Array) -> jax.Array:
    """x: [B, N, C] -> same shape."""
    y = self.attn(self.norm1(x))
    x = x + (y if self.ls1 is None else self.ls1(y))
    y = self.mlp(self.norm2(x))
    return x + (y if self.ls2 is None else self.ls2(y))


class VisionTransformer(nnx.Module):
  """The shared ViT: `model(x)`: x [B, S, S, in_chans] NHWC (S = config.input_size) ->
  [B, S/p, S/p, D], the final-normed patch tokens as a grid (row-major, CLS dropped).
  `model.tokens(x)` returns all final-normed tokens [B, 1 + (S/p)², D], CLS first."""

  def __init__(self, config: ViTConfig, *, rngs: nnx.Rngs):
    self.config = config
    d = config.embed_dim
    self.patch_embed = PatchEmbed(config, rngs=rngs)
    self.cls_token = nnx.Param(1e-6 * jax.random.normal(rngs.params(), (1, 1, d), jnp.float32))
    self.pos_embed = nnx.Param(layers.trunc_normal(rngs.params(), (1, 1 + config.pos_grid ** 2, d)))
    self.mask_token = nnx.Param(jnp.zeros((1, d), jnp.float32)) if config.mask_token else None
    self.blocks = nnx.List([Block(config, rngs=rngs) for _ in range(config.depth)])
    self.norm = _layer_norm(d, rngs=rngs)
    self.remat = layers.REMAT_NONE   # CapeNextConfig.remat, set by CapeNext

  def position_embedding(self) -> jax.Array:
    """[1, 1 + grid², D]: the stored embedding, its patch part resampled DINOv2's way to the
    input grid when that differs (the CLS entry is kept)."""
    c = self.config
    pos = self.pos_embed.value
    if c.grid == c.pos_grid:
      return pos
    resample = jnp.asarray(dinov2_position_resample(c.pos_grid, c.grid, c.interpolate_offset))
    patches = pos[0, 1:].reshape(c.pos_grid, c.pos_grid, -1)
    patches = jnp.einsum('hi,ijd,wj->hwd', resample, patches, resample)
    return jnp.concatenate([pos[:, :1], patches.reshape(1, c.grid ** 2, -1)], axis=1)

  def tokens(self, x: jax.Array) -> jax.Array:
    """x: [B, S, S, in_chans] -> final-normed tokens [B, 1 + (S/p)², D], CLS first."""
    s = self.config.input_size
    if x.ndim != 4 or x.shape[1:] != (s, s, self.config.in_chans):
      raise ValueError(f'expected images [B, {s}, {s}, {self.config.in_chans}] NHWC, '
                       f'got {x.shape}')
    b = x.shape[0]
    patches = self.patch_embed(x).reshape(b, -1, self.config.embed_dim)
    cls = jnp.broadcast_to(self.cls_token.value.astype(x.dtype), (b, 1, self.config.embed_dim))
    x = jnp.concatenate([cls, patches], axis=1) + self.position_embedding().astype(x.dtype)
    for block in self.blocks:
      x = layers.run_block(block, x, remat=self.remat)
    return self.norm(x)

  def __call__(self, x: jax.Array) -> jax.Array:
    """x: [B, S, S, in_chans] -> [B, S/p, S/p, D]."""
    g = self.config.grid
    return self.tokens(x)[:, 1:].reshape(x.shape[0], g, g, -1)


class ViTFeatureExtractor(nnx.Module):
  """CapeNext's `vit_b16` backbone (official `ViTFeatureExtractor`): timm ViT-B/16 patch grid,
  then `channel_adaptor`, a 1x1 conv (PyTorch default init) written as a Linear.

  x [B, 224, 224, 3] -> [B, 14, 14, 768] (TimmViTConfig defaults).
  """

  def __init__(self, config: TimmViTConfig, *, rngs: nnx.Rngs):
    self.config = config
    self.vit_backbone = VisionTransformer(config.vit, rngs=rngs)
    self.channel_adaptor = layers.linear(config.embed_dim, config.adaptor_channels, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.channel_adaptor(self.vit_backbone(x))


class DinoV2Backbone(VisionTransformer):
  """CapeNext's `dinov2_s14` backbone: the query resized to the ViT's input_size as the
  official code does (bilinear, half-pixel centres, no antialias; identity at that size), then
  `get_intermediate_layers(n=1, reshape=True)` with the final norm. Its params are the
  VisionTransformer's (the official model holds the DINOv2 hub model itself).

  x [B, img_size, img_size, 3] -> [B, 16, 16, 384] (DinoV2Config defaults).
  """

  def __init__(self, config: DinoV2Config, *, rngs: nnx.Rngs):
    super().__init__(config.vit, rngs=rngs)
    self.backbone_config = config

  def __call__(self, x: jax.Array) -> jax.Array:
    size, s = self.backbone_config.img_size, self.config.input_size
    if x.ndim != 4 or x.shape[1:] != (size, size, self.config.in_chans):
      raise ValueError(f'expected images [B, {size}, {size}, {self.config.in_chans}] NHWC, '
                       f'got {x.shape}')
    if size != s:
      x = jax.image.resize(x, (x.shape[0], s, s, x.shape[3]), 'bilinear', antialias=False)
    return super().__call__(x)

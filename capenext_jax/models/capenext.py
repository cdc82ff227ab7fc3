"""CapeNext: CapeX (image backbone + text-described keypoints + graph decoder) with CLIP fusion.

docs/MODEL.md §0. The support images are never used: the support enters only
through the category's keypoint descriptions and the support-visibility mask.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from capenext_jax.models import backbones, layers
from capenext_jax.models.clip import CLIP, CLIPConfig, vision_in_compute_dtype
from capenext_jax.models.fusion import FusionConfig, build_fusion
from capenext_jax.models.head import HeadConfig, PoseHead
from capenext_jax.models.swin_v2 import SwinV2Config

NUM_SLOTS = 100          # keypoint slots of MP-100 (max_kpt_num)
CONTEXT_LENGTH = 77      # CLIP text context
DTYPES = ('float32', 'bfloat16')


# The test-size variants' text tower and head: random CLIP weights at CPU test sizes.
TINY_CLIP = CLIPConfig(embed_dim=64, image_resolution=64, vision_layers=1, vision_width=64,
                       vision_patch_size=16, transformer_width=64, transformer_heads=2,
                       transformer_layers=1)
TINY_HEAD = HeadConfig(d_model=32, nhead=4, num_encoder_layers=1, num_decoder_layers=2,
                       dim_feedforward=64, similarity_proj_dim=32, dynamic_proj_dim=16)


@dataclasses.dataclass(frozen=True)
class CapeNextConfig:
  """Sizes of the whole model. The defaults are the headline CapeNext (Swin V2-T, CLIP B/32).

  backbone: any config of `backbones.ARCHS` (Swin V2, ResNet, HRNet, ...); its `img_size` is
  the model's input size. fusion=None gives plain CapeX (keypoint text goes straight to the
  head); `fusion.module` picks the official fusion variant (models/fusion.py). The widths where
  the parts meet are derived, not free: the head reads the backbone's feature channels
  (`num_features`) and
  the CLIP embedding, the fusion module works at the CLIP width, and the head's sine encoding
  has d_model / 2 features per axis (whatever `head` / `fusion` say, these are overwritten).

  How it computes (none of these changes the parameters):
  dtype: 'float32' (the parity mode) or 'bfloat16': the compute dtype of the model, CLIP image
    tower included. Parameters (and so Adam state) stay float32 and are cast at use; softmax,
    LayerNorm / BatchNorm statistics, the similarity logits and soft-argmaxes, the keypoints
    and the losses are float32 (models/layers/). Text embeddings are read in float32 and cast.
  remat: 'none', 'blocks' (recompute each backbone block and head layer in the backward pass,
    keeping only its input) or a `jax.checkpoint_policies` name (what such a block may keep).
  attention: the attention kernels (`layers.ATTENTIONS`; every attention of the model):
    'auto' (hand-written on CPU, cuDNN's fused attention on CUDA GPUs where it takes the call
    and XLA's where not, XLA's on TPUs), 'reference', 'fused', 'xla', 'cudnn'.
  """
  backbone: Any = SwinV2Config()
  clip: CLIPConfig = CLIPConfig()
  fusion: FusionConfig | None = FusionConfig()
  head: HeadConfig = HeadConfig()
  dtype: str = 'float32'
  remat: str = layers.REMAT_NONE
  attention: str = layers.ATTENTION_AUTO

  def __post_init__(self):
    if self.dtype not in DTYPES:
      raise ValueError(f'config dtype {self.dtype!r}: expected one of {DTYPES}')
    layers.check_remat(self.remat)
    # The name only: resolving 'auto' asks for the backend, which must wait for
    # jax.distributed.initialize (configs are built before it).
    if self.attention not in layers.ATTENTIONS:
      raise ValueError(f'config attention {self.attention!r}: expected one of '
                       f'{layers.ATTENTIONS}')
    head = dataclasses.replace(
        self.head, img_in_channels=self.backbone.num_features,
        text_in_channels=self.clip.embed_dim, num_feats=self.head.d_model // 2)
    object.__setattr__(self, 'head', head)
    if self.fusion is not None:
      object.__setattr__(self, 'fusion',
                         dataclasses.replace(self.fusion, embed_dim=self.clip.embed_dim))

  @classmethod
  def variant(cls, backbone: str = 'swinv2_t', *, image_size: int | None = None,
              fusion: bool = True, **compute) -> CapeNextConfig:
    """A named size (`backbones.PRESETS`): 'swinv2_t' (the headline), 'swinv2_s', 'swinv2_b',
    'resnet50', 'hrnet_w32', ... with CLIP ViT-B/32 and the official head, or a CPU test size
    ('tiny' (Swin), 'resnet_tiny', 'hrnet_tiny', ...) with a tiny CLIP and head.
    image_size: default the backbone's official input size. fusion=False gives plain CapeX.
    compute: dtype / remat / attention."""
    preset = backbones.preset(backbone)
    tiny = preset.test_size
    return cls(backbone=preset.config(image_size), clip=TINY_CLIP if tiny else CLIPConfig(),
               fusion=FusionConfig() if fusion else None, head=TINY_HEAD if tiny else HeadConfig(),
               **compute)

  @property
  def image_size(self) -> int:
    return self.backbone.img_size

  def to_dict(self) -> dict:
    """JSON-able nested dict (tuples become lists when dumped); `from_dict` inverts it. The
    backbone is `{'arch': ..., **its fields}`."""
    parts = {'clip': self.clip, 'fusion': self.fusion, 'head': self.head}
    return {'backbone': backbones.config_to_dict(self.backbone),
            **{k: None if v is None else dataclasses.asdict(v) for k, v in parts.items()},
            **{k: getattr(self, k) for k in COMPUTE_FIELDS}}

  @classmethod
  def from_dict(cls, d: dict) -> CapeNextConfig:
    """Inverse of `to_dict`. Missing fields take their defaults (so files written before a
    field was added still load; a `swin` entry, from before backbones had a choice, is a Swin
    V2 backbone); unknown fields raise ValueError naming them."""
    d = dict(d)
    if 'swin' in d:
      if 'backbone' in d:
        raise ValueError("config: both 'swin' (the old name) and 'backbone' are given")
      d['backbone'] = {'arch': 'swin_v2', **d.pop('swin')}
    parts = {'clip': CLIPConfig, 'fusion': FusionConfig, 'head': HeadConfig}
    _check_fields(cls, d, 'config')
    d = {**d, 'fusion': FusionConfig.upgrade(d['fusion'])} if d.get('fusion') else d
    out = {k: (None if d[k] is None else _sub_config(parts[k], d[k], k))
           for k in parts if k in d}
    out.update({k: str(d[k]) for k in COMPUTE_FIELDS if k in d})
    if 'backbone' in d:
      out['backbone'] = backbones.config_from_dict(d['backbone'])
    return cls(**out)


COMPUTE_FIELDS = ('dtype', 'remat', 'attention')   # how the model computes, not what


def _check_fields(cls, d: dict, where: str) -> None:
  unknown = sorted(set(d) - {f.name for f in dataclasses.fields(cls)})
  if unknown:
    raise ValueError(f'{where}: unknown fields {unknown} for {cls.__name__}')


def _sub_config(cls, d: dict, where: str):
  """A frozen sub-config from its dict; JSON lists back to the tuples the dataclasses use."""
  _check_fields(cls, d, where)
  return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


def l2_normalize(x: jax.Array) -> jax.Array:
  """x / ||x|| over the last axis, no epsilon (as the official code); all-zero rows stay 0.
  Computed in float32, returned in x's dtype."""
  xf = x.astype(jnp.float32)
  norm = jnp.linalg.norm(xf, axis=-1, keepdims=True)
  return (xf / jnp.where(norm > 0, norm, 1.0)).astype(x.dtype)


class CapeNext(nnx.Module):
  """The full model. See docs/DESIGN.md for the call contract."""

  def __init__(self, config: CapeNextConfig = CapeNextConfig(), *, rngs: nnx.Rngs):
    self.config = config
    self.backbone = backbones.build(config.backbone, rngs=rngs)
    self.clip = CLIP(config.clip, rngs=rngs)
    self.fusion = (build_fusion(config.fusion, rngs=rngs)
                   if config.fusion is not None else None)
    self.head = PoseHead(config.head, rngs=rngs)
    self._set_compute()

  def _set_compute(self):
    """Hand `config.remat` to the modules with block loops and `config.attention` to every
    attention module (`dtype` is read in `__call__`)."""
    self.set_attributes(remat=self.config.remat, attention=self.config.attention,
                        raise_if_not_found=False)

  @property
  def dtype(self):
    return jnp.dtype(self.config.dtype)

  # ------------------------------------------------------------------ frozen CLIP encoders
  def encode_text(self, tokens: jax.Array) -> jax.Array:
    """L2-normalised CLIP text embeddings, no gradient. tokens int32 [..., 77] -> [..., E]."""
    flat = tokens.reshape(-1, tokens.shape[-1])
    emb = l2_normalize(self.clip.encode_text(flat))
    return jax.lax.stop_gradient(emb.reshape(*tokens.shape[:-1], emb.shape[-1]))

  def encode_query_image(self, query_image: jax.Array) -> jax.Array:
    """CLIP image embedding of the (ImageNet-normalised) query, no gradient.

    The official code feeds the backbone input, bilinearly resized to CLIP's resolution without
    antialiasing, and never applies CLIP's own normalisation (docs/MODEL.md §1.3).
    query_image [B, S, S, 3] -> [B, E].
    """
    b, _, _, c = query_image.shape
    r = self.config.clip.image_resolution
    resized = jax.image.resize(query_image, (b, r, r, c), 'bilinear', antialias=False)
    return jax.lax.stop_gradient(l2_normalize(self.clip.encode_image(resized)))

  # ------------------------------------------------------------------ forward
  def __call__(self, query_image: jax.Array, support_mask: jax.Array, adjacency: jax.Array, *,
               keypoint_text: jax.Array | None = None, category_text: jax.Array | None = None,
               keypoint_tokens: jax.Array | None = None,
               category_tokens: jax.Array | None = None) -> dict[str, jax.Array]:
    """Predict every keypoint slot of a batch of episodes.

    Args:
      query_image: float [B, S, S, 3], ImageNet-normalised RGB.
      support_mask: [B, 100], 1 where the support (shot 0) keypoint is visible and in bounds.
      adjacency: [B, 100, 100] 0/1 skeleton adjacency (see `head.adjacency_from_skeleton`).
      keypoint_text: [B, 100, E] L2-normalised CLIP text embedding of each slot's description
        (from the text cache; rows of masked slots are ignored), or
      keypoint_tokens: int32 [B, 100, 77] the descriptions' CLIP tokens.
      category_text: [B, E] L2-normalised embedding of "a photo of {category}", or
      category_tokens: int32 [B, 77] (neither is needed, and both are ignored, without fusion
        or with a fusion variant that does not read the category).
    Returns:
      dict with 'keypoints' [L, B, 100, 2] in [0, 1] (x, y relative to S), 'proposals'
      [B, 100, 2], 'similarity' [B, 100, h, w], the head's intermediates, and 'joint_text'
      (masked J), 'fused_text' (J'), 'image_embedding' (I), 'category_embedding' (C),
      'backbone_feature' [B, h, w, C]. Unused entries cost nothing under jit.
    """
    self._check_inputs(query_image, support_mask, adjacency)
    if (keypoint_text is None) == (keypoint_tokens is None):
      raise ValueError('pass exactly one of keypoint_text / keypoint_tokens')
    if keypoint_text is None:
      _check_tokens('keypoint_tokens', keypoint_tokens, (query_image.shape[0], NUM_SLOTS))
      keypoint_text = self.encode_text(keypoint_tokens)
    # Everything below computes in the configured dtype (see CapeNextConfig).
    dtype = self.dtype
    query_image = query_image.astype(dtype)
    mask = support_mask.astype(dtype)
    # Masked slots are exactly zero, as the official per-visible-keypoint encoding leaves them.
    joint_text = jax.lax.stop_gradient(keypoint_text).astype(dtype) * mask[..., None]

    extras = {'joint_text': joint_text}
    fused_text = joint_text
    if self.fusion is not None:
      if not self.config.fusion.uses_category:
        category_text = None
      elif (category_text is None) == (category_tokens is None):
        raise ValueError('pass exactly one of category_text / category_tokens')
      elif category_text is None:
        _check_tokens('category_tokens', category_tokens, (query_image.shape[0],))
        category_text = self.encode_text(category_tokens)
      if category_text is not None:
        category_text = jax.lax.stop_gradient(category_text).astype(dtype)
        extras['category_embedding'] = category_text
      image_text = None
      if self.config.fusion.uses_image:
        with jax.named_scope('clip_tower'):
          image_text = extras['image_embedding'] = self.encode_query_image(query_image)
      with jax.named_scope('fusion'):
        fused_text = self.fusion(image_text, joint_text, category_text)

    # The named scopes label the ops for profiles and benchmarks/hlo_traffic.py.
    with jax.named_scope('backbone'):
      feature = self.backbone(query_image)
    with jax.named_scope('head'):
      out = self.head(feature, fused_text, mask, adjacency.astype(dtype))
    return {**out, **extras, 'fused_text': fused_text, 'backbone_feature': feature}

  def _check_inputs(self, query_image, support_mask, adjacency):
    s = self.config.image_size
    if query_image.ndim != 4 or query_image.shape[1:] != (s, s, 3):
      hint = (' (channels-first? images are NHWC)'
              if query_image.ndim == 4 and query_image.shape[1] == 3 else '')
      raise ValueError(f'query_image must be [B, {s}, {s}, 3], got {tuple(query_image.shape)}'
                       f'{hint}')
    b = query_image.shape[0]
    if support_mask.shape != (b, NUM_SLOTS):
      raise ValueError(f'support_mask must be [B={b}, {NUM_SLOTS}] (at most {NUM_SLOTS} '
                       f'keypoints), got {tuple(support_mask.shape)}')
    if adjacency.shape != (b, NUM_SLOTS, NUM_SLOTS):
      raise ValueError(f'adjacency must be [B={b}, {NUM_SLOTS}, {NUM_SLOTS}], '
                       f'got {tuple(adjacency.shape)}')


def abstract_model(config: CapeNextConfig) -> CapeNext:
  """`config`'s model with `jax.ShapeDtypeStruct`s for its arrays (weights, statistics, RNG
  keys): nothing computed. A fresh copy each call (`nnx.clone`, ~0.06 s for the tiny test
  model) of one model traced once per config and process (`nnx.eval_shape` of its
  construction: ~0.4 s tiny, ~1.3 s headline on CPU), which loading, exporting, checking and
  creating a train state each needed, some several times. Its keys are abstract, so the seed
  it is built with does not matter."""
  return nnx.clone(_traced_abstract_model(config))


@functools.lru_cache(maxsize=8)
def _traced_abstract_model(config: CapeNextConfig) -> CapeNext:
  return nnx.eval_shape(lambda: CapeNext(config, rngs=layers.init_rngs(0)))


def frozen_in_compute_dtype(frozen: dict, dtype) -> dict:
  """A train state's `frozen` pure dict with the CLIP image tower held in the compute dtype
  `dtype` where its forward would cast it at every step (`clip.vision_in_compute_dtype`);
  float32 leaves it as it is. For the state a run steps with, not for one that is saved or
  exported (their CLIP stays float32)."""
  if jnp.dtype(dtype) == jnp.float32 or 'vision' not in frozen.get('clip', {}):
    return frozen
  clip = dict(frozen['clip'], vision=vision_in_compute_dtype(frozen['clip']['vision'], dtype))
  return dict(frozen, clip=clip)


def with_compute(model: CapeNext, **compute) -> CapeNext:
  """`model` computing as `compute` says: `dtype`, `remat`, `attention` (CapeNextConfig
  fields). A new module over the same Variables (weights, BatchNorm statistics, RNG streams:
  nothing is copied, and what one of the two updates the other sees)."""
  unknown = sorted(set(compute) - set(COMPUTE_FIELDS))
  if unknown:
    raise ValueError(f'with_compute: unknown fields {unknown} (expected {COMPUTE_FIELDS})')
  copy = nnx.merge(*nnx.split(model))
  copy.config = dataclasses.replace(model.config, **compute)
  copy._set_compute()
  return copy


def _check_tokens(name: str, tokens: jax.Array, lead: tuple[int, ...]):
  if tokens.shape != (*lead, CONTEXT_LENGTH) or not jnp.issubdtype(tokens.dtype, jnp.integer):
    raise ValueError(f'{name} must be integer [{", ".join(map(str, lead))}, {CONTEXT_LENGTH}], '
                     f'got {tokens.dtype} {tuple(tokens.shape)}')

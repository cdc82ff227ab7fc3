"""The image backbones CapeNext can use, by architecture and by named size (docs/DESIGN.md,
"Backbones").

An architecture (`ARCHS`, keyed by `arch`) is a frozen config dataclass and a module:

  config: fields with the architecture's sizes, including `img_size` (side of the square query
    image the model takes: the data pipeline's crop size); properties `num_features` (channels
    of the feature map the head reads) and `output_resolution` (its side).
  module: `Module(config, *, rngs)`; `module(x)`: x float32 [B, S, S, 3] NHWC, ImageNet-normalised
    -> [B, h, w, num_features] NHWC. BatchNorm statistics are `nnx.BatchStat` variables and follow
    `model.train()` / `model.eval()` (`layers.BatchNorm`).

A preset (`PRESETS`, keyed by the names configs and `CapeNextConfig.variant` take) is a config
builder `image_size -> config`, the default image size, and whether it is a CPU test size (then the
tiny CLIP and head go with it). Configs serialise as `{'arch': name, **fields}`.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

from flax import nnx

from capenext_jax.models.hrnet import HRNetBackbone, HRNetConfig
from capenext_jax.models.resnet import ResNet, ResNetConfig
from capenext_jax.models.swin_v2 import SwinTransformerV2, SwinV2Config
from capenext_jax.models.vit import DinoV2Backbone, DinoV2Config, TimmViTConfig, ViTFeatureExtractor


@dataclasses.dataclass(frozen=True)
class Arch:
  config: type
  module: Callable[..., nnx.Module]


ARCHS: dict[str, Arch] = {
    'swin_v2': Arch(SwinV2Config, SwinTransformerV2),
    'resnet': Arch(ResNetConfig, ResNet),
    'hrnet': Arch(HRNetConfig, HRNetBackbone),
    'vit': Arch(TimmViTConfig, ViTFeatureExtractor),
    'dinov2': Arch(DinoV2Config, DinoV2Backbone),
}


@dataclasses.dataclass(frozen=True)
class Preset:
  arch: str
  fields: Mapping[str, Any]       # config fields besides img_size
  image_size: int = 256           # default input side (the official config of that backbone)
  test_size: bool = False         # a CPU test model: CapeNextConfig.variant pairs it with tiny parts

  def config(self, image_size: int | None = None):
    return ARCHS[self.arch].config(img_size=image_size or self.image_size, **self.fields)


_SWIN = dict(window_size=16, drop_path_rate=0.2)
PRESETS: dict[str, Preset] = {
    # Microsoft's Swin V2 releases (window 16, drop path 0.2).
    'swinv2_t': Preset('swin_v2', dict(_SWIN, embed_dim=96, depths=(2, 2, 6, 2),
                                       num_heads=(3, 6, 12, 24))),
    'swinv2_s': Preset('swin_v2', dict(_SWIN, embed_dim=96, depths=(2, 2, 18, 2),
                                       num_heads=(3, 6, 12, 24))),
    'swinv2_b': Preset('swin_v2', dict(_SWIN, embed_dim=128, depths=(2, 2, 18, 2),
                                       num_heads=(4, 8, 16, 32))),
    'resnet50': Preset('resnet', dict(stage_blocks=(3, 4, 6))),
    'hrnet_w32': Preset('hrnet', {}),
    # timm vit_base_patch16_224 at 224 px (the official clip_vit configs crop 224), and DINOv2
    # ViT-S/14 on the 256 px query resized to 224 inside the module.
    'vit_b16': Preset('vit', {}, image_size=224),
    'dinov2_s14': Preset('dinov2', {}),
    # CPU test sizes.
    'tiny': Preset('swin_v2', dict(embed_dim=16, depths=(1, 1, 1, 1), num_heads=(1, 2, 2, 4),
                                   window_size=4, drop_path_rate=0.2), test_size=True),
    'resnet_tiny': Preset('resnet', dict(stage_blocks=(1, 1, 1), base_width=8),
                          test_size=True),
    'hrnet_tiny': Preset('hrnet', dict(stage1_blocks=1, stage1_channels=8,
                                       num_modules=(1, 1, 1), num_blocks=1,
                                       channels=(8, 16, 32, 64), neck_channels=(32, 64)),
                         test_size=True),
    # 4x4 feature maps at 64 px, as the other test sizes: patch 16, and 64 -> 56 px, patch 14
    # (position embedding laid out for 9x9 patches, so it is resampled as in DINOv2).
    'vit_tiny': Preset('vit', dict(embed_dim=32, depth=1, num_heads=2, adaptor_channels=32),
                       image_size=64, test_size=True),
    'dinov2_tiny': Preset('dinov2', dict(input_size=56, pos_size=126, embed_dim=32, depth=1,
                                         num_heads=2), image_size=64, test_size=True),
}


def preset(name: str) -> Preset:
  if name not in PRESETS:
    raise ValueError(f'backbone {name!r}: expected one of {sorted(PRESETS)}')
  return PRESETS[name]


def test_size_of(name: str) -> str:
  """The CPU test preset of a preset's architecture (itself if it is one)."""
  arch = preset(name).arch
  if PRESETS[name].test_size:
    return name
  return next(n for n, p in PRESETS.items() if p.arch == arch and p.test_size)


def arch_of(config) -> str:
  """The registry name of a backbone config's architecture."""
  for name, arch in ARCHS.items():
    if type(config) is arch.config:
      return name
  raise TypeError(f'{type(config).__name__} is not a backbone config (one of '
                  f'{[a.config.__name__ for a in ARCHS.values()]})')


def build(config, *, rngs: nnx.Rngs) -> nnx.Module:
  """The backbone module of `config`."""
  return ARCHS[arch_of(config)].module(config, rngs=rngs)


def config_to_dict(config) -> dict:
  """JSON-able `{'arch': name, **fields}` (tuples become lists when dumped)."""
  return {'arch': arch_of(config), **dataclasses.asdict(config)}


def config_from_dict(d: Mapping, where: str = 'backbone'):
  """Inverse of `config_to_dict`. Missing fields take their defaults; unknown ones raise."""
  d = dict(d)
  name = d.pop('arch', None)
  if name not in ARCHS:
    raise ValueError(f'{where}.arch: {name!r} is not a backbone architecture (expected one of '
                     f'{sorted(ARCHS)})')
  cls = ARCHS[name].config
  unknown = sorted(set(d) - {f.name for f in dataclasses.fields(cls)})
  if unknown:
    raise ValueError(f'{where}: unknown fields {unknown} for {cls.__name__} (arch {name!r})')
  return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})

"""ResNet: torchvision / mmpose state dicts (`conv1`, `bn1`, `layer{k}.{b}.*`) <-> our weights.

The same names serve torchvision's ImageNet release (`resnet50-*.pth`, what the official
`torchvision://resnet50` loads) and CapeNext's `backbone.*` group. Our model builds the stages
up to the one the head reads (`ResNetConfig.stage_blocks`); later stages (ResNet-50's
`layer4`, run by the official model and discarded) and the classifier `fc` are skipped by
name, and not recreated on export.
"""
from __future__ import annotations

import functools
import os
import re
from collections.abc import Mapping

import numpy as np

from capenext_jax.convert import conv_nets
from capenext_jax.convert.torch_io import load_state_dict
from capenext_jax.models.layers import init_rngs
from capenext_jax.models.resnet import ResNet, ResNetConfig

OFFICIAL_STAGES = 3   # the official head reads stage 3 (mmpose out_indices (2, 3), output [0])
_LAYER = re.compile(r'layer(\d+)\.')


def _rename(module: str) -> str:
  """Our 'layers.2.0.conv1' -> torch 'layer3.0.conv1'."""
  return re.sub(r'^layers\.(\d+)', lambda m: f'layer{int(m.group(1)) + 1}', module)


def config_from_torch(sd: Mapping[str, np.ndarray], num_stages: int | None = None,
                      img_size: int = 256) -> ResNetConfig:
  """The ResNetConfig of a state dict's first `num_stages` stages (default: all it has)."""
  present = conv_nets.count_indexed(sd, r'layer(\d+)\.0\.conv1\.weight')
  if 'layer1.0.conv1.weight' not in sd:
    raise ValueError('not a ResNet state dict: no layer1.0.conv1.weight')
  num_stages = present if num_stages is None else num_stages
  if num_stages > present:
    raise ValueError(f'the model has {num_stages} stages, the state dict only {present} '
                     f'(missing layer{present + 1}.*)')
  blocks = tuple(conv_nets.count_indexed(sd, rf'layer{k + 1}\.(\d+)\.conv1\.weight')
                 for k in range(num_stages))
  return ResNetConfig(img_size=img_size, stage_blocks=blocks,
                      base_width=int(np.shape(sd['layer1.0.conv1.weight'])[0]))


@functools.lru_cache(maxsize=None)
def _expected(config: ResNetConfig) -> dict:
  return conv_nets.expected_weights(lambda: ResNet(config, rngs=init_rngs(0)))


def resnet_from_torch(sd: Mapping[str, np.ndarray], config: ResNetConfig | None = None,
                      what: str = 'ResNet state dict') -> dict:
  """torchvision-named state dict -> our ResNet weights (of `config`, default inferred from
  the names, every stage). Stages past the config's and `fc.*` are skipped; anything else that
  is missing or unknown raises ValueError naming the keys."""
  config = config or config_from_torch(sd)
  n = len(config.stage_blocks)
  skipped = lambda k: k.startswith('fc.') or bool(
      (m := _LAYER.match(k)) and int(m.group(1)) > n)
  return conv_nets.from_torch(sd, _expected(config), _rename, what=what, skipped=skipped)


def resnet_to_torch(weights: Mapping) -> dict[str, np.ndarray]:
  """Inverse of `resnet_from_torch` (the stages we hold; no `num_batches_tracked`)."""
  return conv_nets.to_torch(weights, _rename)


def resnet_from_official(sd: Mapping[str, np.ndarray]) -> dict:
  """CapeNext's `backbone.*` group of a resnet50 checkpoint (names without the prefix)."""
  return resnet_from_torch(sd, config_from_torch(sd, OFFICIAL_STAGES),
                           what='ResNet backbone')


def load_torchvision_resnet(path: str | os.PathLike, config: ResNetConfig) -> dict:
  """Weights for a ResNet of `config` from torchvision's release (e.g. `resnet50-0676ba61.pth`,
  `resnet50-11ad3fa6.pth`), or any file with those names."""
  sd = load_state_dict(path)
  try:
    if 'layer1.0.conv1.weight' not in sd:
      raise ValueError(f'not a torchvision ResNet (no layer1.0.conv1.weight; keys start '
                       f'{sorted(sd)[:3]})')
    return resnet_from_torch(sd, config, what='ResNet backbone')
  except ValueError as e:
    raise ValueError(f'{path}: {e}') from e

"""HRNet: mmpose state dicts and the ImageNet release <-> our weights.

Our `HRNetBackbone` is `hrnet` (mmpose's HRNet; torch names are its names) plus CapeNext's
`conv_block1` / `conv_block2`, which the official model holds at its top level (keys
`conv_block1.0.weight`, ...), not under `backbone.`. So the backbone converters here take and
give the HRNet names without a prefix and the `conv_block*` names as they are.

The ImageNet release `hrnet_w32-36af842e.pth` is the HRNet classification network: besides
mmpose's modules it holds the classifier (`incre_modules`, `downsamp_modules`, `final_layer`,
`classifier`) and, since its last stage outputs every resolution, the last module's fuse layers
into the lower-resolution branches. mmpose loads it non-strictly and ignores those; here they
are skipped by name, and everything else must fit.
"""
from __future__ import annotations

import functools
import os
import re
from collections.abc import Mapping

import numpy as np

from capenext_jax.convert import conv_nets
from capenext_jax.convert.torch_io import load_state_dict
from capenext_jax.models.hrnet import HRNet, HRNetBackbone, HRNetConfig
from capenext_jax.models.layers import init_rngs

NECK = ('conv_block1', 'conv_block2')
_CLASSIFIER = ('incre_modules.', 'downsamp_modules.', 'final_layer.', 'classifier.')


def _rename(module: str) -> str:
  """Our 'hrnet.stage2.0...' -> 'stage2.0...'; 'conv_block1.0' stays."""
  return module[len('hrnet.'):] if module.startswith('hrnet.') else module


def config_from_torch(sd: Mapping[str, np.ndarray], img_size: int = 256) -> HRNetConfig:
  """The HRNetConfig of an mmpose-named state dict (with `conv_block*`, or the default neck)."""
  if 'stage2.0.branches.0.0.conv1.weight' not in sd:
    raise ValueError('not an HRNet state dict: no stage2.0.branches.0.0.conv1.weight')
  n_stages = conv_nets.count_indexed(sd, r'stage(\d+)\.0\.branches\.0\.0\.conv1\.weight')
  modules = tuple(conv_nets.count_indexed(sd, rf'stage{k}\.(\d+)\.branches\.0\.0\.conv1\.weight')
                  for k in range(2, n_stages + 2))
  last = f'stage{n_stages + 1}.0.branches'
  channels = tuple(int(np.shape(sd[f'{last}.{i}.0.conv1.weight'])[0])
                   for i in range(n_stages + 1))
  neck = (tuple(int(np.shape(sd[f'{n}.0.weight'])[0]) for n in NECK)
          if f'{NECK[0]}.0.weight' in sd else HRNetConfig.neck_channels)
  return HRNetConfig(
      img_size=img_size,
      stage1_blocks=conv_nets.count_indexed(sd, r'layer1\.(\d+)\.conv1\.weight'),
      stage1_channels=int(np.shape(sd['layer1.0.conv1.weight'])[0]),
      num_modules=modules,
      num_blocks=conv_nets.count_indexed(sd, r'stage2\.0\.branches\.0\.(\d+)\.conv1\.weight'),
      channels=channels, neck_channels=neck)


@functools.lru_cache(maxsize=None)
def _expected(config: HRNetConfig, part: str) -> dict:
  if part == 'hrnet':   # the ImageNet release fills only the HRNet
    return conv_nets.expected_weights(lambda: HRNet(config, rngs=init_rngs(0)))
  return conv_nets.expected_weights(lambda: HRNetBackbone(config, rngs=init_rngs(0)))


def hrnet_from_official(sd: Mapping[str, np.ndarray]) -> dict:
  """mmpose HRNet names + `conv_block1/2.*` (CapeNext's backbone group) -> our
  `HRNetBackbone` weights. Missing or unknown keys raise ValueError naming them."""
  return conv_nets.from_torch(sd, _expected(config_from_torch(sd), 'backbone'), _rename,
                              what='HRNet backbone')


def hrnet_to_official(weights: Mapping) -> dict[str, np.ndarray]:
  """Inverse of `hrnet_from_official` (HRNet names without prefix, `conv_block*` as is)."""
  return conv_nets.to_torch(weights, _rename)


def hrnet_from_imagenet(sd: Mapping[str, np.ndarray], config: HRNetConfig) -> dict:
  """The ImageNet classification HRNet's state dict -> weights of our `hrnet` sub-module."""
  last_module = f'stage{len(config.num_modules) + 1}.{config.num_modules[-1] - 1}'
  lower_fuse = re.compile(rf'{re.escape(last_module)}\.fuse_layers\.[1-9]\d*\..*')
  skipped = lambda k: k.startswith(_CLASSIFIER) or bool(lower_fuse.fullmatch(k))
  return conv_nets.from_torch(sd, _expected(config, 'hrnet'), lambda m: m,
                              what='HRNet (ImageNet layout)', skipped=skipped)


def load_imagenet_hrnet(path: str | os.PathLike, config: HRNetConfig) -> dict:
  """Weights of our `hrnet` sub-module from `hrnet_w32-36af842e.pth` (or any file with the
  same names); `conv_block1/2` are not in the release and keep their initialisation."""
  sd = load_state_dict(path)
  try:
    if 'stage2.0.branches.0.0.conv1.weight' not in sd:
      raise ValueError(f'not an HRNet checkpoint (no stage2.0.branches.0.0.conv1.weight; keys '
                       f'start {sorted(sd)[:3]})')
    return hrnet_from_imagenet(sd, config)
  except ValueError as e:
    raise ValueError(f'{path}: {e}') from e

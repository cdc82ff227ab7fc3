"""Per-architecture weight converters of the image backbones (docs/DESIGN.md, "Backbones").

`CONVERTERS[arch]` says how one architecture's weights travel, as pure dict functions:

  from_official(sd) -> our backbone weights: `sd` holds the official CapeNext checkpoint's
      `backbone.*` keys without the prefix, plus the model-level keys that belong to our
      backbone module (`neck_prefixes`, e.g. HRNet's `conv_block1.*`) as they are.
  to_official(weights) -> the inverse (model-level names keep their prefix, the rest get
      `backbone.` from `convert/official.py`).
  recognise(names) -> whether official backbone names are this architecture's.
  our_keys: the top-level names of our backbone weights (how `to_official` callers without a
      config tell the architectures apart).
  official_preset: the `backbones.PRESETS` size an official checkpoint of it has.
  load_release(path, config) -> weights of `release_part` (our backbone module, or its
      sub-module of that name) from the public pretrained file (its own layout).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Collection, Mapping

import numpy as np

from capenext_jax.convert import hrnet as hrnet_convert
from capenext_jax.convert import resnet as resnet_convert
from capenext_jax.convert import swin as swin_convert
from capenext_jax.convert import vit as vit_convert


@dataclasses.dataclass(frozen=True)
class BackboneConverter:
  from_official: Callable[[Mapping[str, np.ndarray]], dict]
  to_official: Callable[[Mapping], dict[str, np.ndarray]]
  recognise: Callable[[Collection[str]], bool]
  official_preset: str
  our_keys: frozenset[str]
  load_release: Callable[..., dict]
  release_part: str | None = None
  neck_prefixes: tuple[str, ...] = ()


CONVERTERS: dict[str, BackboneConverter] = {
    'swin_v2': BackboneConverter(
        swin_convert.swin_from_torch, swin_convert.swin_to_torch,
        recognise=lambda names: 'patch_embed.proj.weight' in names and any(
            n.startswith('layers.0.blocks.') for n in names),
        official_preset='swinv2_t', our_keys=frozenset({'patch_embed', 'layers', 'norm'}),
        load_release=lambda path, config: swin_convert.load_microsoft_swinv2(path)),
    'resnet': BackboneConverter(
        resnet_convert.resnet_from_official, resnet_convert.resnet_to_torch,
        recognise=lambda names: 'layer1.0.conv1.weight' in names and 'conv1.weight' in names
        and not any(n.startswith('stage2.') for n in names),
        official_preset='resnet50', our_keys=frozenset({'conv1', 'bn1', 'layers'}),
        load_release=resnet_convert.load_torchvision_resnet),
    'hrnet': BackboneConverter(
        hrnet_convert.hrnet_from_official, hrnet_convert.hrnet_to_official,
        recognise=lambda names: 'stage2.0.branches.0.0.conv1.weight' in names,
        official_preset='hrnet_w32',
        our_keys=frozenset({'hrnet', *hrnet_convert.NECK}),
        load_release=hrnet_convert.load_imagenet_hrnet, release_part='hrnet',
        neck_prefixes=tuple(f'{n}.' for n in hrnet_convert.NECK)),
    'vit': BackboneConverter(
        vit_convert.feature_extractor_from_torch, vit_convert.feature_extractor_to_torch,
        recognise=lambda names: 'vit_backbone.cls_token' in names,
        official_preset='vit_b16', our_keys=frozenset({'vit_backbone', 'channel_adaptor'}),
        load_release=lambda path, config: vit_convert.load_backbone(config, path),
        release_part='vit_backbone'),
    'dinov2': BackboneConverter(
        vit_convert.dinov2_from_torch, vit_convert.vit_to_torch,
        recognise=lambda names: 'cls_token' in names and 'blocks.0.ls1.gamma' in names,
        official_preset='dinov2_s14',
        our_keys=frozenset({'cls_token', 'pos_embed', 'mask_token', 'patch_embed', 'blocks',
                            'norm'}),
        load_release=lambda path, config: vit_convert.load_backbone(config, path)),
}


def neck_prefixes() -> tuple[str, ...]:
  """Every model-level official prefix that belongs to some backbone."""
  return tuple(p for c in CONVERTERS.values() for p in c.neck_prefixes)


def official_arch(names: Collection[str]) -> str:
  """The architecture of an official checkpoint's backbone names; ValueError if none fits."""
  found = [arch for arch, c in CONVERTERS.items() if c.recognise(names)]
  if len(found) != 1:
    raise ValueError(f'backbone.* keys ({len(names)}, e.g. {sorted(names)[:4]}) fit '
                     f'{"no" if not found else "several"} known backbone architecture'
                     f'{"" if not found else "s " + str(found)} (one of {sorted(CONVERTERS)})')
  return found[0]


def our_arch(weights: Mapping) -> str:
  """The architecture of our backbone weights, by their top-level names."""
  keys = {str(k) for k in weights}
  found = [arch for arch, c in CONVERTERS.items() if keys == c.our_keys]
  if not found:
    raise ValueError(f'backbone weights with top-level names {sorted(keys)} are none of the '
                     f'known architectures {sorted(CONVERTERS)}')
  return found[0]

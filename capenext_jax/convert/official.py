"""Official CapeNext checkpoints (mmcv `.pth`, or `.npz` of the same keys) <-> our params.

The official state dict has four groups (docs/MODEL.md §7): `backbone.` (the image backbone:
Swin V2, ResNet, HRNet, ... recognised by its names, `convert/backbones.py`), `text_backbone.`
(CLIP, OpenAI layout), `keypoint_head.` and `additional_module.` (the fusion module). Model-level
keys of a backbone's own extra layers (HRNet's `conv_block1/2.*`) join the backbone group under
their own names. Each group is converted by its own pure-dict function; this module only routes
keys by prefix. Every key must be consumed: the group converters skip the known-unused ones
(Swin `head`, fusion `non_linear`, buffers) by explicit lists and raise on anything else.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import numpy as np

from capenext_jax import export
from capenext_jax.convert import backbones as backbone_convert
from capenext_jax.convert import clip as clip_convert
from capenext_jax.convert import head as head_convert
from capenext_jax.convert.torch_io import load_state_dict
from capenext_jax.models import backbones
from capenext_jax.models.capenext import CapeNextConfig
from capenext_jax.models.clip import CLIPConfig
from capenext_jax.models.fusion import (CROSS_ATTENTION_ENCODER, CROSS_ATTENTION_LAYER,
                                        WITHOUT_CATEGORY, WITHOUT_IMAGE, FusionConfig)
from capenext_jax.models.head import HeadConfig
from capenext_jax.models.swin_v2 import SwinV2Config

def _backbone_from_official(sd: Mapping[str, np.ndarray]) -> dict:
  arch = backbone_convert.official_arch(set(sd))
  return backbone_convert.CONVERTERS[arch].from_official(sd)


def _backbone_to_official(weights: Mapping) -> dict[str, np.ndarray]:
  """Backbone names without `backbone.`; model-level (neck) names start with their prefix."""
  return backbone_convert.CONVERTERS[backbone_convert.our_arch(weights)].to_official(weights)


# prefix -> (our sub-module name, official -> ours, ours -> official)
GROUPS = {
    'backbone.': ('backbone', _backbone_from_official, _backbone_to_official),
    'text_backbone.': ('clip', clip_convert.clip_from_openai, clip_convert.clip_to_openai),
    'keypoint_head.': ('head', head_convert.head_from_torch, head_convert.head_to_torch),
    'additional_module.': ('fusion', head_convert.fusion_from_torch,
                           head_convert.fusion_to_torch),
}
# Trainable in torch but never used by the forward pass, so they never get a gradient.
KNOWN_UNUSED_GRADS = ()


def split_groups(state_dict: Mapping[str, np.ndarray]) -> dict[str, dict[str, np.ndarray]]:
  """Official flat names -> {prefix: {name without prefix: array}}; unknown prefixes raise."""
  groups: dict[str, dict[str, np.ndarray]] = {p: {} for p in GROUPS}
  necks = backbone_convert.neck_prefixes()
  for key, value in state_dict.items():
    if key.startswith(necks):
      groups['backbone.'][key] = np.asarray(value)
      continue
    prefix = next((p for p in GROUPS if key.startswith(p)), None)
    if prefix is None:
      raise ValueError(f'unexpected key {key!r} in the CapeNext state dict (expected one of the '
                       f'groups {", ".join(tuple(GROUPS) + necks)})')
    groups[prefix][key[len(prefix):]] = np.asarray(value)
  return groups


def capenext_from_official(state_dict: Mapping[str, np.ndarray]) -> dict:
  """Official state dict (flat names) -> our nested params pure dict, CLIP included.

  A checkpoint without `additional_module.` keys is plain CapeX (no fusion params); the fusion
  variant is read from its keys (`official_model_config` gives the matching config).
  """
  params = {}
  for prefix, part in split_groups(state_dict).items():
    name, from_torch, _ = GROUPS[prefix]
    if not part:
      if prefix == 'additional_module.':
        continue
      raise ValueError(f'the state dict has no {prefix}* keys')
    try:
      params[name] = from_torch(part)
    except ValueError as e:
      raise ValueError(f'{prefix}: {e}') from e
  return params


def capenext_to_official(params: Mapping, config: CapeNextConfig | None = None
                         ) -> dict[str, np.ndarray]:
  """Inverse of `capenext_from_official` (unused official keys are not recreated).

  The fusion variant comes from `config.fusion`, or without a config from the params' layout
  (the double and triple encoders share one layout: those need the config).
  """
  out = {}
  necks = backbone_convert.neck_prefixes()
  for prefix, (name, _, to_torch) in GROUPS.items():
    if name not in params:
      continue
    if name == 'fusion':
      part = to_torch(params[name], config.fusion if config else _fusion_config_of(params[name]))
    else:
      part = to_torch(params[name])
    out.update({k if k.startswith(necks) else prefix + k: v for k, v in part.items()})
  return out


def _fusion_config_of(params: Mapping) -> FusionConfig:
  """The fusion variant of our fusion params, where their layout decides it."""
  if 'encoder_layer1' in params:
    raise ValueError('fusion params of a stacked encoder: pass the model config (the double and '
                     'triple encoders have the same parameters)')
  if 'layers' in params or 'layer' in params:
    return FusionConfig(module=CROSS_ATTENTION_ENCODER if 'layers' in params
                        else CROSS_ATTENTION_LAYER)
  if 'text_cross_attention_layer' not in params:
    return FusionConfig(module=WITHOUT_CATEGORY)
  if 'image_cross_attention_layer' not in params:
    return FusionConfig(module=WITHOUT_IMAGE)
  return FusionConfig()


def official_model_config(state_dict: Mapping[str, np.ndarray]) -> CapeNextConfig:
  """The official sizes of the checkpoint's backbone architecture (the checkpoint does not
  say its sizes) with the fusion variant its keys show (CapeX without `additional_module.*`)."""
  backbone_names = {k[len('backbone.'):] for k in state_dict if k.startswith('backbone.')}
  arch = backbone_convert.official_arch(backbone_names)
  config = CapeNextConfig.variant(backbone_convert.CONVERTERS[arch].official_preset)
  fusion_names = [k[len('additional_module.'):] for k in state_dict
                  if k.startswith('additional_module.')]
  if not fusion_names:
    return dataclasses.replace(config, fusion=None)
  return dataclasses.replace(
      config, fusion=FusionConfig(module=head_convert.fusion_module_of(fusion_names)))


def infer_model_config(state_dict: Mapping[str, np.ndarray], params: Mapping
                       ) -> CapeNextConfig:
  """The model config whose weights have the names and shapes of `params` (our pure dict of
  `state_dict`), among the named sizes of the checkpoint's backbone architecture
  (`backbones.PRESETS`: official and CPU test sizes, with the fusion variant its keys show).
  ValueError when none fits (a size of one's own: the checkpoint does not say it) or several
  do. Each candidate is an abstract build (`export.check_fits`): milliseconds to a second."""
  official = official_model_config(state_dict)
  arch = backbones.arch_of(official.backbone)
  fits = []
  for name, preset in backbones.PRESETS.items():
    if preset.arch != arch:
      continue
    candidate = CapeNextConfig.variant(name)
    candidate = dataclasses.replace(candidate, fusion=official.fusion and dataclasses.replace(
        official.fusion, dropout=candidate.fusion.dropout))
    try:
      export.check_fits(candidate, params)
    except ValueError:
      continue
    fits.append((name, candidate))
  if len(fits) == 1:
    return fits[0][1]
  which = (f'the sizes of several named {arch} models fit ({", ".join(n for n, _ in fits)})'
           if fits else f'no named {arch} model size fits its parameter shapes')
  raise ValueError(f'{which}: give its model config (a config.json of an export or a train.py '
                   f'workdir, or CapeNextConfig.to_dict() as JSON)')


def load_official(path: str) -> dict:
  """Read an official checkpoint safely (no pickled code runs) and convert it."""
  return capenext_from_official(load_state_dict(path))


def config_from_fixture(cfg: Mapping) -> CapeNextConfig:
  """CapeNextConfig from a parity fixture's `config_json` (the official constructor sizes)."""
  enc, head, clip = cfg['encoder_config'], cfg['keypoint_head'], cfg['clip']
  tr = head['transformer']
  swin = SwinV2Config(img_size=enc['img_size'], embed_dim=enc['embed_dim'],
                      depths=tuple(enc['depths']), num_heads=tuple(enc['num_heads']),
                      window_size=enc['window_size'], drop_path_rate=enc['drop_path_rate'])
  config = CapeNextConfig(
      backbone=swin,
      clip=CLIPConfig(**{k: clip[k] for k in (
          'embed_dim', 'image_resolution', 'vision_layers', 'vision_width', 'vision_patch_size',
          'context_length', 'vocab_size', 'transformer_width', 'transformer_heads',
          'transformer_layers')}),
      fusion=FusionConfig() if cfg.get('additional_module') else None,
      head=HeadConfig(d_model=tr['d_model'], nhead=tr['nhead'],
                      num_encoder_layers=tr['num_encoder_layers'],
                      num_decoder_layers=tr['num_decoder_layers'],
                      dim_feedforward=tr['dim_feedforward'], dropout=tr['dropout'],
                      similarity_proj_dim=tr['similarity_proj_dim'],
                      dynamic_proj_dim=tr['dynamic_proj_dim']))
  # The widths where the parts meet are derived in CapeNextConfig; the fixture must agree.
  derived = (config.head.num_feats, config.head.img_in_channels, config.head.text_in_channels,
             config.fusion and config.fusion.embed_dim)
  given = (head['positional_encoding']['num_feats'], head['img_in_channels'],
           head['text_in_channels'],
           cfg.get('additional_module') and cfg['additional_module']['model_params']['embed_dim'])
  if derived != given:
    raise ValueError(f'fixture widths {given} (num_feats, img_in_channels, text_in_channels, '
                     f'fusion embed_dim) differ from the ones its sizes imply: {derived}')
  return config

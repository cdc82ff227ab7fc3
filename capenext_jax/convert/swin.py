"""Swin Transformer V2: official PyTorch state dict (names without `backbone.`) <-> our params.

The same names serve CapeNext's `backbone.*` group and Microsoft's ImageNet release
(`swinv2_tiny_patch4_window16_256.pth`, a `{'model': state_dict}`). The stage/block structure
is read from the names themselves, so any depth works; within it every parameter must be present.
Buffers (recomputed from the config) and the unused classifier head are skipped by name.
"""
from __future__ import annotations

import os
import re
from collections.abc import Mapping

import numpy as np

from capenext_jax.convert import entries
from capenext_jax.convert.torch_io import load_state_dict
from capenext_jax.models import swin_v2

# Official entries that carry no parameter of ours.
_SKIPPED = (
    re.compile(r'layers\.\d+\.blocks\.\d+\.attn\.relative_coords_table'),
    re.compile(r'layers\.\d+\.blocks\.\d+\.attn\.relative_position_index'),
    re.compile(r'layers\.\d+\.blocks\.\d+\.attn_mask'),
    re.compile(r'head\.(weight|bias)'),
)
_BLOCK = re.compile(r'layers\.(\d+)\.blocks\.(\d+)\.')

def _entries(depths: list[int]) -> list[entries.Entry]:
  """(official name, path in our pure dict, kind) of every parameter of a model with `depths`."""
  out = []

  def linear(name, path, bias=True):
    out.append((f'{name}.weight', path + ('kernel',), 'linear'))
    if bias:
      out.append((f'{name}.bias', path + ('bias',), 'copy'))

  def norm(name, path):
    out.append((f'{name}.weight', path + ('scale',), 'copy'))
    out.append((f'{name}.bias', path + ('bias',), 'copy'))

  out.append(('patch_embed.proj.weight', ('patch_embed', 'proj', 'kernel'), 'conv'))
  out.append(('patch_embed.proj.bias', ('patch_embed', 'proj', 'bias'), 'copy'))
  norm('patch_embed.norm', ('patch_embed', 'norm'))
  for s, depth in enumerate(depths):
    for b in range(depth):
      name, path = f'layers.{s}.blocks.{b}', ('layers', s, 'blocks', b)
      norm(f'{name}.norm1', path + ('norm1',))
      for p in ('logit_scale', 'q_bias', 'v_bias'):
        out.append((f'{name}.attn.{p}', path + ('attn', p), 'copy'))
      linear(f'{name}.attn.qkv', path + ('attn', 'qkv'), bias=False)
      linear(f'{name}.attn.proj', path + ('attn', 'proj'))
      linear(f'{name}.attn.cpb_mlp.0', path + ('attn', 'cpb_mlp_0'))
      linear(f'{name}.attn.cpb_mlp.2', path + ('attn', 'cpb_mlp_2'), bias=False)
      norm(f'{name}.norm2', path + ('norm2',))
      linear(f'{name}.mlp.fc1', path + ('mlp', 'fc1'))
      linear(f'{name}.mlp.fc2', path + ('mlp', 'fc2'))
    if s < len(depths) - 1:
      linear(f'layers.{s}.downsample.reduction', ('layers', s, 'downsample', 'reduction'),
             bias=False)
      norm(f'layers.{s}.downsample.norm', ('layers', s, 'downsample', 'norm'))
  norm('norm', ('norm',))
  return out


def _depths_from_names(names) -> list[int]:
  """Blocks per stage, from the highest `layers.{s}.blocks.{b}` indices present."""
  last: dict[int, int] = {}
  for name in names:
    m = _BLOCK.match(name)
    if m:
      s, b = int(m.group(1)), int(m.group(2))
      last[s] = max(last.get(s, -1), b)
  if not last:
    raise ValueError('no layers.{s}.blocks.{b}.* keys: not a Swin V2 state dict')
  for s in range(max(last) + 1):
    if s not in last:
      raise ValueError(f'missing every key of layers.{s}.blocks.*')
  return [last[s] + 1 for s in range(len(last))]


def swin_from_torch(sd: Mapping[str, np.ndarray]) -> dict:
  """Official Swin V2 state dict -> nested pure dict as `nnx.to_pure_dict(nnx.state(model,
  nnx.Param))` yields it (int keys for block / stage indices), float32 numpy arrays.

  Raises ValueError naming any key that is neither a parameter of the inferred structure nor a
  known skippable entry, and any missing parameter.
  """
  return entries.params_from_entries(sd, _entries(_depths_from_names(sd)), _SKIPPED,
                                     'Swin V2 ')


def swin_to_torch(params: Mapping) -> dict[str, np.ndarray]:
  """Inverse of `swin_from_torch`: official names and layouts, float32 (no buffers, no head).

  Accepts int or string stage / block indices (pure dicts or our exported files).
  """
  stages = entries.by_index(params['layers'])
  depths = [len(entries.by_index(stages[s]['blocks'])) for s in range(len(stages))]
  return entries.entries_to_torch(params, _entries(depths))


def swin_buffers(config: swin_v2.SwinV2Config) -> dict[str, np.ndarray]:
  """The official non-parameter buffers for `config` (needed to load our weights into the
  PyTorch model with strict=True): relative_coords_table [1,2w-1,2w-1,2] f32,
  relative_position_index [w²,w²] int64 per block, attn_mask [nW,w²,w²] f32 on shifted blocks."""
  out = {}
  for s, depth in enumerate(config.depths):
    window, shift = config.stage_window(s)
    for b in range(depth):
      name = f'layers.{s}.blocks.{b}'
      out[f'{name}.attn.relative_coords_table'] = swin_v2.relative_coords_table(
          window, config.pretrained_window_sizes[s])[None].copy()
      out[f'{name}.attn.relative_position_index'] = swin_v2.relative_position_index(window).copy()
      if b % 2 and shift:
        out[f'{name}.attn_mask'] = swin_v2.shifted_window_mask(
            config.stage_resolution(s), window, shift).copy()
  return out


def load_microsoft_swinv2(path: str | os.PathLike) -> dict:
  """Params of Microsoft's Swin V2 release (e.g. `swinv2_tiny_patch4_window16_256.pth`, read
  with torch's weights_only loader) or of any file holding the same names."""
  state_dict = load_state_dict(path)   # its errors name the file already
  try:
    return swin_from_torch(state_dict)
  except ValueError as e:
    raise ValueError(f'{path}: {e}') from e

"""Pure-dict weight conversion for the fusion module and the pose head.

`*_from_torch(sd)` takes a flat official state dict (name -> np.ndarray) *without* its
`additional_module.` / `keypoint_head.` prefix and returns the nested pure dict of
`nnx.to_pure_dict(nnx.state(model, nnx.Param))` (list entries keyed by int). `*_to_torch` is the
inverse. Every key must be consumed: an unknown or missing key is a ValueError naming it. The
fusion modules' `non_linear.*` (built but never called by the official model) is skipped on
input and therefore not produced on output; so is the triple encoder's unused `encoder_layer3`
(written back as a copy of `encoder_layer2`, see `fusion_to_torch`).

Layouts: Linear `W [out, in]` -> kernel `W.T`; 1x1 Conv2d / Conv1d (k=1) -> Dense with kernel
`W[:, :, 0(, 0)].T`; LayerNorm weight -> scale; MHA packed `in_proj_weight [3E, E]` /
`in_proj_bias [3E]` or separate `q/k/v_proj_weight` + `in_proj_bias` -> q_proj, k_proj, v_proj.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Callable

import numpy as np

from capenext_jax.models import fusion
from capenext_jax.models.fusion import FusionConfig

Path = tuple  # path into the nested pure dict (str and int entries)


# ----------------------------------------------------------------------------- per-kind rules
# Each rule maps torch tensors (suffix -> array) to our leaves (relative path -> array) and back.
def _linear_in(t):
  return {('kernel',): t['weight'].T, ('bias',): t['bias']}


def _linear_out(p):
  return {'weight': p[('kernel',)].T, 'bias': p[('bias',)]}


def _conv_in(t):
  w = t['weight']
  if w.ndim < 3 or any(s != 1 for s in w.shape[2:]):
    raise ValueError(f'expected a kernel-1 convolution weight, got shape {list(w.shape)}')
  return {('kernel',): w.reshape(w.shape[:2]).T, ('bias',): t['bias']}


def _conv_out(spatial_dims: int):
  def out(p):
    w = p[('kernel',)].T
    return {'weight': w.reshape(w.shape + (1,) * spatial_dims), 'bias': p[('bias',)]}
  return out


def _ln_in(t):
  return {('scale',): t['weight'], ('bias',): t['bias']}


def _ln_out(p):
  return {'weight': p[('scale',)], 'bias': p[('bias',)]}


def _split3(x, name):
  if x.shape[0] % 3:
    raise ValueError(f'{name}: first dimension {x.shape[0]} is not divisible by 3')
  return np.split(x, 3, axis=0)


def _mha_leaves(ws, bs, out_w, out_b):
  leaves = {('out_proj', 'kernel'): out_w.T, ('out_proj', 'bias'): out_b}
  for proj, w, b in zip(('q_proj', 'k_proj', 'v_proj'), ws, bs):
    leaves[(proj, 'kernel')] = w.T
    leaves[(proj, 'bias')] = b
  return leaves


def _mha_packed_in(t):
  return _mha_leaves(_split3(t['in_proj_weight'], 'in_proj_weight'),
                     _split3(t['in_proj_bias'], 'in_proj_bias'),
                     t['out_proj.weight'], t['out_proj.bias'])


def _mha_packed_out(p):
  projs = ('q_proj', 'k_proj', 'v_proj')
  return {'in_proj_weight': np.concatenate([p[(k, 'kernel')].T for k in projs], axis=0),
          'in_proj_bias': np.concatenate([p[(k, 'bias')] for k in projs], axis=0),
          'out_proj.weight': p[('out_proj', 'kernel')].T,
          'out_proj.bias': p[('out_proj', 'bias')]}


def _mha_split_in(t):
  ws = [t[f'{k}_proj_weight'] for k in 'qkv']
  return _mha_leaves(ws, _split3(t['in_proj_bias'], 'in_proj_bias'),
                     t['out_proj.weight'], t['out_proj.bias'])


def _mha_split_out(p):
  out = {f'{k}_proj_weight': p[(f'{k}_proj', 'kernel')].T for k in 'qkv'}
  out['in_proj_bias'] = np.concatenate([p[(f'{k}_proj', 'bias')] for k in 'qkv'], axis=0)
  out['out_proj.weight'] = p[('out_proj', 'kernel')].T
  out['out_proj.bias'] = p[('out_proj', 'bias')]
  return out


_RULES: dict[str, tuple[tuple[str, ...], Callable, Callable]] = {
    # kind: (torch suffixes, to ours, to torch)
    'linear': (('weight', 'bias'), _linear_in, _linear_out),
    'conv1d': (('weight', 'bias'), _conv_in, _conv_out(1)),
    'conv2d': (('weight', 'bias'), _conv_in, _conv_out(2)),
    'ln': (('weight', 'bias'), _ln_in, _ln_out),
    'mha': (('in_proj_weight', 'in_proj_bias', 'out_proj.weight', 'out_proj.bias'),
            _mha_packed_in, _mha_packed_out),
    'mha_split': (('q_proj_weight', 'k_proj_weight', 'v_proj_weight', 'in_proj_bias',
                   'out_proj.weight', 'out_proj.bias'), _mha_split_in, _mha_split_out),
}


# ----------------------------------------------------------------------------- generic driver
def _from_torch(sd: dict, entries, skip: Callable[[str], bool], what: str) -> dict:
  remaining = {k: np.asarray(v) for k, v in sd.items() if not skip(k)}
  tree: dict = {}
  for torch_prefix, kind, path in entries:
    suffixes, to_ours, _ = _RULES[kind]
    tensors = {}
    for suffix in suffixes:
      name = f'{torch_prefix}.{suffix}'
      if name not in remaining:
        raise ValueError(f'{what}: missing key {name!r}')
      tensors[suffix] = remaining.pop(name)
    for leaf_path, value in to_ours(tensors).items():
      node = tree
      for part in path + leaf_path[:-1]:
        node = node.setdefault(part, {})
      node[leaf_path[-1]] = value
  if remaining:
    raise ValueError(f'{what}: unknown key {sorted(remaining)[0]!r}')
  return tree


def _flatten(tree: dict, prefix: Path = ()) -> dict[Path, np.ndarray]:
  flat = {}
  for k, v in tree.items():
    if isinstance(v, dict):
      flat.update(_flatten(v, prefix + (k,)))
    else:
      flat[prefix + (k,)] = np.asarray(v)
  return flat


def _to_torch(params: dict, entries, what: str) -> dict[str, np.ndarray]:
  leaves = _flatten(params)
  out = {}
  for torch_prefix, kind, path in entries:
    mine = {p[len(path):]: leaves.pop(p) for p in list(leaves) if p[:len(path)] == path}
    try:
      for suffix, value in _RULES[kind][2](mine).items():
        out[f'{torch_prefix}.{suffix}'] = value
    except KeyError as e:
      raise ValueError(f'{what}: missing parameter {"/".join(map(str, path + e.args[0]))}')
  if leaves:
    raise ValueError(f'{what}: unknown parameter {"/".join(map(str, sorted(leaves, key=str)[0]))}')
  return out


def _count(names, pattern: str) -> int:
  """Number of list entries: 1 + the largest index captured by `pattern` (0 if none)."""
  found = [int(m.group(1)) for n in names if (m := re.match(pattern, n))]
  return max(found) + 1 if found else 0


# ----------------------------------------------------------------------------- fusion
def _attention_layer_entries(name: str, ours: Path) -> list:
  """An official `AttentionLayer` / `CrossAttentionLayer` (same parameters)."""
  return [(f'{name}attn', 'mha', ours + ('attn',)),
          (f'{name}norm1', 'ln', ours + ('norm1',)),
          (f'{name}norm2', 'ln', ours + ('norm2',)),
          (f'{name}ffn.0', 'linear', ours + ('ffn', 'fc1')),
          (f'{name}ffn.3', 'linear', ours + ('ffn', 'fc2'))]


def _simple_entries(config: FusionConfig, name: str = '', ours: Path = ()) -> list:
  """`SimpleMultiModalModule` or a one-stream ablation, official names under `name`."""
  entries = _attention_layer_entries(f'{name}inter_attention_layer.',
                                     ours + ('inter_attention_layer',))
  if config.uses_category:
    entries += _attention_layer_entries(f'{name}text_cross_attention_layer.',
                                        ours + ('text_cross_attention_layer',))
    # The category-only ablation's official gate is `weight_text`.
    gate = 'weight_category' if config.uses_image else 'weight_text'
    entries.append((f'{name}{gate}', 'linear', ours + ('weight_category',)))
  if config.uses_image:
    entries += _attention_layer_entries(f'{name}image_cross_attention_layer.',
                                        ours + ('image_cross_attention_layer',))
    entries.append((f'{name}weight_image', 'linear', ours + ('weight_image',)))
  for ffn in ('inter_ffn', 'weighted_ffn'):
    entries += [(f'{name}{ffn}.0', 'linear', ours + (ffn, 'fc1')),
                (f'{name}{ffn}.3', 'linear', ours + (ffn, 'fc2'))]
  entries += [(f'{name}norm{i}', 'ln', ours + (f'norm{i}',)) for i in (1, 2, 3)]
  return entries


def _fusion_entries(config: FusionConfig) -> list:
  if config.module in fusion.STACKS:
    layer = dataclasses.replace(config, module=fusion.SIMPLE)
    return [e for i in (1, 2) for e in _simple_entries(layer, f'encoder_layer{i}.',
                                                       (f'encoder_layer{i}',))]
  if config.module == fusion.CROSS_ATTENTION_LAYER:
    return _attention_layer_entries('', ('layer',))
  if config.module == fusion.CROSS_ATTENTION_ENCODER:
    return [e for i in range(fusion.CROSS_ATTENTION_ENCODER_LAYERS)
            for e in _attention_layer_entries(f'layers.{i}.', ('layers', i))]
  return _simple_entries(config)


def fusion_module_of(names) -> str:
  """The official fusion class whose state dict has these names (prefix stripped)."""
  names = set(names)
  def has(prefix):
    return any(n.startswith(prefix) for n in names)
  if has('encoder_layer3.'):
    return 'SimpleMultiModalTripleEncoder'
  if has('encoder_layer1.'):
    return 'SimpleMultiModalDoubleEncoder'
  if has('layers.0.'):
    return fusion.CROSS_ATTENTION_ENCODER
  if 'attn.in_proj_weight' in names:
    return fusion.CROSS_ATTENTION_LAYER
  text, image = has('text_cross_attention_layer.'), has('image_cross_attention_layer.')
  if text and image:
    return fusion.SIMPLE
  if text or image:
    return fusion.WITHOUT_IMAGE if text else fusion.WITHOUT_CATEGORY
  raise ValueError(f'fusion: the keys match no official fusion module (e.g. '
                   f'{sorted(names)[:3]}); expected one of {", ".join(fusion.MODULES)}')


def _skipped(config: FusionConfig) -> Callable[[str], bool]:
  """Official keys built but never used by the forward: every `non_linear`, and the triple
  encoder's `encoder_layer3`."""
  unused = r'(encoder_layer\d\.)?non_linear\.'
  if config.module == 'SimpleMultiModalTripleEncoder':
    unused += r'|encoder_layer3\.'
  return lambda k: re.match(unused, k) is not None


def fusion_from_torch(sd: dict, config: FusionConfig | None = None) -> dict:
  """Official `additional_module.*` state dict (prefix stripped) -> our fusion pure dict.

  `config.module` says which official class wrote it; None reads it from the keys
  (`fusion_module_of`).
  """
  if config is None:
    config = FusionConfig(module=fusion_module_of(sd))
  return _from_torch(sd, _fusion_entries(config), _skipped(config), f'fusion {config.module}')


def fusion_to_torch(params: dict, config: FusionConfig = FusionConfig()) -> dict:
  """Inverse of `fusion_from_torch`, without the unused `non_linear.*`. The triple encoder's
  unused `encoder_layer3` is written as a copy of `encoder_layer2`, so that the file loads
  strictly into the official class and is recognised as the triple, not the double."""
  out = _to_torch(params, _fusion_entries(config), f'fusion {config.module}')
  if config.module == 'SimpleMultiModalTripleEncoder':
    out.update({'encoder_layer3.' + k[len('encoder_layer2.'):]: v.copy()
                for k, v in out.items() if k.startswith('encoder_layer2.')})
  return out


# ----------------------------------------------------------------------------- head
def _head_entries(num_encoder: int, num_decoder: int):
  t = 'transformer'
  entries = [('input_proj', 'conv2d', ('input_proj',)),
             ('text_proj', 'linear', ('text_proj',))]
  for i in range(num_encoder):
    src, dst = f'{t}.encoder.layers.{i}', ('encoder_layers', i)
    entries += [(f'{src}.self_attn', 'mha', dst + ('self_attn',))]
    entries += [(f'{src}.{n}', 'linear', dst + (n,)) for n in ('linear1', 'linear2')]
    entries += [(f'{src}.{n}', 'ln', dst + (n,)) for n in ('norm1', 'norm2')]
  pg = f'{t}.proposal_generator'
  entries += [(f'{pg}.support_proj', 'linear', ('proposal_generator', 'support_proj')),
              (f'{pg}.query_proj', 'linear', ('proposal_generator', 'query_proj')),
              (f'{pg}.dynamic_proj.0', 'linear', ('proposal_generator', 'dynamic_proj_in')),
              (f'{pg}.dynamic_proj.2', 'linear', ('proposal_generator', 'dynamic_proj_out'))]
  for i in range(num_decoder):
    src, dst = f'{t}.decoder.layers.{i}', ('decoder_layers', i)
    entries += [(f'{src}.self_attn', 'mha', dst + ('self_attn',)),
                (f'{src}.multihead_attn', 'mha_split', dst + ('cross_attn',)),
                (f'{src}.choker', 'linear', dst + ('choker',)),
                (f'{src}.ffn1.conv', 'conv1d', dst + ('gcn',)),
                (f'{src}.ffn2', 'linear', dst + ('ffn2',))]
    entries += [(f'{src}.{n}', 'ln', dst + (n,)) for n in ('norm1', 'norm2', 'norm3')]
  entries.append((f'{t}.decoder.norm', 'ln', ('decoder_norm',)))
  entries += [(f'{t}.decoder.ref_point_head.layers.{j}', 'linear', ('ref_point_head', 'layers', j))
              for j in range(2)]
  for i in range(num_decoder):
    entries += [(f'kpt_branch.{i}.mlp.{2 * j}', 'linear', ('kpt_branch', i, 'layers', j))
                for j in range(4)]
  return entries


def head_from_torch(sd: dict) -> dict:
  """Official `keypoint_head.*` state dict (prefix stripped) -> PoseHead pure dict.

  The numbers of encoder / decoder layers are read from the keys.
  """
  num_enc = _count(sd, r'transformer\.encoder\.layers\.(\d+)\.')
  num_dec = _count(sd, r'transformer\.decoder\.layers\.(\d+)\.')
  return _from_torch(sd, _head_entries(num_enc, num_dec), lambda k: False, 'head')


def head_to_torch(params: dict) -> dict:
  """Inverse of `head_from_torch`."""
  num_enc = len(params.get('encoder_layers', {}))
  num_dec = len(params.get('decoder_layers', {}))
  return _to_torch(params, _head_entries(num_enc, num_dec), 'head')

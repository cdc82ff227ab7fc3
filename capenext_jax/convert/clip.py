"""CLIP weights (OpenAI or Hugging Face layout) <-> our `models.clip.CLIP` params pure dict.

A conversion is a list of rules `(torch key, our flat keys, to_ours, to_torch)`: `to_ours` maps
one torch tensor to one array per flat key (the packed attention `in_proj` splits into q/k/v),
`to_torch` inverts it. Flat keys are '/'-joined pure-dict paths; block indices become `int`
keys in the nested dict, as `nnx.to_pure_dict` has them.

`logit_scale` is kept (as the `logit_scale` param of `CLIP`) so that OpenAI checkpoints round
trip exactly. Hugging Face's `position_ids` buffers are skipped.
"""
from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np

from capenext_jax import params as params_lib
from capenext_jax.convert.torch_io import load_state_dict
from capenext_jax.models.clip import CLIPConfig

Rule = tuple[str, tuple[str, ...], Callable, Callable]
_HF_SKIPPED = ('text_model.embeddings.position_ids', 'vision_model.embeddings.position_ids')


# ----------------------------------------------------------------------------- rule builders
def _same(t: str, o: str) -> list[Rule]:
  return [(t, (o,), lambda a: [a], lambda xs: xs[0])]


def _transposed(t: str, o: str) -> list[Rule]:
  """A torch Linear weight [out, in] stored as our [in, out] matrix."""
  return [(t, (o,), lambda a: [a.T], lambda xs: xs[0].T)]


def _linear(t: str, o: str) -> list[Rule]:
  return _transposed(f'{t}.weight', f'{o}/kernel') + _same(f'{t}.bias', f'{o}/bias')


def _norm(t: str, o: str) -> list[Rule]:
  return _same(f'{t}.weight', f'{o}/scale') + _same(f'{t}.bias', f'{o}/bias')


def _conv(t: str, o: str) -> list[Rule]:
  """Conv2d weight [O, I, kh, kw] <-> nnx.Conv kernel [kh, kw, I, O]."""
  return [(t, (o,), lambda a: [a.transpose(2, 3, 1, 0)], lambda xs: xs[0].transpose(3, 2, 0, 1))]


def _packed_attention(t: str, o: str) -> list[Rule]:
  """nn.MultiheadAttention `in_proj_{weight [3W, W], bias [3W]}` (q, k, v blocks)."""
  qkv = tuple(f'{o}/{p}_proj' for p in 'qkv')
  return [
      (f'{t}.in_proj_weight', tuple(f'{k}/kernel' for k in qkv),
       lambda a: [w.T for w in np.split(a, 3)], lambda xs: np.concatenate([x.T for x in xs])),
      (f'{t}.in_proj_bias', tuple(f'{k}/bias' for k in qkv),
       lambda a: np.split(a, 3), np.concatenate),
  ] + _linear(f'{t}.out_proj', f'{o}/out_proj')


# ----------------------------------------------------------------------------- layouts
def _openai_block(t: str, o: str) -> list[Rule]:
  return (_packed_attention(f'{t}.attn', f'{o}/attn') + _norm(f'{t}.ln_1', f'{o}/ln_1')
          + _linear(f'{t}.mlp.c_fc', f'{o}/mlp/c_fc')
          + _linear(f'{t}.mlp.c_proj', f'{o}/mlp/c_proj') + _norm(f'{t}.ln_2', f'{o}/ln_2'))


def _openai_rules(text_layers: int, vision_layers: int) -> list[Rule]:
  rules = (_same('token_embedding.weight', 'text/token_embedding/embedding')
           + _same('positional_embedding', 'text/positional_embedding')
           + _norm('ln_final', 'text/ln_final') + _same('text_projection', 'text/text_projection')
           + _same('logit_scale', 'logit_scale')
           + _conv('visual.conv1.weight', 'vision/conv1/kernel')
           + _same('visual.class_embedding', 'vision/class_embedding')
           + _same('visual.positional_embedding', 'vision/positional_embedding')
           + _norm('visual.ln_pre', 'vision/ln_pre') + _norm('visual.ln_post', 'vision/ln_post')
           + _same('visual.proj', 'vision/proj'))
  for i in range(text_layers):
    rules += _openai_block(f'transformer.resblocks.{i}', f'text/transformer/resblocks/{i}')
  for i in range(vision_layers):
    rules += _openai_block(f'visual.transformer.resblocks.{i}',
                           f'vision/transformer/resblocks/{i}')
  return rules


def _hf_block(t: str, o: str) -> list[Rule]:
  rules = _norm(f'{t}.layer_norm1', f'{o}/ln_1') + _norm(f'{t}.layer_norm2', f'{o}/ln_2')
  for p in ('q', 'k', 'v', 'out'):
    rules += _linear(f'{t}.self_attn.{p}_proj', f'{o}/attn/{p}_proj')
  return rules + _linear(f'{t}.mlp.fc1', f'{o}/mlp/c_fc') + _linear(f'{t}.mlp.fc2',
                                                                     f'{o}/mlp/c_proj')


def _hf_rules(text_layers: int, vision_layers: int) -> list[Rule]:
  rules = (_same('text_model.embeddings.token_embedding.weight', 'text/token_embedding/embedding')
           + _same('text_model.embeddings.position_embedding.weight', 'text/positional_embedding')
           + _norm('text_model.final_layer_norm', 'text/ln_final')
           + _transposed('text_projection.weight', 'text/text_projection')
           + _same('logit_scale', 'logit_scale')
           + _conv('vision_model.embeddings.patch_embedding.weight', 'vision/conv1/kernel')
           + _same('vision_model.embeddings.class_embedding', 'vision/class_embedding')
           + _same('vision_model.embeddings.position_embedding.weight',
                   'vision/positional_embedding')
           + _norm('vision_model.pre_layrnorm', 'vision/ln_pre')  # sic: HF's spelling
           + _norm('vision_model.post_layernorm', 'vision/ln_post')
           + _transposed('visual_projection.weight', 'vision/proj'))
  for i in range(text_layers):
    rules += _hf_block(f'text_model.encoder.layers.{i}', f'text/transformer/resblocks/{i}')
  for i in range(vision_layers):
    rules += _hf_block(f'vision_model.encoder.layers.{i}', f'vision/transformer/resblocks/{i}')
  return rules


# ----------------------------------------------------------------------------- helpers
def _count_layers(keys, pattern: str) -> int:
  """Number of blocks `i` with a key matching `pattern` (a regex with one `(\\d+)` group)."""
  found = {int(m.group(1)) for k in keys if (m := re.fullmatch(pattern, k))}
  return max(found) + 1 if found else 0


def _take(source: Mapping[str, np.ndarray], key: str, what: str) -> np.ndarray:
  if key not in source:
    raise ValueError(f'missing {what} {key!r}')
  return np.asarray(source[key])


def _to_ours(sd: Mapping[str, np.ndarray], rules: list[Rule], skipped=()) -> dict:
  flat = {}
  for tkey, okeys, to_ours, _ in rules:
    arrays = to_ours(_take(sd, tkey, 'torch key').astype(np.float32))
    flat.update(zip(okeys, (np.asarray(a, order='C') for a in arrays)))
  unknown = sorted(set(sd) - {r[0] for r in rules} - set(skipped))
  if unknown:
    raise ValueError(f'unexpected CLIP key {unknown[0]!r} ({len(unknown)} unknown keys)')
  return params_lib.unflatten(flat)


# ----------------------------------------------------------------------------- public API
def clip_from_openai(sd: Mapping[str, np.ndarray]) -> dict:
  """OpenAI `clip.model.CLIP.state_dict()` (flat, no `text_backbone.` prefix) -> pure dict.

  Matches `nnx.to_pure_dict(nnx.state(CLIP(config_from_openai(sd)), nnx.Param))`; fp16
  tensors come out fp32. Raises ValueError naming a missing or unknown key.
  """
  return _to_ours(sd, _openai_rules(
      _count_layers(sd, r'transformer\.resblocks\.(\d+)\..*'),
      _count_layers(sd, r'visual\.transformer\.resblocks\.(\d+)\..*')))


def clip_to_openai(params: Mapping) -> dict[str, np.ndarray]:
  """Inverse of `clip_from_openai`: our pure dict (int or str block keys) -> OpenAI layout."""
  flat = params_lib.flatten(params)
  rules = _openai_rules(_count_layers(flat, r'text/transformer/resblocks/(\d+)/.*'),
                        _count_layers(flat, r'vision/transformer/resblocks/(\d+)/.*'))
  sd = {tkey: to_torch([_take(flat, k, 'param') for k in okeys])
        for tkey, okeys, _, to_torch in rules}
  unknown = sorted(set(flat) - {k for r in rules for k in r[1]})
  if unknown:
    raise ValueError(f'unexpected CLIP param {unknown[0]!r} ({len(unknown)} unknown params)')
  return {k: np.asarray(v, order='C') for k, v in sd.items()}


def clip_from_hf(sd: Mapping[str, np.ndarray]) -> dict:
  """Hugging Face `CLIPModel` state dict (`text_model.*`, `vision_model.*`, projections,
  `logit_scale`) -> our pure dict. HF's separate q/k/v map directly; `position_ids` buffers
  are skipped. Raises ValueError naming a missing or unknown key."""
  return _to_ours(sd, _hf_rules(
      _count_layers(sd, r'text_model\.encoder\.layers\.(\d+)\..*'),
      _count_layers(sd, r'vision_model\.encoder\.layers\.(\d+)\..*')), skipped=_HF_SKIPPED)


def config_from_openai(sd: Mapping[str, np.ndarray]) -> CLIPConfig:
  """CLIPConfig from OpenAI-layout tensor shapes, as `clip.model.build_model` infers it
  (heads = width // 64, which shapes cannot tell)."""
  conv = _take(sd, 'visual.conv1.weight', 'torch key')
  grid = round((_take(sd, 'visual.positional_embedding', 'torch key').shape[0] - 1) ** 0.5)
  width = _take(sd, 'ln_final.weight', 'torch key').shape[0]
  return CLIPConfig(
      embed_dim=_take(sd, 'text_projection', 'torch key').shape[1],
      image_resolution=conv.shape[-1] * grid,
      vision_layers=_count_layers(sd, r'visual\.transformer\.resblocks\.(\d+)\..*'),
      vision_width=conv.shape[0], vision_patch_size=conv.shape[-1],
      context_length=_take(sd, 'positional_embedding', 'torch key').shape[0],
      vocab_size=_take(sd, 'token_embedding.weight', 'torch key').shape[0],
      transformer_width=width, transformer_heads=width // 64,
      transformer_layers=_count_layers(sd, r'transformer\.resblocks\.(\d+)\..*'))


def config_from_hf(sd: Mapping[str, np.ndarray], hf_config: Mapping | None = None) -> CLIPConfig:
  """CLIPConfig from HF-layout tensor shapes; head counts from the HF `config.json` dict
  when given, else head size 64. Raises ValueError for an activation other than QuickGELU."""
  conv = _take(sd, 'vision_model.embeddings.patch_embedding.weight', 'torch key')
  n_pos = _take(sd, 'vision_model.embeddings.position_embedding.weight', 'torch key').shape[0]
  token = _take(sd, 'text_model.embeddings.token_embedding.weight', 'torch key')
  context = _take(sd, 'text_model.embeddings.position_embedding.weight', 'torch key').shape[0]
  text_cfg = (hf_config or {}).get('text_config', {})
  vision_cfg = (hf_config or {}).get('vision_config', {})
  for name, cfg in (('text_config', text_cfg), ('vision_config', vision_cfg)):
    if cfg.get('hidden_act', 'quick_gelu') != 'quick_gelu':
      raise ValueError(f'{name}.hidden_act {cfg["hidden_act"]!r} is not supported '
                       "(CLIP uses 'quick_gelu')")
  return CLIPConfig(
      embed_dim=_take(sd, 'text_projection.weight', 'torch key').shape[0],
      image_resolution=conv.shape[-1] * round((n_pos - 1) ** 0.5),
      vision_layers=_count_layers(sd, r'vision_model\.encoder\.layers\.(\d+)\..*'),
      vision_width=conv.shape[0], vision_patch_size=conv.shape[-1], context_length=context,
      vocab_size=token.shape[0], transformer_width=token.shape[1],
      transformer_heads=text_cfg.get('num_attention_heads', token.shape[1] // 64),
      transformer_layers=_count_layers(sd, r'text_model\.encoder\.layers\.(\d+)\..*'),
      vision_heads=vision_cfg.get('num_attention_heads'))


def load_clip(path: str | os.PathLike, config: CLIPConfig | None = None
              ) -> tuple[CLIPConfig, dict]:
  """Read CLIP weights (OpenAI or Hugging Face layout) -> (config, params pure dict).

  path: a weight file (.pth/.pt/.bin/.npz/.safetensors) or a Hugging Face model directory
    (`model.safetensors`, with its `config.json` giving the head counts).
  config: expected config (e.g. head counts that shapes cannot tell); its shape fields are
    checked against the checkpoint.
  """
  path = Path(path)
  if path.is_dir():
    path = path / 'model.safetensors'
  sd = load_state_dict(path)
  if any(k.startswith(('text_model.', 'vision_model.')) for k in sd):
    hf_json = path.parent / 'config.json'
    hf_config = json.loads(hf_json.read_text()) if hf_json.is_file() else None
    inferred, params = config_from_hf(sd, hf_config), clip_from_hf(sd)
  elif 'visual.conv1.weight' in sd:
    inferred, params = config_from_openai(sd), clip_from_openai(sd)
  else:
    raise ValueError(f'{path}: neither OpenAI (visual.conv1.weight) nor Hugging Face '
                     '(text_model.*, vision_model.*) CLIP layout')
  if config is None:
    return inferred, params
  for field in ('embed_dim', 'image_resolution', 'vision_layers', 'vision_width',
                'vision_patch_size', 'context_length', 'vocab_size', 'transformer_width',
                'transformer_layers'):
    if getattr(config, field) != getattr(inferred, field):
      raise ValueError(f'{path}: config.{field}={getattr(config, field)} but the checkpoint '
                       f'has {getattr(inferred, field)}')
  return config, params

"""ViT backbones (timm ViT-B/16, DINOv2 ViT-S/14): public weight files <-> our params.

Two layouts are read, both as pure dict functions:
  reference  timm's / facebookresearch DINOv2's own state dict names (`cls_token`, `pos_embed`,
             `blocks.{i}.attn.qkv`, ...; DINOv2 adds `ls1.gamma`, `ls2.gamma`, `mask_token`).
             The timm checkpoint on the Hugging Face hub for `vit_base_patch16_224`
             (`timm/vit_base_patch16_224.augreg2_in21k_ft_in1k`, the tag timm's `pretrained=True`
             loads) stores these same names in its `model.safetensors`.
  transformers  Hugging Face `ViTModel` / `ViTForImageClassification` (`google/vit-base-patch16-224`,
             prefix `vit.`) and `Dinov2Model` (`facebook/dinov2-small`, prefix `dinov2.` when
             wrapped): `embeddings.*`, `encoder.layer.{i}.*` with separate query / key / value.
             `hf_to_reference` renames them (q, k, v concatenated into qkv).
The block count is read from the names; every parameter must be present, and unknown keys raise.
Classifier heads (`head.*`, `classifier.*`, `pooler.*`) are skipped by name.

`load_backbone(name, path)` reads a file of either layout for a CapeNext backbone and checks
every shape against that backbone's architecture, naming the backbone, file and key.
"""
from __future__ import annotations

import functools
import os
import re
from collections.abc import Mapping

import jax
import numpy as np
from flax import nnx

from capenext_jax.convert import entries
from capenext_jax.convert.torch_io import load_state_dict
from capenext_jax.models import vit
from capenext_jax.models.layers import init_rngs

# Reference-layout entries that carry no parameter of ours: classifier heads.
_SKIPPED = (re.compile(r'head\.(weight|bias)'),)
_HF_SKIPPED = (re.compile(r'(classifier|pooler\.dense)\.(weight|bias)'),)
_BLOCK = re.compile(r'blocks\.(\d+)\.')

def _entries(depth: int, dinov2: bool) -> list[entries.Entry]:
  """(reference name, path in our pure dict, kind) of every parameter of a `depth`-block ViT."""
  out = [('cls_token', ('cls_token',), 'copy'), ('pos_embed', ('pos_embed',), 'copy'),
         ('patch_embed.proj.weight', ('patch_embed', 'proj', 'kernel'), 'conv'),
         ('patch_embed.proj.bias', ('patch_embed', 'proj', 'bias'), 'copy')]
  if dinov2:
    out.append(('mask_token', ('mask_token',), 'copy'))

  def linear(name, path):
    out.extend([(f'{name}.weight', path + ('kernel',), 'linear'),
                (f'{name}.bias', path + ('bias',), 'copy')])

  def norm(name, path):
    out.extend([(f'{name}.weight', path + ('scale',), 'copy'),
                (f'{name}.bias', path + ('bias',), 'copy')])

  for i in range(depth):
    name, path = f'blocks.{i}', ('blocks', i)
    norm(f'{name}.norm1', path + ('norm1',))
    linear(f'{name}.attn.qkv', path + ('attn', 'qkv'))
    linear(f'{name}.attn.proj', path + ('attn', 'proj'))
    norm(f'{name}.norm2', path + ('norm2',))
    linear(f'{name}.mlp.fc1', path + ('mlp', 'fc1'))
    linear(f'{name}.mlp.fc2', path + ('mlp', 'fc2'))
    if dinov2:
      out.extend([(f'{name}.ls1.gamma', path + ('ls1', 'gamma'), 'copy'),
                  (f'{name}.ls2.gamma', path + ('ls2', 'gamma'), 'copy')])
  norm('norm', ('norm',))
  return out


def _depth_from_names(names) -> int:
  """Block count from the highest `blocks.{i}` index present."""
  indices = {int(m.group(1)) for m in map(_BLOCK.match, names) if m}
  if not indices:
    raise ValueError('no blocks.{i}.* keys: not a ViT state dict')
  return max(indices) + 1


def vit_from_torch(sd: Mapping[str, np.ndarray], *, dinov2: bool) -> dict:
  """Reference-layout ViT state dict -> our `VisionTransformer` params pure dict (int block
  keys, float32 numpy arrays). dinov2: expect DINOv2's LayerScale and mask token.

  Raises ValueError naming the unknown keys, the missing ones, or a tensor of the wrong rank.
  """
  return entries.params_from_entries(sd, _entries(_depth_from_names(sd), dinov2), _SKIPPED)


def vit_to_torch(params: Mapping) -> dict[str, np.ndarray]:
  """Inverse of `vit_from_torch` (reference names and layouts, float32, no classifier head).
  Accepts int or string block indices (pure dicts or our exported files)."""
  return entries.entries_to_torch(params,
                                  _entries(len(params['blocks']), 'mask_token' in params))


# ----------------------------------------------------------------------------- CapeNext modules
_ADAPTOR = 'channel_adaptor.'
_VIT_PREFIX = 'vit_backbone.'


def feature_extractor_from_torch(sd: Mapping[str, np.ndarray]) -> dict:
  """The official `ViTFeatureExtractor` state dict (CapeNext's `backbone.*` with vit_b16:
  `vit_backbone.*` timm names, `channel_adaptor.{weight [O,I,1,1], bias}`) -> our
  `ViTFeatureExtractor` params."""
  unknown = [k for k in sd if not k.startswith(_VIT_PREFIX)
             and k not in (_ADAPTOR + 'weight', _ADAPTOR + 'bias')]
  if unknown:
    raise ValueError(f'unexpected keys {entries.listed(unknown)} (expected vit_backbone.* and '
                     f'channel_adaptor.*)')
  missing = [k for k in (_ADAPTOR + 'weight', _ADAPTOR + 'bias') if k not in sd]
  if missing:
    raise ValueError(f'missing keys {missing}')
  weight = np.asarray(sd[_ADAPTOR + 'weight'], np.float32)
  if weight.ndim != 4 or weight.shape[2:] != (1, 1):
    raise ValueError(f'{_ADAPTOR}weight: expected a 1x1 conv [O, I, 1, 1], got {weight.shape}')
  try:
    backbone = vit_from_torch({k[len(_VIT_PREFIX):]: v for k, v in sd.items()
                               if k.startswith(_VIT_PREFIX)}, dinov2=False)
  except ValueError as e:
    raise ValueError(f'{_VIT_PREFIX}*: {e}') from e
  return {'vit_backbone': backbone,
          'channel_adaptor': {'kernel': np.ascontiguousarray(weight[:, :, 0, 0].T),
                              'bias': np.asarray(sd[_ADAPTOR + 'bias'], np.float32)}}


def feature_extractor_to_torch(params: Mapping) -> dict[str, np.ndarray]:
  """Inverse of `feature_extractor_from_torch`."""
  out = {_VIT_PREFIX + k: v for k, v in vit_to_torch(params['vit_backbone']).items()}
  kernel = np.asarray(params['channel_adaptor']['kernel'], np.float32)
  out[_ADAPTOR + 'weight'] = np.ascontiguousarray(kernel.T[:, :, None, None])
  out[_ADAPTOR + 'bias'] = np.asarray(params['channel_adaptor']['bias'], np.float32)
  return out


def dinov2_from_torch(sd: Mapping[str, np.ndarray]) -> dict:
  """DINOv2 reference state dict (also CapeNext's `backbone.*` with dinov2_s14, which holds the
  hub model itself) -> our `DinoV2Backbone` params."""
  return vit_from_torch(sd, dinov2=True)


# ----------------------------------------------------------------------------- HF transformers
_HF_EMBEDDINGS = {
    'embeddings.cls_token': 'cls_token',
    'embeddings.position_embeddings': 'pos_embed',
    'embeddings.mask_token': 'mask_token',
    'embeddings.patch_embeddings.projection.weight': 'patch_embed.proj.weight',
    'embeddings.patch_embeddings.projection.bias': 'patch_embed.proj.bias',
    'layernorm.weight': 'norm.weight',
    'layernorm.bias': 'norm.bias',
}
# Per-layer module names -> reference names: the files on the hub (and what `save_pretrained`
# writes), then the names of the modules in memory since transformers 5 where they differ.
_HF_LAYER = {
    'layernorm_before': 'norm1', 'layernorm_after': 'norm2',          # ViT
    'norm1': 'norm1', 'norm2': 'norm2',                                # DINOv2
    'attention.output.dense': 'attn.proj', 'attention.o_proj': 'attn.proj',
    'intermediate.dense': 'mlp.fc1', 'output.dense': 'mlp.fc2',       # ViT
    'mlp.fc1': 'mlp.fc1', 'mlp.fc2': 'mlp.fc2',                        # DINOv2, ViT in memory
    'layer_scale1': 'ls1', 'layer_scale2': 'ls2',                      # DINOv2 (`lambda1`)
}
_HF_QKV = {'attention.attention.query': 0, 'attention.attention.key': 1,
           'attention.attention.value': 2,
           'attention.q_proj': 0, 'attention.k_proj': 1, 'attention.v_proj': 2}
_HF_BLOCK = re.compile(r'(?:encoder\.layer|layers)\.(\d+)\.(.+)\.(weight|bias|lambda1)')
_HF_PREFIXES = ('vit.', 'dinov2.')


def is_hf_layout(sd: Mapping) -> bool:
  """Whether `sd` uses Hugging Face transformers names (ViTModel / Dinov2Model)."""
  return any(k.startswith(p + 'embeddings.') for k in sd for p in ('',) + _HF_PREFIXES)


def hf_to_reference(sd: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Hugging Face ViT / DINOv2 names -> the reference (timm / DINOv2) names.

  A `vit.` / `dinov2.` model prefix is dropped; query / key / value are concatenated into qkv
  (rows q, k, v as the reference's fused Linear); classifier and pooler are skipped.
  Raises ValueError naming keys that have no reference counterpart or an incomplete q/k/v.
  """
  out: dict[str, np.ndarray] = {}
  qkv: dict[str, list] = {}
  unknown = []
  for key, value in sd.items():
    name = next((key[len(p):] for p in _HF_PREFIXES if key.startswith(p)), key)
    if any(p.fullmatch(name) for p in _HF_SKIPPED):
      continue
    if name in _HF_EMBEDDINGS:
      out[_HF_EMBEDDINGS[name]] = value
      continue
    m = _HF_BLOCK.fullmatch(name)
    module, leaf = (m.group(2), m.group(3)) if m else (None, None)
    if module in _HF_QKV and leaf != 'lambda1':
      qkv.setdefault(f'blocks.{m.group(1)}.attn.qkv.{leaf}', [None] * 3)[_HF_QKV[module]] = value
    elif module in _HF_LAYER and (leaf == 'lambda1') == module.startswith('layer_scale'):
      leaf = 'gamma' if leaf == 'lambda1' else leaf
      out[f'blocks.{m.group(1)}.{_HF_LAYER[module]}.{leaf}'] = value
    else:
      unknown.append(key)
  if unknown:
    raise ValueError(f'unexpected keys {entries.listed(unknown)}')
  for name, parts in qkv.items():
    absent = [p for p, part in zip(('query', 'key', 'value'), parts) if part is None]
    if absent:
      raise ValueError(f'{name}: missing the {"/".join(absent)} part of the attention')
    out[name] = np.concatenate([np.asarray(p) for p in parts], axis=0)
  return out


# ----------------------------------------------------------------------------- CapeNext backbones
# Backbone config type -> (name in messages, DINOv2 layout?, the weights it takes).
_KINDS = {
    vit.TimmViTConfig: ('vit_b16', False,
                        'timm vit_base_patch16_224 or google/vit-base-patch16-224 weights'),
    vit.DinoV2Config: ('dinov2_s14', True,
                       'DINOv2 dinov2_vits14 or facebook/dinov2-small weights'),
}


@functools.lru_cache(maxsize=None)
def expected_shapes(config: vit.ViTConfig) -> dict[str, tuple[int, ...]]:
  """Reference name -> torch shape of every parameter of `config`'s VisionTransformer
  (cached: do not modify)."""
  model = nnx.eval_shape(lambda: vit.VisionTransformer(config, rngs=init_rngs(0)))
  params = jax.tree.map(lambda s: np.zeros(s.shape, np.float32),
                        nnx.to_pure_dict(nnx.state(model, nnx.Param)))
  return {k: v.shape for k, v in vit_to_torch(params).items()}


def backbone_from_state_dict(config: vit.TimmViTConfig | vit.DinoV2Config,
                             sd: Mapping[str, np.ndarray]) -> dict:
  """A public state dict (reference or HF layout) -> `VisionTransformer` params for the
  backbone `config`, every key and shape checked against its architecture."""
  name, dinov2, _ = _KINDS[type(config)]
  reference = hf_to_reference(sd) if is_hf_layout(sd) else dict(sd)
  params = vit_from_torch(reference, dinov2=dinov2)
  shapes = expected_shapes(config.vit)
  # Shapes first: a model of another size differs there before it differs in depth.
  for key, shape in shapes.items():
    got = tuple(np.shape(reference[key])) if key in reference else shape
    if got != shape:
      raise ValueError(f'{key} has shape {got}, expected {shape}')
  depth = config.depth
  extra = [k for k in reference if k not in shapes and not any(p.fullmatch(k) for p in _SKIPPED)]
  if extra:
    raise ValueError(f'unexpected keys {entries.listed(extra)} (this {name} has {depth} blocks)')
  missing = [k for k in shapes if k not in reference]
  if missing:
    raise ValueError(f'missing keys {entries.listed(missing)} (this {name} has {depth} blocks)')
  return params


def load_backbone(config: vit.TimmViTConfig | vit.DinoV2Config, path: str | os.PathLike) -> dict:
  """Params of a ViT backbone from a public weight file: `.pth` (torch's weights-only loader),
  `.safetensors` or `.npz`, in the reference or the HF layout. For `TimmViTConfig` they are
  the `vit_backbone` sub-tree of `ViTFeatureExtractor` (its channel_adaptor is CapeNext's own);
  for `DinoV2Config` the whole `DinoV2Backbone` tree.

  Raises ValueError naming the backbone, the file and the offending key.
  """
  if type(config) not in _KINDS:
    raise TypeError(f'{path}: {type(config).__name__} is not a ViT backbone config')
  name, _, weights = _KINDS[type(config)]
  try:
    sd = load_state_dict(path)
  except ValueError as e:   # already names the file
    raise ValueError(f'{name}: {e}') from e
  try:
    return backbone_from_state_dict(config, sd)
  except ValueError as e:
    raise ValueError(f'{name}: {path}: {e} (expected {weights})') from e

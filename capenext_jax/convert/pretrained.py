"""Pretrained parts of a CapeNext from their public releases, for training from them.

    init_from_pretrained(model, backbone_path='swinv2_tiny_patch4_window16_256.pth',
                         clip_path='ViT-B-16.pt')

Next to the converters it composes (`convert/backbones.py`, `convert/clip.py`); the training
init (`training/init.py`) and `loading` (which re-exports it) import it from here.
"""
from __future__ import annotations

import os

from capenext_jax import params as params_lib
from capenext_jax.convert import backbones as backbone_convert
from capenext_jax.convert import clip as clip_convert
from capenext_jax.models import backbones
from capenext_jax.models.capenext import CapeNext


def init_from_pretrained(model: CapeNext, backbone_path: str | os.PathLike | None = None,
                         clip_path: str | os.PathLike | None = None) -> CapeNext:
  """Overwrite the backbone and / or CLIP weights of `model` in place; returns `model`.

  backbone_path: the public release of the model's backbone architecture, in its own layout
    (`convert/backbones.py`): Microsoft's Swin V2 (`swinv2_tiny_patch4_window16_256.pth`),
    torchvision's ResNet-50 (`resnet50-0676ba61.pth`), the HRNet-W32 ImageNet checkpoint
    (`hrnet_w32-36af842e.pth`; CapeNext's `conv_block1/2` keep their init), or any file with
    those names. Classifier heads are ignored.
  clip_path: CLIP ViT weights in the OpenAI layout (`.pt` state dict / `.npz`) or the Hugging
    Face layout (`model.safetensors`, or its directory with `config.json`).
  Raises ValueError naming the backbone, the file and the first key or shape that does not fit.
  """
  if backbone_path is not None:
    arch = backbones.arch_of(model.config.backbone)
    converter = backbone_convert.CONVERTERS[arch]
    target = model.backbone
    if converter.release_part is not None:
      target = getattr(target, converter.release_part)
    try:   # the release readers name the file in their errors
      weights = converter.load_release(backbone_path, model.config.backbone)
    except ValueError as e:
      raise ValueError(f'{arch} backbone: {e}') from e
    _load_part(target, weights, f'{arch} backbone: {backbone_path}')
  if clip_path is not None:
    _, params = clip_convert.load_clip(clip_path, model.config.clip)
    _load_part(model.clip, params, clip_path)
  return model


def _load_part(module, params: dict, path) -> None:
  try:
    params_lib.load_into(module, params)
  except ValueError as e:
    raise with_path(path, e) from e


def with_path(path, error: ValueError) -> ValueError:
  """`error` with `path` in front, unless its message already starts with it."""
  message = str(error)
  return ValueError(message if message.startswith(str(path)) else f'{path}: {message}')

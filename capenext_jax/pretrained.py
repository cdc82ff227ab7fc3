"""Start a CapeNext from public pretrained weights: ImageNet Swin V2 and OpenAI CLIP.

Weight files are read by `convert.torch_io` (torch's weights-only unpickler for `.pth`, no
pickles for `.npz`, plain `.safetensors`); a file whose pickle would build anything but tensors
is refused with a ValueError before any of its code runs.
"""
from __future__ import annotations

import os

from capenext_jax import params as params_lib
from capenext_jax.convert import clip as clip_convert
from capenext_jax.convert import swin as swin_convert
from capenext_jax.models.capenext import CapeNext


def init_from_pretrained(model: CapeNext, swin_path: str | os.PathLike | None = None,
                         clip_path: str | os.PathLike | None = None) -> CapeNext:
  """Overwrite the backbone and / or CLIP params of `model` in place; returns `model`.

  swin_path: Microsoft's Swin V2 release (`swinv2_tiny_patch4_window16_256.pth`, a
    `{'model': state_dict}`), or any file with those names. Its classifier head is ignored.
  clip_path: CLIP ViT weights in the OpenAI layout (`.pt` state dict / `.npz`) or the Hugging
    Face layout (`model.safetensors`, or its directory with `config.json`).
  Raises ValueError naming the file and the first key or shape that does not fit the model.
  """
  if swin_path is not None:
    params = swin_convert.load_microsoft_swinv2(swin_path)
    _load(model.backbone, params, swin_path)
  if clip_path is not None:
    _, params = clip_convert.load_clip(clip_path, model.config.clip)
    _load(model.clip, params, clip_path)
  return model


def _load(module, params: dict, path) -> None:
  try:
    params_lib.load_into(module, params)
  except ValueError as e:
    raise ValueError(f'{path}: {e}') from e

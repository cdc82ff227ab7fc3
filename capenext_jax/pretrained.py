"""Start a CapeNext from public pretrained weights: ImageNet Swin V2 and OpenAI CLIP.

Weight files are read by `convert.torch_io` (torch's weights-only unpickler for `.pth`, no
pickles for `.npz`, plain `.safetensors`); a file whose pickle would build anything but tensors
is refused with a ValueError before any of its code runs.
"""
from __future__ import annotations

import contextlib
import os
import pickle

from capenext_jax.convert import clip as clip_convert
from capenext_jax.convert import official
from capenext_jax.convert import swin as swin_convert
from capenext_jax.models.capenext import CapeNext


@contextlib.contextmanager
def refusing_pickled_code(path: str | os.PathLike):
  """Turn torch's weights-only refusal into a ValueError that names the file and says why.

  (torch's own message suggests `weights_only=False`, which would run the file's code.)
  """
  try:
    yield
  except pickle.UnpicklingError as e:
    first_line = str(e).strip().splitlines()[0] if str(e).strip() else ''
    raise ValueError(
        f'{path}: refused: the file pickles objects other than tensors and plain containers, '
        f'and unpickling them could run arbitrary code. Only weights are read; re-save the '
        f'state dict alone (e.g. torch.save(ckpt["state_dict"], ...) in a trusted '
        f'environment) or convert it to .safetensors / .npz. (torch: {first_line})') from e


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
    with refusing_pickled_code(swin_path):
      params = swin_convert.load_microsoft_swinv2(swin_path)
    _load(model.backbone, params, swin_path)
  if clip_path is not None:
    with refusing_pickled_code(clip_path):
      _, params = clip_convert.load_clip(clip_path, model.config.clip)
    _load(model.clip, params, clip_path)
  return model


def load_official_checkpoint(path: str | os.PathLike) -> dict:
  """Params pure dict of an official CapeNext / CapeX checkpoint (`.pth` or `.npz`)."""
  with refusing_pickled_code(path):
    return official.load_official(path)


def _load(module, params: dict, path) -> None:
  try:
    official.load_into(module, params)
  except ValueError as e:
    raise ValueError(f'{path}: {e}') from e

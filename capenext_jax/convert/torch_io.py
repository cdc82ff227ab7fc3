"""Safe readers for PyTorch-side weight files: `.pth`/`.pt`/`.bin`, `.npz`, `.safetensors`.

Nothing here unpickles arbitrary objects: torch files are read with `weights_only=True`, npz
files with `allow_pickle=False`. torch is imported only when a torch file (or a bf16
safetensors file, which numpy cannot represent) is read.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from capenext_jax.errors import first_line
from capenext_jax.extras import require

_TORCH_SUFFIXES = ('.pth', '.pt', '.bin', '.ckpt')
_WRAPPERS = ('state_dict', 'model')  # mmcv / generic training checkpoints nest the weights


def load_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """Flat `name -> np.ndarray` of a weight file; fp16 / bf16 tensors are upcast to fp32.

  A checkpoint dict holding the weights under 'state_dict' or 'model' is unwrapped.
  Raises ValueError naming the file (missing, unknown suffix) or the offending entry.
  """
  path = Path(path)
  if not path.is_file():
    raise ValueError(f'{path}: no such file')
  if path.suffix in _TORCH_SUFFIXES:
    sd = _load_torch(path)
  elif path.suffix == '.npz':
    sd = _load_npz(path)
  elif path.suffix == '.safetensors':
    sd = _load_safetensors(path)
  else:
    raise ValueError(f'{path}: unknown weight file type {path.suffix!r} '
                     f'(expected one of {_TORCH_SUFFIXES + (".npz", ".safetensors")})')
  return {k: _upcast(v) for k, v in sd.items()}


def _upcast(a: np.ndarray) -> np.ndarray:
  # bfloat16 arrays appear when ml_dtypes (imported by jax) lets safetensors build them.
  return a.astype(np.float32) if a.dtype.name in ('float16', 'bfloat16') else a


def _unwrap(obj, path: Path) -> dict:
  for key in _WRAPPERS:
    if isinstance(obj, dict) and isinstance(obj.get(key), dict):
      return obj[key]
  if not isinstance(obj, dict):
    raise ValueError(f'{path}: expected a state dict, got {type(obj).__name__}')
  return obj


def _torch(path: Path):
  """torch, imported lazily (only torch files need it), or MissingExtra naming [torch]."""
  return require('torch', 'torch', f'{path}: reading a PyTorch file')


def _torch_to_numpy(sd: dict, path: Path) -> dict[str, np.ndarray]:
  torch = _torch(path)
  out = {}
  for k, v in sd.items():
    if not isinstance(v, torch.Tensor):
      raise ValueError(f'{path}: entry {k!r} is a {type(v).__name__}, not a tensor')
    v = v.detach().cpu()
    out[k] = (v.float() if v.dtype == torch.bfloat16 else v).numpy()
  return out


def _numpy_scalar_globals() -> list:
  """Picklable numpy scalar types that mmcv writes into checkpoint `meta` (e.g. the best
  score of `save_best` as np.float64). Rebuilding a numpy scalar runs no user code, so they
  are allowed alongside torch's own weights-only set."""
  multiarray = getattr(np, '_core', None) or np.core
  return [multiarray.multiarray.scalar, np.dtype,
          *(type(np.dtype(c)) for c in 'bBhHiIlLqQefdg?')]


def _load_npz(path: Path) -> dict[str, np.ndarray]:
  try:
    with np.load(path, allow_pickle=False) as z:
      return {k: z[k] for k in z.files}
  except ValueError as e:
    if 'allow_pickle' in str(e):
      raise ValueError(f'{path}: refused: holds object arrays, which only unpickling could '
                       f'read (and unpickling can run arbitrary code); save plain numeric '
                       f'arrays') from None
    raise ValueError(f'{path}: not a readable .npz ({first_line(e)})') from None
  except Exception as e:  # noqa: BLE001 - BadZipFile, EOFError, OSError for broken files
    raise ValueError(f'{path}: not a readable .npz ({first_line(e)})') from None


def load_meta(path: str | os.PathLike) -> dict:
  """The `meta` dict a `.pth` checkpoint saved beside its `state_dict` (mmcv's, or ours:
  `capenext-convert` writes `capenext_jax` and `capenext_jax_config` JSON strings into it);
  {} for other files. Read with the same weights-only unpickler as the weights."""
  path = Path(path)
  if path.suffix not in _TORCH_SUFFIXES:
    return {}
  obj = _torch_load(path)
  meta = obj.get('meta') if isinstance(obj, dict) else None
  return dict(meta) if isinstance(meta, dict) else {}


def _load_torch(path: Path) -> dict[str, np.ndarray]:
  return _torch_to_numpy(_unwrap(_torch_load(path), path), path)


def _torch_load(path: Path):
  import pickle

  torch = _torch(path)
  try:
    with torch.serialization.safe_globals(_numpy_scalar_globals()):
      obj = torch.load(path, map_location='cpu', weights_only=True)
  except Exception as e:  # noqa: BLE001 - torch.load fails on foreign bytes in many ways
    if isinstance(e, pickle.UnpicklingError) and _pickles_objects(path):
      raise ValueError(f'{path}: refused: the file pickles objects other than tensors and plain '
                       f'containers, and unpickling them could run arbitrary code. Re-save the '
                       f'state dict alone in a trusted environment, or convert it to '
                       f'.safetensors / .npz (torch weights-only loader: {first_line(e)})') from e
    raise ValueError(f'{path}: not a PyTorch checkpoint ({first_line(e)})') from None
  return obj


def _pickles_objects(path: Path) -> bool:
  """True when `path` (a raw pickle, or torch's zip with a data.pkl) is a well-formed pickle
  that builds objects from named globals. Only opcodes are parsed: nothing runs."""
  import pickletools
  import zipfile
  try:
    if zipfile.is_zipfile(path):
      with zipfile.ZipFile(path) as z:
        name = next(n for n in z.namelist() if n.endswith('data.pkl'))
        data = z.read(name)
    else:
      data = path.read_bytes()
    ops = {op.name for op, _, _ in pickletools.genops(data)}
  except Exception:  # noqa: BLE001 - not a pickle at all
    return False
  return bool(ops & {'GLOBAL', 'STACK_GLOBAL', 'INST', 'OBJ'})


def _load_safetensors(path: Path) -> dict[str, np.ndarray]:
  from safetensors.numpy import load_file
  try:
    return load_file(str(path))
  except TypeError:  # numpy has no bfloat16: read through torch instead
    _torch(path)
    from safetensors.torch import load_file as load_torch
    return _torch_to_numpy(load_torch(str(path)), path)
  except Exception as e:  # noqa: BLE001 - SafetensorError for a broken header / data
    raise ValueError(f'{path}: not a readable safetensors file ({first_line(e)})') from None

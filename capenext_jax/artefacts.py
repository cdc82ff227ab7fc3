"""What kind of artefact a folder is: a train.py workdir, an export or a dataset, in one place.

  workdir  `checkpoints/` (orbax step folders), or a `.lock` (`training.workdir.WorkdirLock`), or
           a `config.json` holding a run config (top-level `model` and `optim`)
  export   a `config.json` whose `format` is "capenext-jax" (`export.py`), checked after workdir
           (a workdir also holds a config.json)
  dataset  an `annotations/` or `images/` folder (MP-100's layout, docs/CUSTOM_DATA.md's)

Programs write only into their own kind (`check_output_folder`): capenext-convert replaces an
export, never a workdir or a dataset; train.py trains into a workdir or a new folder, never an
export. Only the standard library is imported (the programs call this before their work).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

WORKDIR, EXPORT, DATASET = 'train.py workdir', 'export', 'dataset folder'
CONFIG_FILE = 'config.json'
EXPORT_FORMAT = 'capenext-jax'   # export.FORMAT_NAME (export.py imports jax; this module doesn't)


def _config_json(folder: Path) -> dict | None:
  """config.json of `folder` as a dict; None when absent or not a JSON object."""
  try:
    d = json.loads((folder / CONFIG_FILE).read_text())
  except (OSError, ValueError):
    return None
  return d if isinstance(d, dict) else None


def is_train_workdir(path: str | os.PathLike) -> bool:
  """A folder train.py wrote into (see the module docstring)."""
  path = Path(path)
  if not path.is_dir():
    return False
  if (path / 'checkpoints').is_dir() or (path / '.lock').is_file():
    return True
  config = _config_json(path)
  return config is not None and {'model', 'optim'} <= set(config)


def is_export_folder(path: str | os.PathLike) -> bool:
  """A folder `export.export_params` wrote (and not a workdir)."""
  path = Path(path)
  if not path.is_dir() or is_train_workdir(path):
    return False
  config = _config_json(path)
  return config is not None and config.get('format') == EXPORT_FORMAT


def is_dataset_folder(path: str | os.PathLike) -> bool:
  path = Path(path)
  return path.is_dir() and ((path / 'annotations').is_dir() or (path / 'images').is_dir())


def kind_of_folder(path: str | os.PathLike) -> str | None:
  """WORKDIR, EXPORT, DATASET, or None (absent, a file, or a folder of none of these kinds)."""
  for kind, test in ((WORKDIR, is_train_workdir), (EXPORT, is_export_folder),
                     (DATASET, is_dataset_folder)):
    if test(path):
      return kind
  return None


def is_empty_folder(path: str | os.PathLike) -> bool:
  path = Path(path)
  return path.is_dir() and next(path.iterdir(), None) is None


def _a(kind: str) -> str:
  return f'an {kind}' if kind[0] in 'aeiou' else f'a {kind}'


def check_output_folder(path: str | os.PathLike, wanted: str, *, what: str,
                        other_files_ok: bool = False) -> None:
  """ValueError naming `path` when it is another kind of artefact than `wanted`. Absent and
  empty folders are fine; a non-empty folder of no known kind is refused unless
  `other_files_ok` (train.py: a workdir whose first run stopped before its first save holds
  only its drawn data). what: the program and flag, for the message."""
  path = Path(path)
  if not path.exists() or is_empty_folder(path):
    return
  if not path.is_dir():
    raise ValueError(f'{path}: is a file; {what} needs a folder')
  kind = kind_of_folder(path)
  if kind != wanted and not (kind is None and other_files_ok):
    found = _a(kind) if kind else 'a folder holding other files'
    raise ValueError(f'{path}: is {found}, not {_a(wanted)}; {what} writes only into a new or '
                     f'empty folder or {_a(wanted)}')

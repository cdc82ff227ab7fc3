"""One training per workdir, and a restart that continues the run it finds there.

`WorkdirLock`: process 0 holds an exclusive `flock` on `<workdir>/.lock` for the whole run, so
a second training started on the same workdir stops at once instead of interleaving its
checkpoints with the first one's. The kernel drops the lock when its holder exits in any way
(kill -9 included), so it never goes stale. (flock needs a local or NFSv4 file system; on
object-store mounts it is best effort.)

`check_resume_config`: a restart must train the same run. The saved `config.json` and the new
config may differ only in how long the run is, how it logs, evaluates and saves, and how it is
laid out on devices (`RESUMABLE_CHANGES`); anything else (model, data, optimiser, seed) is
refused unless `config.allow_config_change` is set, and then the old file is kept beside.

`check_workdir_kind`: a workdir is never an export or a dataset folder (`artefacts.py`).
"""
from __future__ import annotations

import datetime
import fnmatch
import json
import os
import socket
from pathlib import Path

import ml_collections

from capenext_jax import artefacts
from capenext_jax.params import flatten

LOCK_FILE = '.lock'
CONFIG_FILE = 'config.json'
# Dotted config paths (fnmatch patterns) a resumed run may change. How the model computes
# (dtype, remat, attention kernel, matmul precision) leaves the checkpoint's layout unchanged,
# and workdirs written before those fields existed resume with their defaults.
RESUMABLE_CHANGES = (
    'total_steps', 'num_epochs', 'log_every_steps', 'validate', 'eval_every_steps',
    'eval_every_epochs', 'checkpoint_every_steps', 'checkpoint_every_epochs',
    'keep_checkpoints', 'async_checkpoints', 'test_at_start', 'test_at_end', 'eval_batch_size',
    'data.val_episodes', 'data.test_episodes', 'mesh_shape.*', 'sharding_rules',
    'fsdp_min_bytes',
    'allow_config_change', 'model.dtype', 'model.remat', 'model.attention', 'precision',
    # The training input's source and where it warps: the same episodes, read faster.
    'data.train_records', 'data.warp',
)


class WorkdirLock:
  """Exclusive lock of a training workdir (a context manager; only process 0 locks).

  Re-entrant within a process: train.py holds it from before it draws the synthetic data into
  the workdir, and the loop it calls takes it again (a second flock on a new descriptor of the
  same file would refuse its own process)."""

  _held: dict[Path, int] = {}   # lock file -> how many holders in this process

  def __init__(self, workdir: str | os.PathLike, *, enabled: bool = True):
    self.path = (Path(workdir) / LOCK_FILE).absolute()
    self.enabled = enabled
    self._file = None
    self._entered = False

  def __enter__(self) -> WorkdirLock:
    if not self.enabled:
      return self
    if self.path in WorkdirLock._held:
      WorkdirLock._held[self.path] += 1
      self._entered = True
      return self
    import fcntl
    self.path.parent.mkdir(parents=True, exist_ok=True)
    f = open(self.path, 'a+')   # never truncate: the holder's note stays readable
    try:
      fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      f.seek(0)
      holder = f.read().strip() or 'another process'
      f.close()
      raise ValueError(f'{self.path.parent}: the workdir is in use by another training '
                       f'({holder}); stop it first, or train into another --workdir') from None
    f.seek(0)
    f.truncate()
    f.write(f'pid {os.getpid()} on {socket.gethostname()} since '
            f'{datetime.datetime.now().isoformat(timespec="seconds")}\n')
    f.flush()
    self._file, self._entered = f, True
    WorkdirLock._held[self.path] = 1
    return self

  def __exit__(self, *exc) -> None:
    if not self._entered:
      return
    self._entered = False
    WorkdirLock._held[self.path] -= 1
    if WorkdirLock._held[self.path] == 0:
      del WorkdirLock._held[self.path]
    if self._file is not None:
      self._file.close()   # closing releases the flock (the outermost holder has the file)
      self._file = None


def check_workdir_kind(workdir: str | os.PathLike) -> None:
  """Refuse (ValueError naming it) a --workdir that is an export or a dataset folder
  (`artefacts.py`): training would write its config.json and checkpoints among their files.
  Call before anything is written into it (train.py draws synthetic data there first)."""
  artefacts.check_output_folder(workdir, artefacts.WORKDIR, what='train.py --workdir',
                                other_files_ok=True)


def config_changes(saved: dict, new: dict) -> list[str]:
  """'path: old -> new' for every field that differs and is not a resumable change."""
  a, b = (flatten(d, sep='.', leaf=lambda v: v) for d in (saved, new))
  changes = []
  for key in sorted(set(a) | set(b)):
    if a.get(key, '<absent>') == b.get(key, '<absent>'):
      continue
    if a.get(key) is None and b.get(key) is None:   # a field added since, unset (None): as absent
      continue
    if any(fnmatch.fnmatchcase(key, p) for p in RESUMABLE_CHANGES):
      continue
    changes.append(f'{key}: {a.get(key, "<absent>")!r} -> {b.get(key, "<absent>")!r}')
  return changes


def has_checkpoint(workdir: str | os.PathLike) -> bool:
  """True when `<workdir>/checkpoints` holds a step (an orbax step directory is its number)."""
  directory = Path(workdir) / 'checkpoints'
  return directory.is_dir() and any(p.name.isdigit() for p in directory.iterdir())


def check_resume_config(config: ml_collections.ConfigDict, workdir: str | os.PathLike) -> None:
  """Refuse (ValueError listing the fields) to resume a run whose config changed, unless
  `config.allow_config_change`; then the saved config is kept as config.<time>.json."""
  path = Path(workdir) / CONFIG_FILE
  if not path.is_file() or not has_checkpoint(workdir):
    return
  try:
    saved = json.loads(path.read_text())
  except ValueError as e:
    raise ValueError(f'{path}: not valid JSON ({e}); restore it or train into another '
                     f'--workdir') from None
  new = json.loads(config.to_json())
  changes = config_changes(saved, new)
  if not changes:
    return
  if not config.get('allow_config_change', False):
    shown = '; '.join(changes[:6]) + (f'; ... ({len(changes)} fields)' if len(changes) > 6 else '')
    raise ValueError(f'{path}: this workdir holds a run with another config ({shown}). Resume '
                     f'with the same config, use another --workdir, or pass '
                     f'--config.allow_config_change=True to continue with the new one')
  stamp = datetime.datetime.now().strftime('%Y%m%d-%H%M%S')
  path.rename(path.with_name(f'config.{stamp}.json'))

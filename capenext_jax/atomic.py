"""Outputs that are whole or absent: written under a temporary name beside the destination,
then renamed into place, so a kill at any point leaves the old output or the new one.

  with new_file(Path('w.npz')) as tmp:         np.savez(tmp, ...)     # '.w.npz.<random>.npz'
  with new_folder(Path('exp'), overwrite=True) as tmp:   (tmp / 'a').write_bytes(...)

A folder replaces an old one in one step (Linux `renameat2(RENAME_EXCHANGE)`, then the old
contents, now under the temporary name, are deleted); where the kernel or file system lacks
it, the old folder is renamed aside first (a kill between the two renames leaves it there, under
`.<name>.<random>.old`). A failed write (disk full, ...) raises OSError naming the destination,
and the temporary file or folder is removed. Outputs get the mode the umask gives (tempfile
and some writers, e.g. safetensors, create files 0600). Only the standard library is used.

Temporary names carry their writer, `.<name>.capenext-tmp-<pid>@<host>.<random><suffix>`: a
writer killed (kill -9, power loss) before its rename leaves one behind, and the next
successful write into that folder (the first of each process there, so that writing many
files into one folder stays linear) deletes it once no process <pid> runs on this host and
<name> itself exists, so the leftover is never the only copy of an output (`sweep_leftovers`).
"""
from __future__ import annotations

import contextlib
import ctypes
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path

from capenext_jax.errors import first_line


def _umask() -> int:
  mask = os.umask(0o022)
  os.umask(mask)
  return mask


def apply_umask(path: Path) -> None:
  """chmod `path` (recursively for a folder) to what a plain create gives under the umask."""
  mask = _umask()
  paths = [path, *path.rglob('*')] if path.is_dir() else [path]
  for p in paths:
    if not p.is_symlink():
      p.chmod((0o777 if p.is_dir() else 0o666) & ~mask)


class WriteError(OSError):
  """An output could not be written (disk full, ...): the message names it."""


# Raised inside a block for what the caller gave (a bad value, a missing optional package):
# not failures to write, so they keep their own message (and exit status).
_PASSED_ON = (ValueError, ImportError, WriteError)


def _write_error(path: Path, error: BaseException) -> WriteError:
  return WriteError(f'{path}: could not write it ({first_line(error)}); nothing was written there')


_TEMP_TAG = 'capenext-tmp'


def _temp_prefix(path: Path) -> str:
  """The hidden prefix of this process's temporaries for `path` (see the module docstring)."""
  return f'.{path.name}.{_TEMP_TAG}-{os.getpid()}@{socket.gethostname()}.'


def _running(pid: int) -> bool:
  """Whether process `pid` exists on this host (another user's counts)."""
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except OSError:
    return True
  return True


def sweep_leftovers(folder: Path) -> list[str]:
  """Delete the temporaries in `folder` of writers on this host that no longer run, where the
  output they were writing exists; returns their names. POSIX only (elsewhere signal 0 is no
  probe: Windows' os.kill would end the process)."""
  if os.name != 'posix':
    return []
  pattern = re.compile(r'\.(.+)\.' + re.escape(_TEMP_TAG) + r'-(\d+)@'
                       + re.escape(socket.gethostname()) + r'\.')
  removed = []
  with contextlib.suppress(OSError):
    for entry in list(os.scandir(folder)):
      match = pattern.match(entry.name) if _TEMP_TAG in entry.name else None
      if (match is None or _running(int(match.group(2)))
          or not os.path.lexists(os.path.join(folder, match.group(1)))):
        continue
      if entry.is_dir(follow_symlinks=False):
        shutil.rmtree(entry.path, ignore_errors=True)
      else:
        with contextlib.suppress(OSError):
          os.unlink(entry.path)
      removed.append(entry.name)
  return removed


_swept: set[str] = set()


def _sweep_once(folder: Path) -> None:
  """`sweep_leftovers(folder)` at this process's first write there."""
  key = os.path.realpath(folder)
  if key not in _swept:
    _swept.add(key)
    sweep_leftovers(folder)


@contextlib.contextmanager
def new_file(path: Path | str) -> Iterator[Path]:
  """A temporary path beside `path` (same suffix: np.savez adds '.npz' otherwise) that
  replaces `path` when the block ends without an error, and is removed when it fails."""
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, name = tempfile.mkstemp(dir=path.parent, prefix=_temp_prefix(path), suffix=path.suffix)
  os.close(fd)
  tmp = Path(name)
  try:
    try:
      yield tmp
      apply_umask(tmp)
      os.replace(tmp, path)
      _sweep_once(path.parent)
    except _PASSED_ON:
      raise
    except Exception as e:  # noqa: BLE001 - a writer fails in its own way when the disk is full
      raise _write_error(path, e) from e
  finally:
    tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def new_folder(path: Path, *, overwrite: bool) -> Iterator[Path]:
  """A temporary folder beside `path` that becomes `path` when the block ends without an
  error (replacing an old `path` whole; a non-empty one only when `overwrite`), and is removed
  when it fails. The caller decides whether the old folder may be replaced at all."""
  if path.exists() and not path.is_dir():
    raise ValueError(f'{path}: is a file, not a folder')
  if path.is_dir() and next(path.iterdir(), None) is not None and not overwrite:
    raise ValueError(f'{path}: is not empty; pass --overwrite to replace it')
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=_temp_prefix(path), suffix='.tmp'))
  try:
    try:
      yield tmp
      apply_umask(tmp)
      _move_into_place(tmp, path)
      _sweep_once(path.parent)
    except _PASSED_ON:
      raise
    except Exception as e:  # noqa: BLE001
      raise _write_error(path, e) from e
  finally:
    shutil.rmtree(tmp, ignore_errors=True)   # the failed new one, or the replaced old one


def _move_into_place(new: Path, path: Path) -> None:
  """Make `new` be `path`; afterwards `new` holds the old contents (if any), to delete."""
  try:
    os.rename(new, path)   # path absent, or an empty folder: one rename
    return
  except OSError:
    if not path.is_dir():
      raise
  if _exchange(new, path):
    return
  old = Path(tempfile.mkdtemp(dir=path.parent, prefix=f'.{path.name}.', suffix='.old'))
  os.rename(path, old / 'x')
  os.rename(new, path)
  os.rename(old / 'x', new)
  old.rmdir()


def _exchange(a: Path, b: Path) -> bool:
  """Swap two paths atomically (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
  try:
    libc = ctypes.CDLL(None, use_errno=True)
    renameat2 = libc.renameat2
  except (OSError, AttributeError):
    return False
  at_fdcwd, rename_exchange = -100, 2
  if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
    return True
  return False

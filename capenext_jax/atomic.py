"""Outputs that are whole or absent: written under a temporary name beside the destination,
then renamed into place, so a failure or a kill leaves the old output or the new one, never a
truncated file.

  with new_file(Path('report.json')) as tmp:   tmp.write_text(...)   # '.report.json.<random>.json'

The file gets the mode the umask gives (tempfile creates files 0600). Only the standard library
is used.
"""
from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path


def _umask() -> int:
  mask = os.umask(0o022)
  os.umask(mask)
  return mask


@contextlib.contextmanager
def new_file(path: Path) -> Iterator[Path]:
  """A temporary path beside `path` (same suffix: some writers pick the format by it) that
  replaces `path` when the block ends without an error, and is removed when it fails."""
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, name = tempfile.mkstemp(dir=path.parent, prefix=f'.{path.name}.', suffix=path.suffix)
  os.close(fd)
  tmp = Path(name)
  try:
    yield tmp
    tmp.chmod(0o666 & ~_umask())
    os.replace(tmp, path)
  finally:
    tmp.unlink(missing_ok=True)

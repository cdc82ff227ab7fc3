"""capenext_jax.atomic: the leftovers of killed writers are deleted by the next write into their
folder, and nothing else is (tests/test_convert.py kills real conversions)."""
import os
import socket
import subprocess
import sys

import pytest

from capenext_jax import atomic


@pytest.fixture
def dead_pid():
  """The pid of a process that has ended (and been reaped)."""
  proc = subprocess.Popen([sys.executable, '-c', 'pass'])
  proc.wait()
  return proc.pid


def _leftover(folder, name, pid, host=None, suffix='.tmp', folder_kind=True):
  """A temporary as `atomic` names them, of writer `pid` on `host` (this one by default)."""
  path = folder / f'.{name}.{atomic._TEMP_TAG}-{pid}@{host or socket.gethostname()}.x1y2{suffix}'
  if folder_kind:
    path.mkdir()
    (path / 'params.msgpack').write_bytes(b'partial')
  else:
    path.write_bytes(b'partial')
  return path.name


def test_sweep_deletes_only_dead_writers_leftovers_beside_an_existing_output(tmp_path, dead_pid):
  (tmp_path / 'exp').mkdir()
  (tmp_path / 'w.npz').write_bytes(b'output')
  dead = {_leftover(tmp_path, 'exp', dead_pid),
          _leftover(tmp_path, 'w.npz', dead_pid, suffix='.npz', folder_kind=False)}
  kept = {
      _leftover(tmp_path, 'exp', os.getpid()),                 # a running writer's
      _leftover(tmp_path, 'exp', dead_pid, host='elsewhere'),   # another host's (shared disk)
      _leftover(tmp_path, 'gone', dead_pid),   # its output is absent: maybe the only copy
  }
  (tmp_path / '.exp.abc123.tmp').mkdir()       # not ours (no writer tag): never touched
  (tmp_path / '.hidden').write_text('user')
  assert sorted(atomic.sweep_leftovers(tmp_path)) == sorted(dead)
  left = {p.name for p in tmp_path.iterdir()}
  assert left == kept | {'exp', 'w.npz', '.exp.abc123.tmp', '.hidden'}
  assert (tmp_path / '.hidden').read_text() == 'user'


def test_a_write_sweeps_its_folder_once_per_process(tmp_path, dead_pid, monkeypatch):
  monkeypatch.setattr(atomic, '_swept', set())
  (tmp_path / 'a.json').write_text('old')
  first = _leftover(tmp_path, 'a.json', dead_pid, suffix='.json', folder_kind=False)
  with atomic.new_file(tmp_path / 'a.json') as tmp:
    tmp.write_text('new')
  assert not (tmp_path / first).exists() and (tmp_path / 'a.json').read_text() == 'new'
  # The temporary's own name carries this writer.
  with atomic.new_file(tmp_path / 'b.json') as tmp:
    assert tmp.name.startswith(f'.b.json.{atomic._TEMP_TAG}-{os.getpid()}@')
    tmp.write_text('b')
  # Writing many files into one folder scans it once: a later leftover waits for the next
  # process (or an explicit sweep).
  later = _leftover(tmp_path, 'a.json', dead_pid, suffix='.json', folder_kind=False)
  with atomic.new_folder(tmp_path / 'exp', overwrite=False) as tmp:
    (tmp / 'f').write_text('f')
  assert (tmp_path / later).exists()
  assert atomic.sweep_leftovers(tmp_path) == [later]

"""Bad inputs and faults, each through the code a user runs: nothing is lost, nothing silent.

Every case asserts the exit status, that the one error line names the file / field / flag, and
that nothing was written or lost. The CLIs run in-process (eval.py / train.py through their
absl entry points, capenext-predict through `main`) except where flag definition itself is
under test (config overrides are applied while train.py is imported).
"""
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from PIL import Image

from conftest import MP100_MINI, REPO

MINI_TEST = MP100_MINI / 'annotations' / 'mini_test.json'
ENV = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=f'{REPO}:{REPO}/tests')


def run_script(*args, timeout=120):
  """A program in a subprocess: (status, stdout, stderr)."""
  proc = subprocess.run([sys.executable, *map(str, args)], env=ENV, cwd=REPO, timeout=timeout,
                        capture_output=True, text=True)
  return proc.returncode, proc.stdout, proc.stderr


def last_line(text: str) -> str:
  return text.strip().splitlines()[-1] if text.strip() else ''


# ----------------------------------------------------------------------------- checkpoints
def tiny_state(value: float):
  from capenext_jax.training.state import TrainState
  return TrainState(trainable={'w': jax.numpy.full((4, 3), value)}, frozen={},
                    opt_state={'mu': jax.numpy.full((4, 3), value / 2)},
                    step=jax.numpy.int32(int(value)), rng=jax.numpy.zeros(2, jax.numpy.uint32))


def failing_writes(monkeypatch, after: int):
  """Array writes of every save after the first `after` ones fail in the background (as a
  full disk does: the save call returns, the commit thread fails later)."""
  from orbax.checkpoint._src.serialization import type_handlers
  original, calls = type_handlers.ArrayHandler.serialize, []

  class FullDisk:
    def result(self, timeout=None):
      raise OSError(28, 'No space left on device\n' + 'TensorStore context dump\n' * 500)

  async def serialize(self, *args, **kwargs):
    calls.append(1)
    futures = await original(self, *args, **kwargs)
    return list(futures) + [FullDisk()] if len(calls) > after else futures

  monkeypatch.setattr(type_handlers.ArrayHandler, 'serialize', serialize)


def test_failed_save_is_one_error_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch,
                                                                    capfd):
  from capenext_jax.training.checkpoint import Checkpointer, CheckpointError
  failing_writes(monkeypatch, after=1)
  ckpt = Checkpointer(str(tmp_path / 'checkpoints'), async_save=True)
  ckpt.save(1, tiny_state(1.0), {'step': 1})
  ckpt.wait()
  ckpt.save(2, tiny_state(2.0), {'step': 2})   # returns; the commit fails in the background
  with pytest.raises(CheckpointError) as err:
    for _ in range(200):                       # what the loop does between steps
      ckpt.check()
      time.sleep(0.05)
  ckpt.close()                                 # not a second report
  message = str(err.value)
  assert 'No space left on device' in message and str(tmp_path / 'checkpoints') in message
  assert 'latest complete checkpoint is step 1' in message and '\n' not in message
  assert len(capfd.readouterr().err.splitlines()) < 10     # no page of TensorStore dump
  monkeypatch.undo()
  reader = Checkpointer(str(tmp_path / 'checkpoints'))
  state, position = reader.restore_latest(tiny_state(0.0))
  reader.close()
  assert position == {'step': 1}
  np.testing.assert_array_equal(state.trainable['w'], np.full((4, 3), 1.0))


def test_truncated_latest_checkpoint_falls_back_and_is_kept(tmp_path, capsys):
  from capenext_jax.training.checkpoint import Checkpointer
  ckpt = Checkpointer(str(tmp_path / 'checkpoints'), async_save=False)
  for step in (1, 2):
    ckpt.save(step, tiny_state(float(step)), {'step': step})
  ckpt.close()
  data = [p for p in (tmp_path / 'checkpoints' / '2' / 'state').rglob('*')
          if p.is_file() and p.stat().st_size > 0 and 'd' in p.parent.name]
  assert data, sorted((tmp_path / 'checkpoints' / '2').rglob('*'))
  for p in data:   # truncate every array data file of the latest checkpoint
    p.write_bytes(p.read_bytes()[:len(p.read_bytes()) // 3])
  reader = Checkpointer(str(tmp_path / 'checkpoints'))
  state, position = reader.restore_latest(tiny_state(0.0))
  steps = reader.all_steps()
  reader.close()
  assert position == {'step': 1} and steps == [1]
  np.testing.assert_array_equal(state.trainable['w'], np.full((4, 3), 1.0))
  warning = capsys.readouterr().err
  assert 'checkpoint step 2' in warning and 'does not restore' in warning
  moved = list((tmp_path / 'checkpoints.corrupt').iterdir())   # set aside, not deleted
  assert len(moved) == 1 and moved[0].name.startswith('2-') and any(moved[0].rglob('*'))


def test_training_stops_at_once_when_a_save_fails(tmp_path, monkeypatch):
  """The loop polls the checkpointer every step: a save that fails in the background ends
  the run before its next save, with the workdir unlocked and resumable."""
  from capenext_jax.training.checkpoint import CheckpointError
  from capenext_jax.training.workdir import WorkdirLock
  from test_train import tiny_config, train
  c = tiny_config(8)
  c.data.root = str(tmp_path / 'data')
  c.checkpoint_every_steps = c.eval_every_steps = 2
  c.async_checkpoints = True
  failing_writes(monkeypatch, after=1)      # step 2 is saved, step 4's commit fails
  with pytest.raises(CheckpointError, match=r'latest complete checkpoint is step 2'):
    train(c, str(tmp_path / 'run'))
  kept = sorted(p.name for p in (tmp_path / 'run' / 'checkpoints').iterdir())
  assert '2' in kept and '6' not in kept and '8' not in kept, kept
  with WorkdirLock(tmp_path / 'run'):       # released by the failed run
    pass


# ----------------------------------------------------------------------------- workdirs
def test_second_training_on_a_held_workdir_stops_at_once(tmp_path):
  from capenext_jax.training.workdir import WorkdirLock
  wd = tmp_path / 'run'
  config = tmp_path / 'tiny.py'
  config.write_text('from test_train import tiny_config\n\n'
                    f'def get_config():\n  c = tiny_config(2)\n  c.data.root = {str(tmp_path)!r}\n'
                    '  return c\n')
  with WorkdirLock(wd):
    status, out, err = run_script('train.py', f'--config={config}', f'--workdir={wd}')
  assert status == 2, err[-3000:]
  assert last_line(err).startswith(f'train.py: error: {wd}: the workdir is in use by another '
                                   f'training (pid {os.getpid()}')
  assert 'Traceback' not in err and sorted(p.name for p in wd.iterdir()) == ['.lock']


def test_lock_of_a_killed_training_is_not_stale(tmp_path):
  from capenext_jax.training.workdir import WorkdirLock
  holder = subprocess.Popen(
      [sys.executable, '-c', 'import sys, time\nfrom capenext_jax.training.workdir import '
       'WorkdirLock\nwith WorkdirLock(sys.argv[1]):\n  print("locked", flush=True)\n'
       '  time.sleep(600)\n', str(tmp_path)], env=ENV, stdout=subprocess.PIPE, text=True)
  assert holder.stdout.readline().strip() == 'locked'
  with pytest.raises(ValueError, match=f'pid {holder.pid} on'):
    WorkdirLock(tmp_path).__enter__()
  holder.send_signal(signal.SIGKILL)
  holder.wait(timeout=30)
  with WorkdirLock(tmp_path):
    pass


def test_restart_with_another_config_is_refused_unless_asked(tmp_path):
  from capenext_jax.training import workdir
  from test_train import tiny_config, train
  wd = tmp_path / 'run'
  (wd / 'checkpoints' / '2').mkdir(parents=True)
  saved = tiny_config(2)
  (wd / 'config.json').write_text(saved.to_json(indent=1))
  longer = tiny_config(2)
  longer.total_steps, longer.log_every_steps, longer.mesh_shape.data = 10, 5, 1
  workdir.check_resume_config(longer, wd)            # run length / logging / layout: fine
  changed = tiny_config(2)
  changed.optim.lr, changed.seed = 3e-4, 7
  with pytest.raises(ValueError, match=r'config.json: this workdir holds a run with another '
                     r'config \(optim.lr: 0.002 -> 0.0003; seed: 1 -> 7\)'):
    train(changed, str(wd))
  assert json.loads((wd / 'config.json').read_text()) == json.loads(saved.to_json())
  changed.allow_config_change = True
  workdir.check_resume_config(changed, wd)
  kept = [p.name for p in wd.iterdir() if p.name.startswith('config.') and p.name != 'config.json']
  assert len(kept) == 1 and json.loads((wd / kept[0]).read_text()) == json.loads(saved.to_json())


# ----------------------------------------------------------------------------- EXIF
# The EXIF specification's eight orientations, as numpy on the stored pixels (an independent
# statement of what cv2's IMREAD_COLOR shows).
UPRIGHT = {1: lambda a: a, 2: lambda a: a[:, ::-1], 3: lambda a: a[::-1, ::-1],
           4: lambda a: a[::-1], 5: lambda a: a.transpose(1, 0, 2),
           6: lambda a: np.rot90(a, -1), 7: lambda a: np.rot90(a, 1)[:, ::-1],
           8: lambda a: np.rot90(a, 1)}


def exif_jpegs(tmp_path):
  """A 24-wide, 40-high JPEG per orientation (same pixels, tag 1..8) and the stored pixels."""
  rng = np.random.default_rng(0)
  stored = np.repeat(np.repeat(rng.integers(0, 256, (5, 3, 3), np.uint8), 8, 0), 8, 1)
  paths = {}
  for o in UPRIGHT:
    exif = Image.Exif()
    exif[0x0112] = o
    paths[o] = tmp_path / f'orientation_{o}.jpg'
    Image.fromarray(stored).save(paths[o], quality=95, exif=exif.tobytes())
  return paths


def test_exif_orientation_is_applied_in_every_decoder(tmp_path):
  """load_rgb (predict, overlays, image checks, the TFDS builder) and the tf.data decoder
  both show all eight orientations upright, as cv2 does."""
  import tensorflow as tf

  from capenext_jax.mp100.images import exif_orientation, load_rgb
  from data_pipeline.pipeline import decode, decode_upright
  paths = exif_jpegs(tmp_path)
  raw = decode(tf.io.read_file(str(paths[1]))).numpy()    # the stored pixels, as TF decodes
  for o, path in paths.items():
    assert exif_orientation(path.read_bytes()) == o
    want = UPRIGHT[o](raw)
    got_tf = decode_upright(tf.io.read_file(str(path))).numpy()
    np.testing.assert_array_equal(got_tf, want, err_msg=f'tf.data, orientation {o}')
    got_pil = load_rgb(path)
    assert got_pil.shape == want.shape, o
    # PIL and TF both run libjpeg's accurate integer IDCT; allow the odd rounding step.
    assert np.abs(got_pil.astype(int) - want).max() <= 1, o
  assert load_rgb(paths[6], (40, 24)).shape == (24, 40, 3)   # stored 24 wide, 40 high
  with pytest.raises(ValueError, match=r'orientation_6.jpg: image is 40x24 upright but the '
                     r'json says width x height 24x40 \(its EXIF orientation tag turns it'):
    load_rgb(paths[6], (24, 40))

"""Checkpoint save/restore (exact resume), last-N + best retention, save on SIGTERM / Ctrl-C,
a checkpoint of another config refused (not moved), and the run config's numbers and workdir
checked before training."""
import hashlib
import json
import os
import signal
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from capenext_jax.training import checkpoint, schedule

from capenext_jax.device import flat, partition, state as state_lib
from capenext_jax.device import step as step_lib
from training_toy import ToyCapeNext, toy_batch, toy_loss


def setup(model_seed=0, rng_seed=1):
  cfg = schedule.default_optim_config()
  cfg.update(lr=1e-2, warmup_steps=0)
  tx = schedule.make_optimizer(cfg, steps_per_epoch=10)
  graphdef, st = state_lib.init_train_state(ToyCapeNext(rngs=nnx.Rngs(model_seed)), tx,
                                            jax.random.PRNGKey(rng_seed))
  return graphdef, st, tx


def assert_trees_equal(a, b):
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(a), jax.device_get(b))


def test_save_restore_resumes_exactly(tmp_path):
  graphdef, st, tx = setup()
  train_step = step_lib.make_train_step(graphdef, toy_loss, tx)
  st, _ = train_step(st, toy_batch(0))
  ckpt = checkpoint.Checkpointer(str(tmp_path / 'ckpt'))
  ckpt.save(1, st, {'epoch': 0, 'step_in_epoch': 1})
  ckpt.wait()
  saved = jax.device_get({k: getattr(st, k) for k in state_lib.CHECKPOINTED})

  # Restore into the sharded abstract state of a differently seeded run.
  _, other, _ = setup(model_seed=5, rng_seed=7)
  mesh = partition.make_mesh({'data': -1, 'fsdp': 1})
  shardings = state_lib.state_shardings(other, tx, mesh)
  target = state_lib.abstract_state(other, shardings).replace(frozen=other.frozen)
  restored, position = ckpt.restore(target)
  assert position == {'epoch': 0, 'step_in_epoch': 1}
  assert_trees_equal({k: getattr(restored, k) for k in state_lib.CHECKPOINTED}, saved)
  assert restored.trainable['backbone']['kernel'].sharding == (
      shardings.trainable['backbone']['kernel'])
  ckpt.close()

  # The resumed run (its frozen part rebuilt by the same init) steps as the uninterrupted one.
  restored = restored.replace(frozen=setup()[1].frozen)
  st_next, m_next = train_step(st, toy_batch(1))
  st_res, m_res = train_step(restored, toy_batch(1))
  assert_trees_equal((st_next.trainable, st_next.opt_state, m_next),
                     (st_res.trainable, st_res.opt_state, m_res))


def test_optimizer_state_is_stored_per_leaf_and_old_checkpoints_resume(tmp_path):
  """The step's optimizer buffers (device/flat.py) are saved as optax's per-leaf tree, the
  layout checkpoints had before the buffers: a checkpoint of a per-leaf state (what earlier
  versions wrote) has the same entries, and restores into the buffers unchanged."""
  _, st, _ = setup()
  st = st.replace(opt_state=jax.tree.map(lambda x: x + 0.25, st.opt_state))   # not zeros
  old = st.replace(opt_state=jax.device_get(flat.to_leaves(st.opt_state)))
  ckpt = checkpoint.Checkpointer(str(tmp_path / 'ckpt'), async_save=False)
  ckpt.save(1, st, {'step': 1})
  ckpt.save(2, old, {'step': 2})
  disk = [checkpoint._shapes(ocp.StandardCheckpointHandler().metadata(
      tmp_path / 'ckpt' / str(step) / 'state')) for step in (1, 2)]
  assert disk[0] == disk[1] and 'opt_state/0/mu/backbone/kernel' in disk[0]
  restored, _ = ckpt.restore(st, step=2)
  assert flat.layout_of(restored.opt_state) == flat.layout_of(st.opt_state)
  assert_trees_equal(restored.opt_state, st.opt_state)
  ckpt.close()


def test_keeps_last_n_plus_best(tmp_path):
  _, st, _ = setup()
  ckpt = checkpoint.Checkpointer(str(tmp_path / 'ckpt'), keep_last=2, best_metric='pck')
  pck = {2: 0.5, 4: 0.9, 6: 0.7}
  for step in range(1, 8):
    metrics = {'pck': pck[step]} if step in pck else None
    ckpt.save(step, st.replace(step=np.int32(step)), {'epoch': step}, metrics)
    ckpt.wait()
  assert ckpt.all_steps() == [4, 6, 7]
  restored, position = ckpt.restore(st, step=4)
  assert int(restored.step) == 4 and position == {'epoch': 4}
  ckpt.close()
  # The metrics are on disk: a new process (a resumed run, capenext-convert --best) sees them.
  reopened = checkpoint.Checkpointer(str(tmp_path / 'ckpt'), keep_last=2, best_metric='pck')
  assert reopened.best_step() == 4
  assert reopened.metrics(4) == {'pck': 0.9} and reopened.metrics(7) == {}
  reopened.close()


# ----------------------------------------------------------------------------- SIGTERM
def sigterm_main(directory):
  """A minimal train loop that is preempted at step 3 (run in a subprocess)."""
  graphdef, st, tx = setup()
  train_step = step_lib.make_train_step(graphdef, toy_loss, tx)
  ckpt = checkpoint.Checkpointer(directory)
  stop = checkpoint.StopSignal()
  for step in range(100):
    if stop.should_stop(step):
      ckpt.save(step, st, {'epoch': 0, 'step_in_epoch': step}, force=True)
      ckpt.wait()
      ckpt.close()
      print(f'PREEMPTED_AT {step}')
      return
    st, _ = train_step(st, toy_batch(step))
    if step == 2:
      os.kill(os.getpid(), signal.SIGTERM)
  raise AssertionError('SIGTERM was not seen')


def test_sigterm_saves_and_exits_cleanly(tmp_path):
  directory = str(tmp_path / 'ckpt')
  proc = subprocess.run([sys.executable, __file__, directory], capture_output=True, text=True,
                        timeout=240, cwd=os.path.dirname(__file__),
                        env=dict(os.environ, JAX_PLATFORMS='cpu'))
  assert proc.returncode == 0 and 'PREEMPTED_AT 3' in proc.stdout, proc.stderr[-4000:]
  _, st, _ = setup()
  ckpt = checkpoint.Checkpointer(directory)
  assert ckpt.latest_step() == 3
  restored, position = ckpt.restore(st)
  assert int(restored.step) == 3 and position == {'epoch': 0, 'step_in_epoch': 3}
  ckpt.close()



def test_ctrl_c_is_a_stop_request_every_time():
  """SIGINT sets the same flag as SIGTERM (the loop then saves and exits 0) on each press;
  no KeyboardInterrupt is raised, so none can be swallowed by a callback."""
  stop = checkpoint.StopSignal()
  try:
    assert not stop.should_stop(0)
    for _ in range(2):
      os.kill(os.getpid(), signal.SIGINT)
      assert stop.should_stop(1) and stop.received == 'SIGINT'
  finally:
    stop.uninstall()
  assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def _tree_digest(folder) -> dict:
  return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
          for p in sorted(folder.rglob('*')) if p.is_file()}


def test_checkpoint_of_another_config_is_refused_and_not_moved(tmp_path):
  """A restart whose model differs from the one that saved (a workdir's config.json lost,
  another head size) is refused naming the step and a parameter; nothing is moved to
  checkpoints.corrupt (that is for damage: tests/test_bad_inputs.py)."""
  _, st, _ = setup()
  ckpt = checkpoint.Checkpointer(str(tmp_path / 'checkpoints'), async_save=False)
  for step in (1, 2):
    ckpt.save(step, st, {'step': step})
  ckpt.close()
  before = _tree_digest(tmp_path)
  wider = dict(st.trainable, text_proj={'kernel': np.zeros((8, 24), np.float32),
                                        'bias': np.zeros(24, np.float32)})
  reader = checkpoint.Checkpointer(str(tmp_path / 'checkpoints'))
  try:
    with pytest.raises(ValueError, match=r'checkpoint step 2 does not fit this run\'s model '
                       r'config \(2 parameter\(s\) differ, first: trainable/text_proj/bias '
                       r'\(16,\) != \(24,\)\).*no checkpoint was moved'):
      reader.restore_latest(st.replace(trainable=wider))
    assert reader.all_steps() == [1, 2]
    assert int(reader.restore_latest(st)[0].step) == int(st.step)   # the same config resumes
  finally:
    reader.close()
  assert _tree_digest(tmp_path) == before and not (tmp_path / 'checkpoints.corrupt').exists()


# ----------------------------------------------------------------------------- before training
@pytest.mark.parametrize('field, value, must', [
    ('optim.lr', -0.002, 'a number > 0'),
    ('total_steps', -5, 'an integer >= 0'),
    ('batch_size', 0, 'an integer >= 1'),
    ('log_every_steps', 0, 'an integer >= 1'),
    ('keep_checkpoints', 0, 'an integer >= 1'),
    ('data.shots', 0, 'an integer >= 1'),
])
def test_run_config_numbers_are_checked(field, value, must):
  from configs import synthetic
  from capenext_jax.training.run_config_checks import check_run_config
  config = synthetic.get_config()
  check_run_config(config)
  node, name = config, field
  while '.' in name:
    head, name = name.split('.', 1)
    node = node[head]
  node[name] = value
  with pytest.raises(ValueError, match=rf'^--config\.{field}={value}: must be {must}'):
    check_run_config(config)


def _train_cli(tmp_path, *flags):
  """train.py on the test-size synthetic config (data drawn under tmp_path/data)."""
  from conftest import REPO
  config = tmp_path / 'tiny.py'
  config.write_text('from test_train import tiny_config\n\n'
                    f'def get_config():\n  c = tiny_config(2)\n  c.data.root = '
                    f'{str(tmp_path / "data")!r}\n  return c\n')
  env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=f'{REPO}:{REPO}/tests')
  return subprocess.run([sys.executable, 'train.py', f'--config={config}', *flags], env=env,
                        cwd=REPO, capture_output=True, text=True, timeout=300)


def test_train_cli_refuses_bad_numbers_and_an_export_as_workdir(tmp_path):
  proc = _train_cli(tmp_path, f'--workdir={tmp_path / "run"}', '--config.batch_size=0')
  assert proc.returncode == 2, proc.stderr[-3000:]
  assert proc.stderr.strip().splitlines()[-1] == (
      'train.py: error: --config.batch_size=0: must be an integer >= 1')
  assert not (tmp_path / 'run' / 'config.json').exists()
  export_dir = tmp_path / 'exp'
  export_dir.mkdir()
  (export_dir / 'config.json').write_text(json.dumps({'format': 'capenext-jax', 'version': 1}))
  (export_dir / 'params.safetensors').write_bytes(b'weights')
  before = _tree_digest(export_dir)
  proc = _train_cli(tmp_path, f'--workdir={export_dir}')
  assert proc.returncode == 2, proc.stderr[-3000:]
  assert proc.stderr.strip().splitlines()[-1] == (
      f'train.py: error: {export_dir}: is an export, not a train.py workdir; train.py --workdir '
      f'writes only into a new or empty folder or a train.py workdir')
  assert _tree_digest(export_dir) == before


if __name__ == '__main__':
  sigterm_main(sys.argv[1])

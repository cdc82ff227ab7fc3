"""Checkpoint save/restore (exact resume), last-N + best retention, and save on SIGTERM."""
import os
import signal
import subprocess
import sys

import jax
import numpy as np
from flax import nnx

from capenext_jax.training import checkpoint, schedule

from capenext_jax.device import partition, state as state_lib
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


if __name__ == '__main__':
  sigterm_main(sys.argv[1])

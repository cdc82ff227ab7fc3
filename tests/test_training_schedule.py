"""The official LR schedule and Adam settings (docs/MODEL.md §4)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from capenext_jax.training import schedule


def reference_lr(i, steps_per_epoch, lr=1e-5, warmup=1000, ratio=1e-3, milestones=(160, 180),
                 gamma=0.1):
  """mmcv's step policy + linear warmup, literally, in float64."""
  regular = lr * gamma ** sum(i // steps_per_epoch >= m for m in milestones)
  if i < warmup:
    return regular * (1 - (1 - i / warmup) * (1 - ratio))
  return regular


@pytest.mark.parametrize('steps_per_epoch', [50, 3])  # 3: milestones fall inside the warmup
def test_schedule_matches_float64_reference(steps_per_epoch):
  cfg = schedule.default_optim_config()
  fn = schedule.make_schedule(cfg, steps_per_epoch)
  spe = steps_per_epoch
  steps = sorted({0, 1, 2, 499, 999, 1000, 1001, 160 * spe - 1, 160 * spe, 180 * spe - 1,
                  180 * spe, 200 * spe - 1})
  got = np.asarray(jax.jit(jax.vmap(fn))(jnp.asarray(steps)))
  want = np.array([reference_lr(i, spe) for i in steps])
  assert got.dtype == np.float32
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=0)
  if spe == 50:
    assert got[0] == np.float32(1e-8) and got[steps.index(1000)] == np.float32(1e-5)
    assert got[-1] == np.float32(1e-7)


def test_schedule_accepts_python_ints():
  fn = schedule.make_schedule(schedule.default_optim_config(), 100)
  assert float(fn(500)) == pytest.approx(reference_lr(500, 100), rel=1e-6)


def test_first_adam_update_is_torch_adam():
  # After bias correction the first Adam step is -lr * g / (|g| + eps): eps outside the sqrt.
  tx = schedule.make_optimizer(schedule.default_optim_config(), steps_per_epoch=10)
  params = {'w': jnp.array([1.0, -2.0, 3.0])}
  grads = {'w': jnp.array([0.5, -1e-8, 0.0])}
  updates, _ = tx.update(grads, tx.init(params), params)
  g = np.asarray(grads['w'], np.float64)
  # optax forms the bias correction 1 - b2**t in float32 (torch: in Python float64), which
  # is off by ~1e-5 relative at t = 1, hence the tolerance.
  np.testing.assert_allclose(updates['w'], -1e-8 * g / (np.abs(g) + 1e-8), rtol=2e-5)


def test_bad_steps_per_epoch():
  with pytest.raises(ValueError, match='steps_per_epoch'):
    schedule.make_schedule(schedule.default_optim_config(), 0)


@pytest.mark.parametrize('rule, batch, lr, warmup', [
    ('none', 8192, 1e-5, 1000),              # the recipe in steps, whatever the batch
    ('linear', 256, 8e-5, 125),
    ('sqrt', 8192, 1.6e-4, 4),               # 256 chips x 32: lr x 16, warmup of 32,000 samples
    ('sqrt', 16, 1e-5 / np.sqrt(2), 2000),   # smaller batches scale down
    ('linear', 96, 3e-5, 334)])              # warmup rounded up: never shorter in samples
def test_lr_scaling_with_the_global_batch(rule, batch, lr, warmup):
  cfg = schedule.default_optim_config()
  cfg.lr_scaling = rule
  scaled = schedule.for_batch_size(cfg, batch)
  assert cfg.lr == 1e-5 and cfg.warmup_steps == 1000          # the config is left as it is
  assert scaled.lr == pytest.approx(lr, rel=1e-12) and scaled.warmup_steps == warmup
  spe = 50                                     # milestones after the warmup
  fn = schedule.make_schedule(scaled, spe)
  steps = [0, warmup // 2, warmup - 1, warmup, 160 * spe, 180 * spe]
  want = [reference_lr(i, spe, lr=lr, warmup=warmup) for i in steps]
  np.testing.assert_allclose(np.asarray(jax.vmap(fn)(jnp.asarray(steps))), want, rtol=1e-6)
  assert float(fn(warmup)) == pytest.approx(lr, rel=1e-6)     # the peak rate after warmup


def test_lr_scaling_refuses_unknown_rules():
  cfg = schedule.default_optim_config()
  cfg.lr_scaling = 'cubic'
  with pytest.raises(ValueError, match=r"optim.lr_scaling='cubic'"):
    schedule.for_batch_size(cfg, 64)

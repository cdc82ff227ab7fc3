"""Frozen/trainable split, mesh creation and sharding rules (single device; the multi-device
layouts run in test_training_step.py)."""
import jax
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from capenext_jax.training import schedule

from capenext_jax.device import flat, partition, state as state_lib
from training_toy import ToyCapeNext


def names(tree):
  return [partition.path_name(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def test_clip_is_frozen_and_has_no_optimizer_state():
  tx = schedule.make_optimizer(schedule.default_optim_config(), 10)
  _, st = state_lib.init_train_state(ToyCapeNext(rngs=nnx.Rngs(0)), tx, jax.random.PRNGKey(0))
  trainable, frozen = names(st.trainable), names(st.frozen)
  opt = names(flat.to_leaves(st.opt_state))   # as checkpoints hold it (in memory: buffers)
  assert trainable and not any('clip' in n for n in trainable + opt)
  assert {'clip/kernel', 'clip/bias'} <= set(frozen)
  assert any(n.startswith('dropout/rngs/') for n in frozen)  # RNG streams are not params
  # Adam: mu and nu per trainable leaf, plus the counters.
  n_moments = sum(1 for n in opt if n.startswith(('0/mu/', '0/nu/')))
  assert n_moments == 2 * len(trainable)


def test_trainable_filter_takes_other_frozen_keys():
  model = ToyCapeNext(rngs=nnx.Rngs(0))
  _, trainable, _, _ = partition.split_model(model,
                                             partition.trainable_filter(('clip', 'layers')))
  assert sorted(trainable) == ['backbone', 'text_proj']


def test_fsdp_spec():
  assert partition.fsdp_spec((6, 8), 1) == P()
  assert partition.fsdp_spec((6, 8), 2) == P(None, 'fsdp')
  assert partition.fsdp_spec((8, 8), 2) == P('fsdp', None)   # first on ties
  assert partition.fsdp_spec((6, 9), 4) == P()
  assert partition.fsdp_spec((), 2) == P()


def test_make_mesh_one_device():
  mesh = partition.make_mesh({'data': -1, 'fsdp': 1}, jax.devices()[:1])
  assert mesh.axis_names == ('data', 'fsdp') and mesh.devices.shape == (1, 1)
  with pytest.raises(ValueError, match='does not fit'):
    partition.make_mesh({'data': 2, 'fsdp': 1}, jax.devices()[:1])
  with pytest.raises(ValueError, match='must be among'):
    partition.make_mesh({'model': 1})

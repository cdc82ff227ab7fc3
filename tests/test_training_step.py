"""The jitted train/eval steps: frozen params untouched, non-finite reporting, and the same
result on 1 device, a (2,1) data mesh and a (1,2) fsdp mesh (2 fake CPU devices)."""
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from capenext_jax.training import schedule

from capenext_jax.device import flat, partition, state as state_lib, step as step_lib
from conftest import xla_flags
from training_toy import ToyCapeNext, toy_batch, toy_loss

OPTIM = dict(lr=1e-2, warmup_steps=0)  # a visible update, no warmup


def setup(seed=0):
  cfg = schedule.default_optim_config()
  cfg.update(OPTIM)
  tx = schedule.make_optimizer(cfg, steps_per_epoch=10)
  graphdef, st = state_lib.init_train_state(ToyCapeNext(rngs=nnx.Rngs(seed)), tx,
                                            jax.random.PRNGKey(1))
  return graphdef, st, tx


def assert_close_in_ulps(got, want):
  """Equal within a few float32 ulps of each array's scale (1e-6 * max |want| ~ 8 ulps)."""
  def close(a, b):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6 * float(np.max(np.abs(b), initial=0)))
  jax.tree.map(close, jax.device_get(got), jax.device_get(want))


def test_train_step_updates_trainable_only_as_per_leaf_optax_does():
  """5 steps update the trainable part only; Adam over the state's buffers (device/flat.py)
  steps as optax's per-leaf state does.

  Not bit for bit: the arithmetic per element is the same expression, but XLA:CPU's code for
  it (the vectorised loop and its scalar tail, FMA contraction) depends on the array's length
  and the element's place in it, so an element may round 1 ulp apart per step (measured on
  random grads: up to 7 ulps of a param after 5 steps); a wrong slot or moment would be off
  by about the lr (1e-2). The global norm sums per buffer instead of per leaf (another
  float32 summation order).
  """
  graphdef, st, tx = setup()
  assert [b.shape for b in st.opt_state[0].mu.arrays] == [(276,)]   # one float32 buffer
  before = jax.device_get(st)
  reference = jax.tree.map(jnp.copy, st)   # the step donates its state
  reference = reference.replace(opt_state=jax.jit(flat.to_leaves)(reference.opt_state))
  train_step = step_lib.make_train_step(graphdef, toy_loss, tx)
  batch = toy_batch()
  losses = []
  for _ in range(5):
    st, metrics = train_step(st, batch)
    reference, ref_metrics = train_step(reference, batch)
    losses.append(float(metrics['loss']))
  assert int(st.step) == 5 and bool(metrics['finite'])
  assert set(metrics) == {'loss', 'proposal_loss', 'l1_loss_layer1', 'grad_norm', 'finite'}
  assert losses[-1] < losses[0]
  jax.tree.map(np.testing.assert_array_equal, before.frozen['clip'], st.frozen['clip'])
  assert not np.array_equal(before.trainable['backbone']['kernel'],
                            st.trainable['backbone']['kernel'])
  assert flat.layout_of(reference.opt_state) is None
  assert_close_in_ulps((st.trainable, jax.jit(flat.to_leaves)(st.opt_state), metrics),
                       (reference.trainable, reference.opt_state, ref_metrics))


def test_dropout_key_depends_on_step_and_eval_is_deterministic():
  graphdef, st, tx = setup()
  batch = toy_batch()
  train_step = step_lib.make_train_step(graphdef, toy_loss, tx)

  def loss_at(step):  # the step donates its input state, so each call gets a fresh one
    return float(train_step(setup()[1].replace(step=jnp.int32(step)), batch)[1]['loss'])

  assert loss_at(0) != loss_at(1)
  eval_step = step_lib.make_eval_step(graphdef)
  out = eval_step(st, batch)
  model = state_lib.merge_model(graphdef, st)
  model.eval()
  want = step_lib.default_forward(model, batch)
  np.testing.assert_allclose(out['keypoints'], want['keypoints'], rtol=1e-6)
  np.testing.assert_array_equal(eval_step(st, batch)['keypoints'], out['keypoints'])


def test_text_cache_is_an_argument_not_a_constant():
  """The frozen-text cache enters the steps as a jit argument: a new cache of the same shape
  reuses the compiled step (one compilation) and changes the result."""
  from capenext_jax.device import forward as forward_lib
  from capenext_jax.text.cache import TextCache
  from training_toy import E, K, S
  graphdef, st, tx = setup()
  train_step = step_lib.make_train_step(graphdef, toy_loss, tx,
                                        forward=forward_lib.make_forward(S))
  batch = {k: v for k, v in toy_batch().items() if not k.endswith('_text')}
  batch['category_index'] = np.array([0, 2, 1, 2], np.int32)
  r = np.random.default_rng(0)
  caches = [TextCache(keypoint=jnp.asarray(r.standard_normal((3, K, E)), jnp.float32),
                      category=jnp.asarray(r.standard_normal((3, E)), jnp.float32))
            for _ in range(2)]
  losses = []
  for cache in caches:
    fresh = jax.tree.map(jnp.copy, st)     # the step donates its state
    losses.append(float(train_step(fresh, batch, cache)[1]['loss']))
  assert train_step._cache_size() == 1
  assert losses[0] != losses[1]
  eval_step = step_lib.make_eval_step(graphdef, forward=forward_lib.make_forward(S))
  outs = [eval_step(st, batch, cache)['keypoints'] for cache in caches]
  assert eval_step._cache_size() == 1 and not np.array_equal(outs[0], outs[1])


def test_layout_round_trips_every_group_kind():
  """Replicated, fsdp-split (rows = shards) and doubly split leaves (a buffer of their own),
  by dtype, on an abstract 2 x 2 mesh: flatten then unflatten is the identity, bit for bit."""
  mesh = jax.sharding.AbstractMesh((2, 2), ('data', 'fsdp'))
  named = lambda *spec: jax.sharding.NamedSharding(mesh, P(*spec))   # noqa: E731
  r = np.random.default_rng(0)
  params = {'a': r.standard_normal((3, 4)).astype(np.float32),
            'b': r.standard_normal((6, 4)).astype(np.float32),
            'c': r.standard_normal((5, 4, 2)).astype(np.float32),
            'd': r.standard_normal((4, 6)).astype(np.float32),
            'e': r.standard_normal((4,)).astype(jnp.bfloat16)}
  shardings = {'a': named(), 'b': named(None, 'fsdp'), 'c': named(None, None, ('data', 'fsdp')),
               'd': named('data', 'fsdp'), 'e': named()}
  layout = flat.Layout.of(params, shardings)
  assert [(g.kind, g.dtype, g.shape, g.partition_spec()) for g in layout.groups] == [
      ('replicated', 'float32', (12,), P()), ('sharded', 'float32', (2, 12), P(('fsdp',), None)),
      ('sharded', 'float32', (4, 10), P(('data', 'fsdp'), None)),
      ('own', 'float32', (4, 6), P('data', 'fsdp')), ('replicated', 'bfloat16', (4,), P())]
  buffers = layout.flatten(params)
  # Row i of a split group holds shard i of each of its leaves.
  np.testing.assert_array_equal(buffers.arrays[1][1], params['b'][:, 2:].T.ravel())
  jax.tree.map(np.testing.assert_array_equal, layout.unflatten(buffers), params)


def test_non_finite_loss_names_step_and_term():
  graphdef, st, tx = setup()
  train_step = step_lib.make_train_step(graphdef, toy_loss, tx)
  good = toy_batch()
  bad = dict(good, query_joints=np.full_like(good['query_joints'], np.nan))
  history = []
  for i, batch in enumerate([good, good, bad, good]):
    st, metrics = train_step(st, batch)
    history.append((i, metrics))  # device arrays: nothing is fetched until the check
  step_lib.check_finite(jax.device_get(history[:2]))
  with pytest.raises(FloatingPointError, match=r'non-finite l1_loss_layer1, loss, '
                     r'proposal_loss at step 2'):
    step_lib.check_finite(jax.device_get(history))


# ----------------------------------------------------------------------------- 2 fake devices
def multi_device_main():
  """Run in a subprocess with 2 fake CPU devices (the flag must precede the jax import)."""
  assert jax.device_count() == 2, jax.devices()
  graphdef, init, tx = setup()
  # Host copies (numpy; key arrays stay jax and are re-wrapped): device_put may alias its
  # input on a 1-device mesh, and the step donates it. Re-running setup() would cost ~100
  # eager-op compiles.
  host = jax.device_get(init)
  fresh = lambda start: jax.tree.map(
      lambda x: x if isinstance(x, np.ndarray)
      else jax.random.wrap_key_data(np.asarray(jax.random.key_data(x))), start)
  batch = toy_batch(batch=4)
  rules = [('text_proj/kernel', P()), ('layers/.*/kernel', P('fsdp', None))]
  # The same start with optax's per-leaf optimizer state (the reference of the buffers).
  to_leaves = jax.jit(flat.to_leaves)   # one executable per layout, not an eager op per leaf
  per_leaf = host.replace(opt_state=jax.device_get(to_leaves(host.opt_state)))
  results, collectives = {}, {}
  for layout, devices, start in [((1, 1), jax.devices()[:1], host), ((2, 1), None, host),
                                 ((1, 2), None, host), ('per-leaf', None, per_leaf)]:
    shape = (1, 2) if layout == 'per-leaf' else layout
    mesh = partition.make_mesh({'data': shape[0], 'fsdp': shape[1]}, devices)
    with jax.set_mesh(mesh):
      shardings = state_lib.state_shardings(start, tx, mesh, rules, min_shard_bytes=0)
      st = state_lib.place(fresh(start), shardings)
      device_batch = partition.shard_batch(batch, mesh)
      train_step = step_lib.make_train_step(graphdef, toy_loss, tx, shardings=shardings).lower(
          st, device_batch).compile()
      metrics = []
      for _ in range(2):
        st, m = train_step(st, device_batch)
        metrics.append(m)
      if shape == (1, 2):
        hlo = train_step.as_text()
        collectives[layout] = {op: hlo.count(f' {op}(') + hlo.count(f' {op}-start(')
                               for op in ('all-gather', 'all-to-all', 'collective-permute')}
      if layout == (1, 2):
        assert st.trainable['backbone']['kernel'].sharding.spec == P(None, 'fsdp')
        assert st.trainable['text_proj']['kernel'].sharding.spec == P()
        assert st.trainable['layers'][0]['kernel'].sharding.spec == P('fsdp', None)
        assert st.trainable['layers'][0]['bias'].sharding.spec == P('fsdp')
        # Adam's moments: one buffer of the fsdp-split leaves (rows = shards), one of the rest.
        mu = st.opt_state[0].mu.arrays
        assert [(x.shape, x.sharding.spec) for x in mu] == [((2, 74), P('fsdp', None)),
                                                          ((128,), P())]
      results[layout] = jax.device_get((st.trainable, to_leaves(st.opt_state), metrics))
  # The optimizer's buffers add no data movement between devices to the step; its results
  # are compared with the others' below.
  assert collectives[(1, 2)] == collectives['per-leaf'], collectives
  # The default threshold: 'fsdp' leaves under 4 MiB stay replicated, explicit rules apply.
  shardings = partition.param_shardings(
      {'small': jax.ShapeDtypeStruct((1024, 1023), jnp.float32),
       'large': jax.ShapeDtypeStruct((1024, 1024), jnp.float32),
       'layers': host.trainable['layers']},
      mesh, rules)
  assert shardings['small'].spec == P() and shardings['large'].spec == P('fsdp', None)
  assert shardings['layers'][0]['kernel'].spec == P('fsdp', None)
  assert shardings['layers'][0]['bias'].spec == P()
  for layout in [(2, 1), (1, 2), 'per-leaf']:
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
                 results[(1, 1)], results[layout])
  check_gather_batches(mesh)
  print('MULTI_DEVICE_OK')


def check_gather_batches(mesh):
  """The evaluator's gather: batch-split outputs of 3 batches come back whole, bit for bit,
  through one all-gather."""
  rng = np.random.default_rng(0)
  host = [{'keypoints': rng.normal(size=(4, 100, 2)).astype(np.float32),
           'pair_index': np.arange(4 * i, 4 * i + 4, dtype=np.int32),
           'valid': rng.random(4) > 0.3} for i in range(3)]
  batches = [partition.shard_batch(b, mesh) for b in host]
  got = partition.gather_batches(batches, mesh)
  for key, value in got.items():
    assert value.dtype == host[0][key].dtype
    np.testing.assert_array_equal(value, np.concatenate([b[key] for b in host]))
  leaves = [[b[k] for k in sorted(b)] for b in batches]
  hlo = partition._packer(mesh).lower(leaves).compile().as_text()
  assert hlo.count(' all-gather(') + hlo.count(' all-gather-start(') == 1, hlo


def test_multi_device_layouts_match_single_device():
  env = dict(os.environ, XLA_FLAGS=xla_flags('--xla_force_host_platform_device_count=2'),
             JAX_PLATFORMS='cpu')
  proc = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True,
                        timeout=240, cwd=os.path.dirname(__file__))
  assert proc.returncode == 0 and 'MULTI_DEVICE_OK' in proc.stdout, proc.stderr[-4000:]


if __name__ == '__main__':
  multi_device_main()

"""benchmarks/hlo_traffic.py: the CUDA lowering of the train step read op by op on a CPU host."""
import os
import sys

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..', 'benchmarks'))
import hlo_traffic  # noqa: E402


def _lowered(f, *args) -> str:
  return jax.jit(f).trace(*args).lower(lowering_platforms=('cuda',)).as_text(debug_info=True)


def _model(f, *args) -> hlo_traffic.Traffic:
  model = hlo_traffic.Traffic(hlo_traffic.parse_module(_lowered(f, *args)))
  model.of('main')
  return model


def test_traffic_model_counts_kernels_and_bytes_of_a_known_function():
  # x @ w is a kernel (reads x and w, writes y); tanh, * 2, the float32 sum and its cast back
  # to bfloat16 (the reduction's epilogue) fuse into one kernel that reads y and writes the
  # scalar; under the scope 'head' every op is the head's.
  def f(x, w):
    with jax.named_scope('head'):
      return (jnp.tanh(x @ w) * 2.0).sum()

  x, w = jnp.ones((64, 32), jnp.bfloat16), jnp.ones((32, 16), jnp.bfloat16)
  model = _model(f, x, w)
  y = 64 * 16 * 2
  assert model.memo['main'] == {'head': (64 * 32 * 2 + 32 * 16 * 2 + y) + (y + 2)}
  assert model.kernel_memo['main'] == {'head': 2}
  record = hlo_traffic.analyse(_lowered(f, x, w), batch_size=1)
  assert record['matmuls_by_dtype'] == {'dot_general: bf16 x bf16 -> bf16':
                                        {'count': 1, 'gflop': round(2 * 64 * 32 * 16 / 1e9, 2)}}
  # y, read by a matmul and by exp, is written once and read by both; kernels: 2 matmuls,
  # w.T, and the two sums with their epilogues and the final add.
  def g(x, w):
    y = x @ w
    return (y @ w.T).sum() + jnp.exp(y).sum()
  two = _model(g, x, w)
  assert sum(two.kernel_memo['main'].values()) == 4
  w_bytes, y2 = 32 * 16 * 2, 64 * 32 * 2
  reads = (64 * 32 * 2 + w_bytes) + w_bytes + (y + w_bytes) + (y2 + y)
  writes = y + w_bytes + y2 + 2
  assert sum(two.memo['main'].values()) == reads + writes


def test_a_slice_reads_only_the_part_it_keeps():
  # The optimizer's buffers are split into params by slices: a kernel reading two slices of
  # x reads those rows (not all of x), and never more than x.
  x = jnp.ones((64, 32), jnp.float32)
  rows = 16 * 32 * 4
  two = _model(lambda x: jnp.exp(x[:16]) + x[16:32], x)
  assert sum(two.memo['main'].values()) == 2 * rows + rows
  many = _model(lambda x: sum(x[i:i + 16] for i in range(0, 48, 8)), x)
  assert sum(many.memo['main'].values()) == 64 * 32 * 4 + rows


def test_tiny_train_step_lowers_and_every_component_moves_bytes():
  record = hlo_traffic.main(['--tiny', '--batch', '2'])
  by_component = record['traffic_mb_per_sample_by_component']
  for component in ('backbone', 'clip_tower', 'fusion', 'head', 'optimizer'):
    assert by_component[component] > 0, component
    assert record['gflop_per_sample_by_component'].get(component, 1) >= 0
  assert record['gflop_per_sample_by_component']['backbone'] > 0
  assert abs(record['traffic_mb_per_sample'] - sum(by_component.values())) < 0.05
  assert record['kernels_per_step'] > 100


def test_values_of_separate_regions_are_told_apart():
  # Each sum_rows lowers to a case whose branch numbers its values afresh (the same names in
  # both); the two reductions, x * 2 and the add are still one kernel reading x once.
  from capenext_jax.models import layers
  x = jnp.ones((64, 32), jnp.float32)
  model = _model(lambda x: layers.sum_rows(x) + layers.sum_rows(x * 2.0), x)
  assert sum(model.kernel_memo['main'].values()) == 1
  assert sum(model.memo['main'].values()) == 64 * 32 * 4 + 32 * 4


def test_dag_fusion_keeps_a_value_used_twice_in_one_kernel():
  # u = tanh(y) is read twice by the fused u * u + u and its sum. The chain rule writes u and
  # reads it back (a kernel of its own); the dag rule, as XLA's fusion does, keeps it inside
  # the one kernel that reads y and writes the scalar. A value read by two kernels (y: the
  # matmul's output) is written under both rules.
  def f(x, w):
    u = jnp.tanh(x @ w)
    return (u * u + u).sum()

  x, w = jnp.ones((64, 32), jnp.float32), jnp.ones((32, 16), jnp.float32)
  functions = hlo_traffic.parse_module(_lowered(f, x, w))
  chain, dag = (hlo_traffic.Traffic(functions, fusion) for fusion in ('chain', 'dag'))
  chain_bytes, dag_bytes = sum(chain.of('main').values()), sum(dag.of('main').values())
  matmul, u = 64 * 32 * 4 + 32 * 16 * 4 + 64 * 16 * 4, 64 * 16 * 4
  assert dag_bytes == matmul + (u + 4) and chain_bytes == dag_bytes + 2 * u
  assert sum(dag.kernel_memo['main'].values()) == 2
  assert sum(chain.kernel_memo['main'].values()) == 3

"""Evaluation throughput (pairs/s), in two modes.

--mode forward (what benchmarks/accelerator.sh runs): the jitted eval forward of the model
alone (eval mode, cached text, last-layer keypoints out) on random inputs already on the device,
per `--dtype` and batch size: compiled once, then `--repeats` batches back to back with one wait
at the end. Imports only capenext_jax and jax/flax/numpy (no TensorFlow).

--mode pipeline: times `Evaluator.predict` on mp100_mini, random weights: the host pipeline
(episode arrays, image decode + warp in tf.data), sharded batches, the jitted eval step and the
mapping back to image px, exactly as eval.py runs it. The first pass compiles and is reported
apart; the timed passes re-run the same pairs. Needs TensorFlow (the [data] extra).

Prints one JSON line per measurement.

usage: python benchmarks/eval_throughput.py --mode forward [--model full|tiny]
         [--dtype float32,bfloat16] [--batch 64,256] [--repeats 10]
       python benchmarks/eval_throughput.py [--mode pipeline] [--model tiny|full|both]
         [--batch 8] [--episodes 4] [--repeats 2] [--data ../shared/data/mp100_mini]
"""
import argparse
import json
import os
import platform
import sys
import time

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The repo root first: this folder's data_pipeline.py would shadow the data_pipeline package.
sys.path.insert(0, _REPO)
sys.path.insert(1, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

import measure  # noqa: E402
from capenext_jax.models.capenext import CapeNext, CapeNextConfig, abstract_model  # noqa: E402
from capenext_jax.models.layers import init_rngs  # noqa: E402
from capenext_jax.runtime import tune_allocator  # noqa: E402
from capenext_jax.tools.bf16_fidelity import random_batch  # noqa: E402
MODELS = {'tiny': 'runlocal', 'full': 'backbone=swinv2_t'}


def eval_config(model: str, batch: int, episodes: int):
  """configs/mp100.py for `model` ('tiny': runlocal, 'full': the headline sizes), 1 shot,
  1 query per episode (mp100_mini test categories have 2 instances)."""
  from configs import mp100
  c = mp100.get_config(MODELS[model])
  c.eval_batch_size = batch
  c.data.shots, c.data.num_queries, c.data.test_episodes = 1, 1, episodes
  return c


def measure_pipeline(model: str, annotations: str, image_root: str, batch: int, episodes: int,
            repeats: int) -> list[dict]:
  """[compile pass, timed pass...] records of `Evaluator.predict` on the annotation file."""
  from capenext_jax.device import partition
  from capenext_jax.device.step import make_predict_step, matmul_precision
  from capenext_jax.evaluation.evaluator import Evaluator
  from capenext_jax.evaluation.pairs import EvalProtocol
  from capenext_jax.evaluation.predict_fn import predict_fn
  from capenext_jax.models.capenext import CapeNextConfig
  from capenext_jax.training import init, schedule
  from data_pipeline.splits import eval_split
  c = eval_config(model, batch, episodes)
  model_config = CapeNextConfig.from_dict(c.model.to_dict())
  size = model_config.image_size
  mesh = partition.make_mesh(c.mesh_shape)
  with jax.set_mesh(mesh), jax.default_matmul_precision(
      matmul_precision(c.precision, model_config.dtype)):
    t0 = time.perf_counter()
    tx = schedule.make_optimizer(c.optim, 1)
    graphdef, state, _ = init.init_state(c, tx, mesh, model_config=model_config)
    state = state.replace(opt_state=())   # eval needs no optimizer state
    data = eval_split(c, annotations, image_root, image_size=size)
    evaluator = Evaluator(predict_fn(make_predict_step(graphdef, size), graphdef, data.dataset,
                                     mesh), data, EvalProtocol.from_config(c, 'test'), mesh,
                          image_size=size)
    setup_s = time.perf_counter() - t0
    out = []
    for i in range(repeats + 1):
      t0 = time.perf_counter()
      pred = evaluator.predict(state)
      seconds = time.perf_counter() - t0
      out.append(dict(benchmark='eval_throughput', model=model,
                      image_size=size, run='compile' if i == 0 else 'timed',
                      pairs=len(pred), batch=batch, seconds=round(seconds, 3),
                      pairs_per_s=round(len(pred) / seconds, 2),
                      setup_s=round(setup_s, 1), device=str(jax.devices()[0].platform),
                      devices=jax.device_count(), host=platform.node()))
  return out


def measure_forward(model: str, dtype: str, batch_sizes: list[int], repeats: int) -> list[dict]:
  """Records of the jitted eval forward (see the module docstring) per batch size."""
  size = 64 if model == 'tiny' else None
  config = CapeNextConfig.variant('tiny' if model == 'tiny' else 'swinv2_t', image_size=size,
                                  dtype=dtype)

  def make():
    net = CapeNext(config, rngs=init_rngs(0))
    net.eval()
    return net

  # Random weights made under one jit (eagerly, each initializer op compiles apart: minutes on
  # a GPU).
  abstract = abstract_model(config)
  abstract.eval()
  graphdef = nnx.graphdef(abstract)
  state = jax.jit(lambda: nnx.state(make()))()

  @jax.jit
  def forward(state, batch):
    out = nnx.merge(graphdef, state)(
        batch['query_image'], batch['support_mask'], batch['adjacency'],
        keypoint_text=batch['keypoint_text'], category_text=batch['category_text'])
    return out['keypoints'][-1]

  precision = 'highest' if dtype == 'float32' else 'default'
  kind = jax.devices()[0].device_kind
  out = []
  with jax.default_matmul_precision(precision):
    for b in batch_sizes:
      record = dict(benchmark='eval_forward', model=model, image_size=config.image_size,
                    dtype=dtype, precision=precision, batch=b, device=kind,
                    platform=jax.devices()[0].platform, jax=jax.__version__)
      try:
        batch = {k: jnp.asarray(v) for k, v in random_batch(config, b, 0).items()
                 if k not in ('query_joints', 'query_weight')}
        t0 = time.perf_counter()
        compiled = forward.lower(state, batch).compile()
        compile_s = time.perf_counter() - t0
        jax.block_until_ready(compiled(state, batch))
        t0 = time.perf_counter()
        for _ in range(repeats):
          keypoints = compiled(state, batch)
        jax.block_until_ready(keypoints)
        seconds = (time.perf_counter() - t0) / repeats
      except Exception as e:  # noqa: BLE001 (out-of-memory is reported, anything else raised)
        if not measure.is_out_of_memory(e):
          raise
        out.append(dict(record, status='OOM'))
        continue
      flops = measure.compiled_flops(compiled)
      util = measure.mfu(flops, seconds, kind, dtype)
      out.append(dict(record, status='ok', pairs_per_s=round(b / seconds, 1),
                      batch_s=round(seconds, 5), compile_s=round(compile_s, 2),
                      gflop_per_pair=None if flops is None else round(flops / b / 1e9, 2),
                      mfu=None if util is None else round(util, 4),
                      device_peak_bytes=measure.device_peak_bytes(),
                      **measure.compiled_memory(compiled)))
  return out


def main():
  p = argparse.ArgumentParser()
  p.add_argument('--mode', choices=('pipeline', 'forward'), default='pipeline')
  p.add_argument('--dtype', default='float32,bfloat16', help='forward mode: compute dtypes')
  p.add_argument('--model', choices=('tiny', 'full', 'both'), default='both')
  p.add_argument('--batch', default='8', help='batch size (forward mode: comma-separated)')
  p.add_argument('--episodes', type=int, default=4, help='per category (4 test categories)')
  p.add_argument('--full_episodes', type=int, default=2, help='episodes for the full model')
  p.add_argument('--repeats', type=int, default=2)
  p.add_argument('--data', default=os.path.join(os.path.dirname(_REPO), 'shared', 'data',
                                                'mp100_mini'))
  args = p.parse_args()
  models = ('tiny', 'full') if args.model == 'both' else (args.model,)
  if args.mode == 'forward':
    for model in models:
      for dtype in args.dtype.split(','):
        for record in measure_forward(model, dtype, [int(b) for b in args.batch.split(',')],
                                      args.repeats):
          print(json.dumps(record), flush=True)
    return
  annotations = os.path.join(args.data, 'annotations', 'mini_test.json')
  for model in models:
    episodes = args.full_episodes if model == 'full' else args.episodes
    for record in measure_pipeline(model, annotations, os.path.join(args.data, 'images'),
                          int(args.batch), episodes, args.repeats):
      print(json.dumps(record), flush=True)


if __name__ == '__main__':
  tune_allocator()
  main()

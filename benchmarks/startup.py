"""Time what a run does before its first step: trace the model's construction, create the
sharded initial train state (`training.init.init_state`, which traces and compiles the init),
and trace the train step (no compile). Random weights, one device, no compilation cache.

These costs are paid by every train.py / eval.py start and every benchmark; they grew with
the model's size squared until models were built with `layers.init_rngs` and dropout drew
with `layers.next_key` (docs/DESIGN.md, module conventions).

usage: python benchmarks/startup.py [--backbone swinv2_t|resnet50|...] [--tiny]
Prints one JSON line. Imports only capenext_jax and jax/flax/optax/numpy/ml_collections.
"""
import argparse
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from capenext_jax import losses  # noqa: E402
from capenext_jax.models.capenext import CapeNext, CapeNextConfig  # noqa: E402
from capenext_jax.models.layers import init_rngs  # noqa: E402
from capenext_jax.tools.bf16_fidelity import random_batch  # noqa: E402
from capenext_jax.training import init, schedule  # noqa: E402
from capenext_jax.device import partition, state as state_lib, step as step_lib  # noqa: E402
from configs import mp100  # noqa: E402


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('--backbone', default='swinv2_t')
  parser.add_argument('--tiny', action='store_true', help='the CPU test size (script check)')
  args = parser.parse_args()
  run = mp100.get_config(f'backbone={args.backbone}' + (',runlocal' if args.tiny else ''))
  run.init.from_scratch = True   # random weights: nothing to read
  config = CapeNextConfig.from_dict(run.model.to_dict())
  tx = schedule.make_optimizer(run.optim, steps_per_epoch=1000)
  make = lambda: CapeNext(config, rngs=init_rngs(0))

  t0 = time.perf_counter()
  graphdef = partition.split_model(nnx.eval_shape(make))[0]
  build_trace_s = time.perf_counter() - t0

  mesh = partition.make_mesh({'data': 1, 'fsdp': 1}, jax.devices()[:1])
  t0 = time.perf_counter()
  with jax.set_mesh(mesh):
    _, state, _ = init.init_state(run, tx, mesh)
    jax.block_until_ready(state)
  init_state_s = time.perf_counter() - t0

  step = step_lib.make_train_step(
      graphdef, losses.batch_loss_fn(config.image_size, run.data.heatmap_size), tx)
  abstract = jax.eval_shape(lambda: state_lib.init_train_state(make(), tx,
                                                               jax.random.PRNGKey(0))[1])
  batch = {k: jnp.asarray(v) for k, v in random_batch(config, 2, 0).items()}
  t0 = time.perf_counter()
  step.trace(abstract, batch)
  step_trace_s = time.perf_counter() - t0

  print(json.dumps({
      'benchmark': 'startup', 'backbone': args.backbone, 'tiny': args.tiny,
      'image_size': config.image_size, 'build_trace_s': round(build_trace_s, 2),
      'init_state_s': round(init_state_s, 2), 'train_step_trace_s': round(step_trace_s, 2),
      'device': jax.devices()[0].device_kind, 'jax': jax.__version__}), flush=True)


if __name__ == '__main__':
  main()

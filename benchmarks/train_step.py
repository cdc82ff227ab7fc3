"""Time CapeNext training steps: forward + backward + Adam, state donated, on the default device.

Headline model (Swin V2-T 256 px, CLIP ViT-B/32 image tower frozen, fusion, CapeX head), 1-shot,
text from the frozen-text cache (random unit embeddings of the right shape: the cached text
costs nothing per step), random weights and inputs already on the device. Per batch size: the
step is compiled once (its FLOPs from XLA's cost analysis, its memory from the compiled
memory analysis), run `--warmup` times, then `--steps` times back to back with no host round
trip in between (one wait at the end). Prints one JSON line per batch size: samples/s, step
time, MFU (FLOPs / step time / the device's peak for the dtype, `measure.PEAK_FLOPS`), peak
memory (the device allocator's peak so far on GPU/TPU; batch sizes run in increasing order, so
it is this batch's), or status 'OOM'.

usage: python benchmarks/train_step.py [--batch 4,32] [--dtype float32|bfloat16]
         [--remat none|blocks|<jax.checkpoint_policies name>] [--backbone swinv2_t|vit_b16|...]
         [--attention auto|reference|fused|xla|cudnn] [--steps 5] [--tiny]
--tiny: the backbone's CPU test size at 64 px (a wiring check of the script, seconds on CPU).
Imports only capenext_jax and jax/flax/optax/numpy (runs on accelerator hosts without TF).
"""
import argparse
import json
import os
import platform
import sys
import time

import jax
import jax.numpy as jnp
from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import measure  # noqa: E402

from capenext_jax import losses  # noqa: E402
from capenext_jax.models import backbones  # noqa: E402
from capenext_jax.models.capenext import CapeNext, CapeNextConfig, abstract_model  # noqa: E402
from capenext_jax.models.layers import init_rngs  # noqa: E402
from capenext_jax.runtime import allocator, tune_allocator  # noqa: E402
from capenext_jax.tools.bf16_fidelity import random_batch  # noqa: E402
from capenext_jax.training import schedule  # noqa: E402
from capenext_jax.device import partition, state as state_lib, step as step_lib  # noqa: E402

HEATMAP = 64   # the official configs' targets are 64 px at every input size
TINY_SIZE = 64


def model_config(args) -> CapeNextConfig:
  backbone = backbones.test_size_of(args.backbone) if args.tiny else args.backbone
  return CapeNextConfig.variant(backbone, image_size=TINY_SIZE if args.tiny else None,
                                dtype=args.dtype, remat=args.remat, attention=args.attention)


def precision_of(args) -> str:
  """'auto': 'highest' for float32 (the parity baseline), 'default' for bfloat16."""
  if args.precision != 'auto':
    return args.precision
  return 'highest' if args.dtype == 'float32' else 'default'


def time_batch(train_step, state, batch_size: int, config: CapeNextConfig, args):
  """(record, state) of one batch size; the state comes back (donated and replaced)."""
  batch = {k: jnp.asarray(v) for k, v in random_batch(config, batch_size, 0).items()}
  t0 = time.perf_counter()
  compiled = train_step.lower(state, batch).compile()
  compile_s = time.perf_counter() - t0
  flops = measure.compiled_flops(compiled)
  step_s, state, metrics = measure.time_steps(compiled, state, batch, warmup=args.warmup,
                                              steps=args.steps)
  kind = jax.devices()[0].device_kind
  util = measure.mfu(flops, step_s, kind, args.dtype)
  record = {
      'status': 'ok', 'samples_per_s': round(batch_size / step_s, 2),
      'step_s': round(step_s, 5), 's_per_sample': round(step_s / batch_size, 5), 'mfu': None if util is None else round(util, 4),
      'gflop_per_sample': None if flops is None else round(flops / batch_size / 1e9, 2),
      'device_peak_bytes': measure.device_peak_bytes(), **measure.compiled_memory(compiled),
      'compile_s': round(compile_s, 2), 'loss_finite': bool(metrics['finite'])}
  return record, state


def new_state(config: CapeNextConfig, tx) -> tuple[nnx.GraphDef, state_lib.TrainState]:
  """(graphdef, train state) with random weights, created under one jit: built eagerly, each
  initializer op would compile on its own (~130 small programs: minutes on a GPU)."""
  graphdef = partition.split_model(abstract_model(config))[0]
  init = lambda: state_lib.init_train_state(CapeNext(config, rngs=init_rngs(0)), tx,
                                            jax.random.PRNGKey(0))[1]
  return graphdef, jax.jit(init)()


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('--batch', default='4', help='comma-separated batch sizes, increasing')
  parser.add_argument('--steps', type=int, default=5)
  parser.add_argument('--warmup', type=int, default=2)
  parser.add_argument('--backbone', default='swinv2_t')
  parser.add_argument('--dtype', default='float32', choices=('float32', 'bfloat16'))
  parser.add_argument('--remat', default='none')
  parser.add_argument('--attention', default='auto')
  parser.add_argument('--precision', default='auto', help="matmul precision; 'auto' by dtype")
  parser.add_argument('--tiny', action='store_true', help='the CPU test size (script check)')
  args = parser.parse_args()

  config = model_config(args)
  precision = precision_of(args)
  t0 = time.perf_counter()
  tx = schedule.make_optimizer(schedule.default_optim_config(), steps_per_epoch=1000)
  graphdef, state = new_state(config, tx)
  build_s = time.perf_counter() - t0
  train_step = step_lib.make_train_step(
      graphdef, losses.batch_loss_fn(config.image_size, HEATMAP), tx)
  common = {
      'benchmark': 'train_step', 'backbone': config.backbone.__class__.__name__,
      'preset': backbones.test_size_of(args.backbone) if args.tiny else args.backbone,
      'image_size': config.image_size, 'dtype': args.dtype, 'remat': args.remat,
      'attention': args.attention, 'precision': precision, 'shots': 1, 'text': 'cached',
      'steps_timed': args.steps, 'build_s': round(build_s, 2),
      'device': jax.devices()[0].device_kind, 'platform': jax.devices()[0].platform,
      'cpu_count': os.cpu_count(), 'machine': platform.machine(), 'jax': jax.__version__,
      'allocator': allocator()}
  with jax.default_matmul_precision(precision):
    for batch_size in (int(b) for b in args.batch.split(',')):
      try:
        record, state = time_batch(train_step, state, batch_size, config, args)
      except Exception as e:  # noqa: BLE001 (out-of-memory is reported, anything else raised)
        if not measure.is_out_of_memory(e):
          raise
        record = {'status': 'OOM'}
        # The donated state may be gone with the failed step: start the next size afresh.
        state = new_state(config, tx)[1]
      print(json.dumps({**common, 'batch': batch_size, **record}), flush=True)


if __name__ == '__main__':
  tune_allocator()
  main()

"""Time one full-size CapeNext training step: forward + backward + Adam.

Headline model (Swin V2-T 256 px, CLIP ViT-B/32 image tower frozen, fusion, CapeX head), fp32,
1-shot, text from the frozen-text cache (random embeddings of the right shape: the cached text
costs nothing per step), random weights and inputs. Prints one JSON line per measurement.

usage: python benchmarks/train_step.py [--batch 4] [--steps 5] [--backbone swinv2_t|vit_b16|...]
(--backbone: any `models/backbones.py` preset at its official input size.)
"""
import argparse
import json
import os
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from capenext_jax import losses
from capenext_jax.models.capenext import CapeNext, CapeNextConfig
from capenext_jax.models.head import adjacency_from_skeleton
from capenext_jax.training import schedule, state as state_lib, step as step_lib
from capenext_jax.runtime import allocator, tune_allocator


def random_batch(rng: np.random.Generator, b: int, e: int, size: int) -> dict:
  mask = np.zeros((b, 100), np.float32)
  mask[:, :17] = 1
  adjacency = adjacency_from_skeleton([[i, i + 1] for i in range(16)])
  kpt = rng.normal(size=(b, 100, e)).astype(np.float32)
  cat = rng.normal(size=(b, e)).astype(np.float32)
  return dict(query_image=rng.normal(size=(b, size, size, 3)).astype(np.float32),
              support_mask=mask, adjacency=np.broadcast_to(adjacency, (b, 100, 100)).copy(),
              keypoint_text=kpt / np.linalg.norm(kpt, axis=-1, keepdims=True),
              category_text=cat / np.linalg.norm(cat, axis=-1, keepdims=True),
              query_joints=rng.uniform(0, size, (b, 100, 2)).astype(np.float32),
              query_weight=mask.copy())


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('--batch', type=int, default=4)
  parser.add_argument('--steps', type=int, default=5)
  parser.add_argument('--backbone', default='swinv2_t')
  args = parser.parse_args()

  config = CapeNextConfig.variant(args.backbone)
  t0 = time.perf_counter()
  model = CapeNext(config, rngs=nnx.Rngs(0))
  tx = schedule.make_optimizer(schedule.default_optim_config(), steps_per_epoch=1000)
  graphdef, state = state_lib.init_train_state(model, tx, jax.random.PRNGKey(0))
  del model
  build_s = time.perf_counter() - t0

  # The official configs' targets are 64 px at every input size.
  train_step = step_lib.make_train_step(graphdef, losses.batch_loss_fn(config.image_size, 64), tx)
  batch = {k: jnp.asarray(v) for k, v in
           random_batch(np.random.default_rng(0), args.batch, config.clip.embed_dim,
                        config.image_size).items()}
  t0 = time.perf_counter()
  state, metrics = train_step(state, batch)
  jax.block_until_ready(metrics)
  compile_s = time.perf_counter() - t0

  times = []
  for _ in range(args.steps):
    t0 = time.perf_counter()
    state, metrics = train_step(state, batch)
    jax.block_until_ready((state, metrics))
    times.append(time.perf_counter() - t0)
  step_s = float(np.median(times))
  print(json.dumps({
      'benchmark': 'train_step', 'model': f'CapeNext ({args.backbone} {config.image_size}, CLIP B/32)',
      'batch': args.batch, 'shots': 1, 'dtype': 'float32', 'text': 'cached',
      'median_step_s': round(step_s, 4), 's_per_sample': round(step_s / args.batch, 4),
      'steps_timed': args.steps, 'first_step_incl_compile_s': round(compile_s, 2),
      'build_s': round(build_s, 2), 'loss_finite': bool(metrics['finite']),
      'device': jax.devices()[0].device_kind, 'cpu_count': os.cpu_count(),
      'machine': platform.machine(), 'jax': jax.__version__,
      'allocator': allocator()}))


if __name__ == '__main__':
  tune_allocator()
  main()

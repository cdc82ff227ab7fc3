"""Training-pipeline throughput (episodes/s) on this machine, one JSON line per measurement.

Paths: json + images (decode whole images) and TFDS records (decode pre-cut crops); warping in
tf.data ('host') or shipping crops + matrices for the accelerator ('device': the host part only).

    python benchmarks/data_pipeline.py [--root MP100_ROOT --ann annotations/x.json --image-dir images]

Without --root a synthetic MP-100-format dataset is generated in a temporary folder. Each line
also gives the rate per host core (`episodes_per_s_per_core`: the rate over the cores this
process may run on, as tf.data spreads over all of them) and the cores that rate needs to
feed `--target` samples/s (3,000: issue 23's H100 training goal).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..'))

from data_pipeline import pipeline as pl  # noqa: E402
from data_pipeline import synthetic  # noqa: E402
from data_pipeline import tfds_mp100 as tm  # noqa: E402


def measure(source, warp, batch, steps, warmup=3):
  cfg = pl.PipelineConfig(warp=warp, shots=1)
  it = pl.make_train_iterator(source, batch, cfg, process_index=0, process_count=1)
  for _ in range(warmup):
    next(it)
  t = time.perf_counter()
  for _ in range(steps):
    next(it)
  return steps * batch / (time.perf_counter() - t)


def measure_device_warp(source, batch, steps=10):
  """Episodes/s of the on-device half of 'device' warping: the jitted crop warp + normalise
  (and the heatmap targets) that the train step runs, here on jax's default device."""
  import jax
  from capenext_jax.image_ops import gaussian_heatmaps, warp_and_normalize
  cfg = pl.PipelineConfig(warp='device', shots=1)
  b = next(pl.make_train_iterator(source, batch, cfg, process_index=0, process_count=1))
  crops, affine = jax.device_put(b['query_crop']), jax.device_put(b['query_affine'])
  joints, weight = jax.device_put(b['query_joints']), jax.device_put(b['query_weight'])

  @jax.jit
  def device_half(crops, affine, joints, weight):
    return (warp_and_normalize(crops, affine, cfg.image_size),
            gaussian_heatmaps(joints, weight, cfg.heatmap_size))

  jax.block_until_ready(device_half(crops, affine, joints, weight))
  t = time.perf_counter()
  for _ in range(steps):
    jax.block_until_ready(device_half(crops, affine, joints, weight))
  return steps * batch / (time.perf_counter() - t), jax.devices()[0].device_kind


def host_cores() -> int:
  """The cores this process may run on (tf.data's parallelism uses all of them)."""
  return len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count()


def per_core(eps: float, target: float) -> dict:
  rate = eps / host_cores()
  return {'episodes_per_s_per_core': round(rate, 1),
          'cores_for_target': round(target / rate, 1), 'target_samples_per_s': target}


def main(argv=None):
  p = argparse.ArgumentParser()
  p.add_argument('--root')
  p.add_argument('--ann', default='annotations/synthetic_train.json')
  p.add_argument('--image-dir', default='images')
  p.add_argument('--batch', type=int, default=32)
  p.add_argument('--steps', type=int, default=40)
  p.add_argument('--image-size', type=int, default=400)
  p.add_argument('--target', type=float, default=3000.0, help='samples/s to feed')
  a = p.parse_args(argv)
  tmp = tempfile.mkdtemp(prefix='capenext_bench_')
  root = a.root
  if root is None:
    root = os.path.join(tmp, 'synthetic')
    synthetic.generate_synthetic(root, (20, 1, 1), 60, a.image_size, seed=0)
  cfg = tm.Mp100Config.for_root_layout('bench', {'train': a.ann}, image_dir=a.image_dir)
  builder = tm.build_records(root, os.path.join(tmp, 'tfds'), cfg)
  sources = {'json': pl.json_source(os.path.join(root, a.ann), os.path.join(root, a.image_dir)),
             'records': tm.load_records(builder, 'train')}
  for name, src in sources.items():
    for warp in ('host', 'device'):
      eps = measure(src, warp, a.batch, a.steps)
      print(json.dumps({'benchmark': 'data_pipeline_train', 'source': name, 'warp': warp,
                        'global_batch': a.batch, 'episodes_per_s': round(eps, 1),
                        **per_core(eps, a.target), 'host_cores': host_cores(),
                        'cpu_count': os.cpu_count(), 'dataset': 'synthetic' if a.root is None else root}),
            flush=True)
  eps, device = measure_device_warp(sources['records'], a.batch)
  print(json.dumps({'benchmark': 'device_warp_and_heatmaps', 'global_batch': a.batch,
                    'episodes_per_s': round(eps, 1), 'device': device,
                    'cpu_count': os.cpu_count()}), flush=True)


if __name__ == '__main__':
  main()

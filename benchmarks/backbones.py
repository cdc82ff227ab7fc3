"""The README's backbone table: for each of the paper's image backbones, the CapeNext built on it
(input size, the feature map the head reads, parameter counts) and, with --time, the CPU (or
whatever device jax has) seconds per training sample from `benchmarks/train_step.py`.

Shapes and counts come from the abstract model (nothing is computed); timings run train_step.py
once per backbone in its own process. Prints one JSON line per backbone, then the markdown table.

usage: python benchmarks/backbones.py [--time] [--batch 2] [--steps 2]
         [--backbones swinv2_t,resnet50,hrnet_w32,vit_b16,dinov2_s14]
"""
import argparse
import json
import os
import subprocess
import sys

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, _REPO)

import jax  # noqa: E402
import numpy as np  # noqa: E402

from capenext_jax.models.capenext import CapeNextConfig, abstract_model  # noqa: E402
from capenext_jax.device import partition  # noqa: E402

PAPER_BACKBONES = ('swinv2_t', 'resnet50', 'hrnet_w32', 'vit_b16', 'dinov2_s14')
# The public weights each one starts from (`config.init.backbone_path`; docs/MODEL.md).
PRETRAINED = {
    'swinv2_t': 'Microsoft swinv2_tiny_patch4_window16_256.pth (ImageNet-1k)',
    'swinv2_s': 'Microsoft swinv2_small_patch4_window16_256.pth (ImageNet-1k)',
    'swinv2_b': 'Microsoft swinv2_base_patch4_window16_256.pth (ImageNet-1k)',
    'resnet50': 'torchvision resnet50-0676ba61.pth (ImageNet-1k)',
    'hrnet_w32': 'open-mmlab hrnet_w32-36af842e.pth (ImageNet-1k)',
    'vit_b16': 'timm vit_base_patch16_224 (state dict or HF safetensors)',
    'dinov2_s14': 'facebookresearch dinov2_vits14 or HF facebook/dinov2-small',
}


def count(tree) -> int:
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))


def describe(name: str) -> dict:
  config = CapeNextConfig.variant(name)
  model = abstract_model(config)
  _, trainable, batch_stats, _ = partition.split_model(model)
  side = config.backbone.output_resolution
  return {'backbone': name, 'input_px': config.image_size,
          'feature_map': f'{side}x{side}x{config.backbone.num_features}',
          'backbone_params_M': round(count(trainable['backbone']) / 1e6, 2),
          'trainable_params_M': round(count(trainable) / 1e6, 2),
          'batch_norm_stats': count(batch_stats), 'pretrained': PRETRAINED.get(name, '-')}


def time_train_step(name: str, batch: int, steps: int) -> dict:
  script = os.path.join(_REPO, 'benchmarks', 'train_step.py')
  proc = subprocess.run([sys.executable, script, '--backbone', name, '--batch', str(batch),
                         '--steps', str(steps)], capture_output=True, text=True, check=False)
  if proc.returncode:
    raise RuntimeError(f'train_step.py --backbone {name} failed:\n{proc.stderr[-3000:]}')
  return json.loads(proc.stdout.strip().splitlines()[-1])


def main():
  p = argparse.ArgumentParser()
  p.add_argument('--backbones', default=','.join(PAPER_BACKBONES))
  p.add_argument('--time', action='store_true', help='also time a training step per backbone')
  p.add_argument('--batch', type=int, default=2)
  p.add_argument('--steps', type=int, default=2)
  args = p.parse_args()
  rows = []
  for name in args.backbones.split(','):
    row = describe(name)
    if args.time:
      timing = time_train_step(name, args.batch, args.steps)
      row.update(s_per_sample=timing['s_per_sample'], device=timing['device'],
                 batch=args.batch)
    print(json.dumps(row), flush=True)
    rows.append(row)
  timed = args.time and f' | {rows[0]["device"]} s/sample (train, batch {args.batch})' or ''
  print(f'\n| backbone | input | feature map | backbone params | trainable params | '
        f'pretrained from{timed} |')
  print('|' + ' --- |' * (6 + bool(timed)))
  for r in rows:
    cells = [r['backbone'], f'{r["input_px"]} px', r['feature_map'],
             f'{r["backbone_params_M"]} M', f'{r["trainable_params_M"]} M', r['pretrained']]
    if timed:
      cells.append(f'{r["s_per_sample"]:.2f}')
    print('| ' + ' | '.join(cells) + ' |')


if __name__ == '__main__':
  main()

"""Writes tests/fixtures/backbone_*.npz: ResNet and HRNet references run in PyTorch (CPU).

  python tests/make_backbone_fixtures.py [NAME ...]   (from the repo root; all cases by default)

References: torchvision's `ResNet` (Bottleneck; mmpose's ResNet, which the official CapeNext
builds, has its names and structure) cut after `layer3`, as the official head reads stage 3;
mmpose 0.29's `HRNet` plus the official model's `conv_block1/2` (Conv3x3/2 + BN + ReLU twice).
Needs `torchvision` (the match of torch 2.13: 0.28) and `mmpose==0.29.0` with `mmcv==1.7.0`,
all `pip install --no-deps`, plus `addict yapf platformdirs`; only their pure-Python modules are
imported (stubs stand in for the CUDA-built torchvision ops, for cv2 and for mmpose's package
`__init__`s, which import the whole library).

Both modes run in float64 (results stored as float32). In training mode the gradients are not a continuous function of round-off: a ReLU pre-activation within
float32 round-off of zero takes either side depending on the order of float32 sums, its
cotangent then flows or not, and batch-statistics BatchNorm spreads the change over its whole
channel. In float64 torch itself, scaling resnet_tiny's x by (1 + 1e-6 * noise) moves d_x by up
to 0.8% norm-wise (by 1e-7: 2e-7). Its stage-3 output has a pre-activation of -2.6e-6 (float64);
float32 torch and our eager float32 run keep it negative, our jitted float32 run (XLA fuses and
reorders the sums) gets +2.7e-6, and d_x differs by 0.49% with both implementations right.
Against a float64 reference our model run in float64 compares the implementations, not the
luck of round-off (d_x 4e-15 apart); the tests still check float32 training-mode features and
running statistics against it (float32 error ~3e-6 of the largest feature). Eval mode has the
same flips without BatchNorm spreading them: full-size ResNet-50's float32 torch d_x is 7.7e-4
(norm-wise) from its float64 one, beyond the tests' 1e-4, while our float32 run is within
1e-4 of float64 torch; so eval references are float64 as well, and the tests run eval mode in
float32 against them.

Each fixture holds, for random weights (`backbone_weights.random_weights`, rebuilt by the tests
from the stored names and shapes) and an input x [B, S, S, 3] NHWC:
  weights_json        {torch name: shape} of every weight the reference has
  config_json         our backbone config fields
  x, cotangent        the input and the cotangent of the feature map (loss = sum(out * cotangent))
  {mode}_out          feature map [B, h, w, C] NHWC, mode 'train' (batch statistics) or 'eval'
  {mode}_d_x          d loss / d x, NHWC
  {mode}_grad/<name>  d loss / d weight (torch layout) of every BatchNorm weight and bias, of
                      the first conv, and of the smallest other convs up to CONV_GRAD_BUDGET
                      entries (all of them would make the file as large as the network; the
                      BatchNorm grads and d_x already depend on every layer)
  train_stat/<name>   every running_mean / running_var after the one training-mode forward
"""
import json
import os
import sys
import types

import numpy as np
import torch
from torch import nn

sys.path.insert(0, os.path.dirname(__file__))
from backbone_weights import random_weights  # noqa: E402

OUT = os.path.join(os.path.dirname(__file__), 'fixtures')
CONV_GRAD_BUDGET = 20_000
SEED = 0


# ----------------------------------------------------------------------------- imports
def import_references():
  """torchvision's ResNet and mmpose's HRNet without their compiled / heavy parts."""
  for name in ('torchvision._meta_registrations', 'torchvision._autograd_registrations'):
    sys.modules[name] = types.ModuleType(name)

  class _AnyAttribute(types.ModuleType):   # cv2: mmcv reads constants at import time
    def __getattr__(self, name):
      if name.startswith('__'):
        raise AttributeError(name)
      return 0

  sys.modules.setdefault('cv2', _AnyAttribute('cv2'))
  import mmcv  # noqa: F401  (the real one)
  from mmcv.utils import Registry
  site = os.path.dirname(os.path.dirname(mmcv.__file__))
  for pkg in ('mmpose', 'mmpose.models', 'mmpose.models.backbones'):
    module = types.ModuleType(pkg)
    module.__path__ = [os.path.join(site, *pkg.split('.'))]
    sys.modules[pkg] = module
  utils = types.ModuleType('mmpose.utils')
  utils.get_root_logger = lambda *a, **k: None
  sys.modules['mmpose.utils'] = utils
  builder = types.ModuleType('mmpose.models.builder')
  builder.BACKBONES = Registry('backbone')
  sys.modules['mmpose.models.builder'] = builder
  from mmpose.models.backbones.hrnet import HRNet
  from torchvision.models.resnet import Bottleneck, ResNet
  return ResNet, Bottleneck, HRNet


# ----------------------------------------------------------------------------- references
class ResNetToStage3(nn.Module):
  """torchvision ResNet up to layer3 (what the official CapeNext head reads)."""

  def __init__(self, ResNet, Bottleneck, blocks):
    super().__init__()
    self.net = ResNet(Bottleneck, list(blocks) + [1])

  def forward(self, x):
    n = self.net
    x = n.maxpool(n.relu(n.bn1(n.conv1(x))))
    return n.layer3(n.layer2(n.layer1(x)))

  def weights(self):
    return {k: v for k, v in self.net.state_dict().items() if 'num_batches_tracked' not in k}

  def load(self, sd):
    self.net.load_state_dict({**self.net.state_dict(), **{k: torch.from_numpy(v)
                                                          for k, v in sd.items()}})


def conv_block(cin, cout):
  """The official capex.py `conv_block1/2`."""
  return nn.Sequential(nn.Conv2d(cin, cout, kernel_size=3, stride=2, padding=1, bias=False),
                       nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class HRNetWithBlocks(nn.Module):
  """mmpose HRNet, branch 0 of its output, then conv_block1, conv_block2 (capex.py
  extract_image_features). State dict names as in the official checkpoint: the HRNet's
  without a prefix, the blocks' as `conv_block1.*`."""

  def __init__(self, HRNet, extra, neck):
    super().__init__()
    self.hrnet = HRNet(extra, in_channels=3)
    c0 = extra['stage4']['num_channels'][0]
    self.conv_block1 = conv_block(c0, neck[0])
    self.conv_block2 = conv_block(neck[0], neck[1])

  def forward(self, x):
    return self.conv_block2(self.conv_block1(self.hrnet(x)[0]))

  def weights(self):
    sd = {k.removeprefix('hrnet.'): v for k, v in self.state_dict().items()}
    return {k: v for k, v in sd.items() if 'num_batches_tracked' not in k}

  def load(self, sd):
    own = self.state_dict()
    named = {k: torch.from_numpy(sd[k if k.startswith('conv_block') else
                                    k.removeprefix('hrnet.')])
             for k in own if 'num_batches_tracked' not in k}
    self.load_state_dict({**own, **named})


def hrnet_extra(stage1_blocks, stage1_channels, num_modules, num_blocks, channels):
  """mmpose `extra` (as the official get_hrnet_w32 writes it) from our config fields."""
  extra = dict(stage1=dict(num_modules=1, num_branches=1, block='BOTTLENECK',
                           num_blocks=(stage1_blocks,), num_channels=(stage1_channels,)))
  for k, modules in enumerate(num_modules):
    n = k + 2
    extra[f'stage{n}'] = dict(num_modules=modules, num_branches=n, block='BASIC',
                              num_blocks=(num_blocks,) * n, num_channels=tuple(channels[:n]))
  return extra


# ----------------------------------------------------------------------------- recording
def record(make_model, config: dict, path: str, batch: int, size: int):
  torch.manual_seed(SEED)
  shapes = {k: list(v.shape) for k, v in make_model().weights().items()}
  weights = random_weights(shapes, SEED)
  rng = np.random.default_rng(SEED)
  x = rng.standard_normal((batch, size, size, 3)).astype(np.float32)
  out = {'weights_json': json.dumps(shapes), 'config_json': json.dumps(config), 'x': x}
  for mode in ('train', 'eval'):
    dtype = torch.float64   # why: the module docstring
    model = make_model()
    model.load(weights)
    model.to(dtype).train(mode == 'train')
    xt = torch.from_numpy(x.transpose(0, 3, 1, 2).copy()).to(dtype).requires_grad_(True)
    y = model(xt)
    if 'cotangent' not in out:
      out['cotangent'] = rng.standard_normal(
          tuple(y.permute(0, 2, 3, 1).shape)).astype(np.float32)
    cotangent = torch.from_numpy(out['cotangent'].transpose(0, 3, 1, 2).copy()).to(dtype)
    (y * cotangent).sum().backward()
    out[f'{mode}_out'] = y.detach().permute(0, 2, 3, 1).float().numpy()
    out[f'{mode}_d_x'] = xt.grad.permute(0, 2, 3, 1).float().numpy()
    # ResNet's layer4 and fc are held but never run: no grad.
    named = {name.removeprefix('net.').removeprefix('hrnet.'): p
             for name, p in model.named_parameters() if p.grad is not None}
    convs = sorted((p.numel(), k) for k, p in named.items() if p.ndim == 4)
    keep, used = {'conv1.weight'}, 0
    for size, key in convs:
      if used + size > CONV_GRAD_BUDGET:
        break
      keep.add(key)
      used += size
    for key, param in named.items():
      if param.ndim != 4 or key in keep:
        out[f'{mode}_grad/{key}'] = param.grad.float().numpy()
    if mode == 'train':
      for key, value in model.weights().items():
        if key.endswith(('running_mean', 'running_var')):
          out[f'train_stat/{key}'] = value.float().numpy()
  np.savez_compressed(path, **out)
  print(f'{path}: {os.path.getsize(path) / 1e3:.0f} kB, out {out["train_out"].shape}, '
        f'{sum(k.startswith("train_grad/") for k in out)} weight grads')


def main(names):
  ResNet, Bottleneck, HRNet = import_references()
  os.makedirs(OUT, exist_ok=True)
  tiny_hrnet = dict(stage1_blocks=1, stage1_channels=8, num_modules=(1, 1, 2), num_blocks=1,
                    channels=(8, 16, 32, 64))
  w32 = dict(stage1_blocks=4, stage1_channels=64, num_modules=(1, 4, 3), num_blocks=4,
             channels=(32, 64, 128, 256))
  # name: (reference, our config, input size, batch). The tiny cases run in every test run; the
  # full-size ones (the official widths and depths, at 64 px and batch 2 to stay cheap) in the
  # slow tests.
  cases = {
      'resnet_tiny': (lambda: ResNetToStage3(ResNet, Bottleneck, (1, 2, 1)),
                      dict(stage_blocks=(1, 2, 1), base_width=64), 64, 4),
      'resnet50': (lambda: ResNetToStage3(ResNet, Bottleneck, (3, 4, 6)),
                   dict(stage_blocks=(3, 4, 6), base_width=64), 64, 2),
      'hrnet_tiny': (lambda: HRNetWithBlocks(HRNet, hrnet_extra(**tiny_hrnet), (16, 32)),
                     dict(tiny_hrnet, neck_channels=(16, 32)), 64, 4),
      'hrnet_w32': (lambda: HRNetWithBlocks(HRNet, hrnet_extra(**w32), (256, 512)),
                    dict(w32, neck_channels=(256, 512)), 64, 2),
  }
  unknown = set(names) - set(cases)
  if unknown:
    raise SystemExit(f'unknown cases {sorted(unknown)}; known: {sorted(cases)}')
  for name, (make, config, size, batch) in cases.items():
    if names and name not in names:
      continue
    record(make, dict(config, img_size=size), os.path.join(OUT, f'backbone_{name}.npz'),
           batch=batch, size=size)


if __name__ == '__main__':
  main(sys.argv[1:])

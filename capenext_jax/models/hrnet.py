"""HRNet image backbone, CapeNext's `hrnet_w32` (docs/MODEL.md §1.6).

The official model builds mmpose 0.x's `HRNet` with the W32 stage settings of its
`get_hrnet_w32` (stage 1: 4 Bottlenecks of width 64; stages 2-4: 1, 4, 3 modules of 4
BasicBlocks per branch, branch widths 32, 64, 128, 256; the last module fuses into the
highest-resolution branch only), takes that branch (32 channels, stride 4) and adds two
Conv3x3/stride-2 + BatchNorm + ReLU blocks of its own (`conv_block1`, `conv_block2`:
32 -> 256 -> 512), giving 512 channels at stride 16.

`HRNetBackbone` = `hrnet` (the mmpose HRNet, what the ImageNet release fills) + the two
blocks. Param tree, mirroring mmpose's names (torch `Sequential` / `ModuleList` entries are
list indices; `None` entries hold nothing):
  hrnet.{conv1, bn1, conv2, bn2, layer1[b] (Bottleneck), transition{k}[i],
         stage{k}[m].{branches[i][b] (BasicBlock), fuse_layers[i][j]}}
  conv_block1[0] (conv), conv_block1[1] (BatchNorm), same for conv_block2
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from capenext_jax.models import layers
from capenext_jax.models.resnet import Bottleneck, EXPANSION, apply_conv_bn, conv_bn

STEM = 64   # mmpose's HRNet stem width (fixed there)


def _mmpose_normal(key, shape, dtype=jnp.float32):
  """mmpose HRNet `init_weights()` without a checkpoint: conv weights normal(0, 0.001)."""
  return 0.001 * jax.random.normal(key, shape, dtype)


@dataclasses.dataclass(frozen=True)
class HRNetConfig:
  """Sizes; the defaults are the official W32 at 256 px."""
  img_size: int = 256
  stage1_blocks: int = 4                       # Bottlenecks of stage 1
  stage1_channels: int = 64                    # their width (outputs x4)
  num_modules: tuple[int, ...] = (1, 4, 3)     # HRModules of stages 2, 3, 4
  num_blocks: int = 4                          # BasicBlocks per branch in every module
  channels: tuple[int, ...] = (32, 64, 128, 256)  # branch widths (stage k has k branches)
  neck_channels: tuple[int, int] = (256, 512)  # conv_block1, conv_block2 outputs

  def __post_init__(self):
    if len(self.channels) != len(self.num_modules) + 1:
      raise ValueError(f'channels {self.channels} needs one width per branch of the last '
                       f'stage ({len(self.num_modules) + 1})')
    if len(self.neck_channels) != 2:
      raise ValueError(f'neck_channels {self.neck_channels}: two widths (conv_block1, 2)')
    if self.img_size % self.size_multiple:
      raise ValueError(f'img_size {self.img_size} is not a multiple of {self.size_multiple} '
                       f'(the stride of the lowest-resolution branch and of the output)')

  @property
  def size_multiple(self) -> int:
    # The lowest-resolution branch is at stride 4 * 2**(branches - 1), the output at 16.
    return max(16, 4 * 2 ** len(self.num_modules))

  @property
  def num_features(self) -> int:
    return self.neck_channels[1]

  @property
  def output_resolution(self) -> int:
    return self.img_size // 16


class BasicBlock(nnx.Module):
  """3x3 -> 3x3 with an identity shortcut (HRNet branches never change shape)."""

  def __init__(self, channels: int, *, rngs: nnx.Rngs):
    conv = lambda: layers.conv2d(channels, channels, 3, kernel_init=_mmpose_normal, rngs=rngs)
    self.conv1, self.bn1 = conv(), layers.BatchNorm(channels)
    self.conv2, self.bn2 = conv(), layers.BatchNorm(channels)

  def __call__(self, x: jax.Array) -> jax.Array:
    y = jax.nn.relu(self.bn1(self.conv1(x)))
    return jax.nn.relu(self.bn2(self.conv2(y)) + x)


def _upsample_nearest(x: jax.Array, factor: int) -> jax.Array:
  """`nn.Upsample(scale_factor=factor, mode='nearest')` for an integer factor."""
  return jnp.repeat(jnp.repeat(x, factor, axis=1), factor, axis=2)


class HRModule(nnx.Module):
  """Branches of BasicBlocks, then every output branch i sums all branches brought to its
  resolution and width (j > i: 1x1 conv + BN + nearest upsample; j < i: i - j strided 3x3
  conv + BN, ReLU between them) and applies ReLU."""

  def __init__(self, channels: tuple[int, ...], num_blocks: int, num_outputs: int, *,
               rngs: nnx.Rngs):
    self.branches = nnx.List([nnx.List([BasicBlock(c, rngs=rngs) for _ in range(num_blocks)])
                              for c in channels])
    cb = lambda i, o, k, s: conv_bn(i, o, k, stride=s, kernel_init=_mmpose_normal, rngs=rngs)
    fuse = []
    for i in range(num_outputs):
      row = []
      for j, cj in enumerate(channels):
        if j > i:
          row.append(cb(cj, channels[i], 1, 1))
        elif j == i:
          row.append(None)
        else:
          row.append(nnx.List([cb(cj, channels[i] if k == i - j - 1 else cj, 3, 2)
                               for k in range(i - j)]))
      fuse.append(nnx.List(row))
    self.fuse_layers = nnx.List(fuse)
    self.remat = layers.REMAT_NONE   # CapeNextConfig.remat (per residual block), set by CapeNext

  def __call__(self, xs: list[jax.Array]) -> list[jax.Array]:
    xs = [_run(branch, x, self.remat) for branch, x in zip(self.branches, xs)]
    out = []
    for i, row in enumerate(self.fuse_layers):
      y = xs[i]
      for j, layer in enumerate(row):
        if j > i:
          y = y + _upsample_nearest(apply_conv_bn(layer, xs[j]), 2 ** (j - i))
        elif j < i:
          z = xs[j]
          for k, step in enumerate(layer):
            z = apply_conv_bn(step, z, relu=k < len(layer) - 1)
          y = y + z
      out.append(jax.nn.relu(y))
    return out


def _run(blocks, x, remat: str):
  for block in blocks:
    x = layers.run_block(block, x, remat=remat)
  return x


class HRNet(nnx.Module):
  """mmpose's HRNet: `model(x)` x [B, S, S, 3] -> [B, S/4, S/4, channels[0]], the
  highest-resolution branch of the last stage (its only output)."""

  def __init__(self, config: HRNetConfig, *, rngs: nnx.Rngs):
    self.config = config
    conv = lambda i, o: layers.conv2d(i, o, 3, stride=2, kernel_init=_mmpose_normal, rngs=rngs)
    self.conv1, self.bn1 = conv(3, STEM), layers.BatchNorm(STEM)
    self.conv2, self.bn2 = conv(STEM, STEM), layers.BatchNorm(STEM)
    width = config.stage1_channels
    self.layer1 = nnx.List([
        Bottleneck(STEM if b == 0 else width * EXPANSION, width, 1, kernel_init=_mmpose_normal,
                   rngs=rngs) for b in range(config.stage1_blocks)])
    previous = (width * EXPANSION,)
    n_stages = len(config.num_modules)
    for k, modules in enumerate(config.num_modules):
      current = config.channels[:k + 2]
      setattr(self, f'transition{k + 1}', self._transition(previous, current, rngs))
      last_stage = k == n_stages - 1
      setattr(self, f'stage{k + 2}', nnx.List([
          HRModule(current, config.num_blocks,
                   1 if (last_stage and m == modules - 1) else len(current), rngs=rngs)
          for m in range(modules)]))
      previous = current
    self.remat = layers.REMAT_NONE   # CapeNextConfig.remat (per residual block), set by CapeNext

  @staticmethod
  def _transition(previous: tuple[int, ...], current: tuple[int, ...], rngs) -> nnx.List:
    """Per new-stage branch: None (same width), conv3x3 + BN + ReLU (width change), or for a
    new branch strided conv3x3 + BN + ReLU steps from the previous lowest-resolution branch."""
    cb = lambda i, o, s: conv_bn(i, o, 3, stride=s, kernel_init=_mmpose_normal, rngs=rngs)
    out = []
    for i, c in enumerate(current):
      if i < len(previous):
        out.append(None if c == previous[i] else cb(previous[i], c, 1))
      else:
        n = i + 1 - len(previous)
        out.append(nnx.List([cb(previous[-1], c if step == n - 1 else previous[-1], 2)
                             for step in range(n)]))
    return nnx.List(out)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = jax.nn.relu(self.bn1(self.conv1(x)))
    x = jax.nn.relu(self.bn2(self.conv2(x)))
    ys = [_run(self.layer1, x, self.remat)]
    for k in range(len(self.config.num_modules)):
      transition = getattr(self, f'transition{k + 1}')
      xs = []
      for i, t in enumerate(transition):
        if t is None:
          xs.append(ys[i])
        elif i < len(ys):  # mmpose feeds every non-None transition the last branch
          xs.append(apply_conv_bn(t, ys[-1], relu=True))
        else:
          z = ys[-1]
          for step in t:
            z = apply_conv_bn(step, z, relu=True)
          xs.append(z)
      for module in getattr(self, f'stage{k + 2}'):
        xs = module(xs)
      ys = xs
    return ys[0]


class HRNetBackbone(nnx.Module):
  """HRNet + CapeNext's two Conv3x3/2 + BN + ReLU blocks: x [B, S, S, 3] ->
  [B, S/16, S/16, neck_channels[1]] ([B, 16, 16, 512] for W32 at 256 px)."""

  def __init__(self, config: HRNetConfig, *, rngs: nnx.Rngs):
    self.config = config
    self.hrnet = HRNet(config, rngs=rngs)
    c1, c2 = config.neck_channels
    # Part of the CapeNext model, built with torch's default Conv2d init.
    self.conv_block1 = conv_bn(config.channels[0], c1, 3, stride=2, kernel_init=None, rngs=rngs)
    self.conv_block2 = conv_bn(c1, c2, 3, stride=2, kernel_init=None, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    size = self.config.img_size
    if x.ndim != 4 or x.shape[1:] != (size, size, 3):
      raise ValueError(f'expected images [B, {size}, {size}, 3] NHWC, got {x.shape}')
    x = apply_conv_bn(self.conv_block1, self.hrnet(x), relu=True)
    return apply_conv_bn(self.conv_block2, x, relu=True)

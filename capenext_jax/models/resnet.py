"""ResNet (v1.5: stride in the 3x3 conv) image backbone, CapeNext's `resnet50` (docs/MODEL.md §1.6).

The official model builds mmpose's `ResNet(depth=50, out_indices=(2, 3))`, whose names and
structure are torchvision's, and the head reads the stage-3 output (1024 channels, stride 16).
Stage 4 is computed there and discarded, so it is not built here: `stage_blocks` lists the
stages that are (three for ResNet-50), and the last is the output. (Its BatchNorm statistics,
updated by the official training, never reach any output.)

Param tree, mirroring torchvision's names (`layer{s+1}` is our `layers[s]`):
  conv1 (7x7/2), bn1
  layers[s][b].{conv1 (1x1), bn1, conv2 (3x3, stride), bn2, conv3 (1x1), bn3,
                downsample[0] (1x1 conv, stride), downsample[1] (BatchNorm)}   (first block)
BatchNorm modules hold `scale`, `bias` (params) and `mean`, `var` (`nnx.BatchStat`).
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from capenext_jax.models import layers

EXPANSION = 4   # Bottleneck output channels / its width
STEM = 64       # stem width (and the input width of stage 1)


@dataclasses.dataclass(frozen=True)
class ResNetConfig:
  """Sizes; the defaults are ResNet-50 up to stage 3 at 256 px."""
  img_size: int = 256
  stage_blocks: tuple[int, ...] = (3, 4, 6)   # Bottlenecks per built stage (ResNet-50: 3,4,6,3)
  base_width: int = 64                        # stage s width: base_width * 2**s

  def __post_init__(self):
    if not self.stage_blocks or min(self.stage_blocks) < 1:
      raise ValueError(f'stage_blocks {self.stage_blocks}: every stage needs a block')
    if self.img_size % self.stride:
      raise ValueError(f'img_size {self.img_size} is not a multiple of the stride {self.stride}')

  def stage_width(self, s: int) -> int:
    return self.base_width * 2 ** s

  @property
  def stride(self) -> int:
    return 4 * 2 ** (len(self.stage_blocks) - 1)

  @property
  def num_features(self) -> int:
    return self.stage_width(len(self.stage_blocks) - 1) * EXPANSION

  @property
  def output_resolution(self) -> int:
    return self.img_size // self.stride


def conv_bn(in_channels: int, out_channels: int, kernel_size: int, *, rngs: nnx.Rngs,
            stride: int = 1, kernel_init=layers.kaiming_normal_fan_out) -> nnx.List:
  """torch `Sequential(Conv2d(bias=False), BatchNorm2d)` as a list (names `0`, `1`)."""
  return nnx.List([layers.conv2d(in_channels, out_channels, kernel_size, stride=stride,
                                 kernel_init=kernel_init, rngs=rngs),
                   layers.BatchNorm(out_channels)])


def apply_conv_bn(seq: nnx.List, x: jax.Array, relu: bool = False) -> jax.Array:
  conv, bn = seq
  y = bn(conv(x))
  return jax.nn.relu(y) if relu else y


class Bottleneck(nnx.Module):
  """1x1 -> 3x3 (stride) -> 1x1 (x4 channels), projection shortcut when the shape changes."""

  def __init__(self, in_channels: int, width: int, stride: int, *, rngs: nnx.Rngs,
               kernel_init=layers.kaiming_normal_fan_out):
    out = width * EXPANSION
    conv = lambda i, o, k, s=1: layers.conv2d(i, o, k, stride=s, kernel_init=kernel_init,
                                              rngs=rngs)
    self.conv1, self.bn1 = conv(in_channels, width, 1), layers.BatchNorm(width)
    self.conv2, self.bn2 = conv(width, width, 3, stride), layers.BatchNorm(width)
    self.conv3, self.bn3 = conv(width, out, 1), layers.BatchNorm(out)
    self.downsample = (conv_bn(in_channels, out, 1, stride=stride, kernel_init=kernel_init,
                               rngs=rngs)
                       if stride != 1 or in_channels != out else None)

  def __call__(self, x: jax.Array) -> jax.Array:
    y = jax.nn.relu(self.bn1(self.conv1(x)))
    y = jax.nn.relu(self.bn2(self.conv2(y)))
    y = self.bn3(self.conv3(y))
    shortcut = x if self.downsample is None else apply_conv_bn(self.downsample, x)
    return jax.nn.relu(y + shortcut)


def max_pool_3x3_s2(x: jax.Array) -> jax.Array:
  """`nn.MaxPool2d(3, stride=2, padding=1)` (padding never wins: it is -inf)."""
  return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 3, 3, 1), (1, 2, 2, 1),
                               ((0, 0), (1, 1), (1, 1), (0, 0)))


class ResNet(nnx.Module):
  """`model(x)`: x [B, S, S, 3] NHWC -> the last built stage's output [B, S/16, S/16, 1024]
  for ResNet-50 (`forward_with_intermediates` also returns every stage)."""

  def __init__(self, config: ResNetConfig, *, rngs: nnx.Rngs):
    self.config = config
    self.conv1 = layers.conv2d(3, STEM, 7, stride=2, kernel_init=layers.kaiming_normal_fan_out,
                               rngs=rngs)
    self.bn1 = layers.BatchNorm(STEM)
    stages, in_channels = [], STEM
    for s, blocks in enumerate(config.stage_blocks):
      width = config.stage_width(s)
      stages.append(nnx.List([
          Bottleneck(in_channels if b == 0 else width * EXPANSION, width,
                     2 if (b == 0 and s > 0) else 1, rngs=rngs)
          for b in range(blocks)]))
      in_channels = width * EXPANSION
    self.layers = nnx.List(stages)
    self.remat = layers.REMAT_NONE   # CapeNextConfig.remat (per Bottleneck), set by CapeNext

  def forward_with_intermediates(self, x: jax.Array) -> dict:
    """x: [B, S, S, 3] -> {'stages': [B, S/2^(s+2), same, width_s * 4] per stage, 'out': the
    last of them}."""
    size = self.config.img_size
    if x.ndim != 4 or x.shape[1:] != (size, size, 3):
      raise ValueError(f'expected images [B, {size}, {size}, 3] NHWC, got {x.shape}')
    x = max_pool_3x3_s2(jax.nn.relu(self.bn1(self.conv1(x))))
    stages = []
    for stage in self.layers:
      for block in stage:
        x = layers.run_block(block, x, remat=self.remat)
      stages.append(x)
    return {'stages': stages, 'out': x}

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.forward_with_intermediates(x)['out']

"""The official CapeNext learning-rate schedule and optimizer (docs/MODEL.md §4).

mmcv's `step` policy by epoch with a linear warmup by global iteration `i` (0-based, the
number of updates already applied, which is optax's `count`):

  lr(i) = lr * gamma ** #{m in milestones : m <= i // steps_per_epoch} * w(i)
  w(i)  = 1 - (1 - i / warmup_steps) * (1 - warmup_ratio)   if i < warmup_steps, else 1

With the defaults the rate starts at 1e-8, reaches 1e-5 at i = 1000, and drops to 1e-6 / 1e-7
at epochs 160 / 180. Adam has no weight decay and there is no gradient clipping.

Other batch sizes (`for_batch_size`): the recipe is global batch `base_batch_size` = 32 at
lr 1e-5. `lr_scaling` 'none' keeps it as it is in steps, whatever the batch; 'linear'
multiplies lr by B / 32 (Goyal et al. 2017, for SGD) and 'sqrt' by sqrt(B / 32) (the rule
for Adam: Malladi et al. 2022, "On the SDEs and Scaling Rules for Adaptive Gradient
Algorithms"; the one to use for a pod-sized batch). With either, the warmup keeps its length
in samples (1000 x 32, i.e. the same epochs, as Goyal et al. keep 5 epochs): warmup_steps
becomes ceil(1000 * 32 / B). The milestones are epochs already, so they need no scaling.
"""
from __future__ import annotations

import math

import jax.numpy as jnp
import ml_collections
import optax


def default_optim_config() -> ml_collections.ConfigDict:
  """The official values; `config.optim` of a training config has these fields."""
  return ml_collections.ConfigDict(dict(
      lr=1e-5, b1=0.9, b2=0.999, eps=1e-8,
      warmup_steps=1000, warmup_ratio=1e-3,
      milestones=(160, 180), gamma=0.1,
      lr_scaling='none', base_batch_size=32))


LR_SCALING = {'none': lambda ratio: 1.0, 'linear': lambda ratio: ratio, 'sqrt': math.sqrt}


def for_batch_size(config: ml_collections.ConfigDict, batch_size: int
                   ) -> ml_collections.ConfigDict:
  """`config` (as `default_optim_config()`) for global batch `batch_size`: lr and warmup_steps
  scaled by `config.lr_scaling` (module docstring); a copy, `config` is left as it is."""
  rule = config.get('lr_scaling', 'none')
  if rule not in LR_SCALING:
    raise ValueError(f'optim.lr_scaling={rule!r}: expected one of {sorted(LR_SCALING)}')
  out = ml_collections.ConfigDict(config.to_dict())
  if rule == 'none':
    return out
  ratio = batch_size / config.base_batch_size
  out.lr = config.lr * LR_SCALING[rule](ratio)
  out.warmup_steps = math.ceil(config.warmup_steps / ratio)
  return out


def make_schedule(config: ml_collections.ConfigDict, steps_per_epoch: int) -> optax.Schedule:
  """`step (int scalar) -> lr (float32 scalar)`, jittable; `config` as `default_optim_config()`."""
  if steps_per_epoch < 1:
    raise ValueError(f'steps_per_epoch must be >= 1, got {steps_per_epoch}')
  milestones = jnp.asarray(sorted(config.milestones), jnp.int32)
  # One float32 constant per decay level, each rounded once from float64, rather than
  # multiplying float32 gammas together on device.
  levels = jnp.asarray([config.lr * config.gamma ** k for k in range(len(milestones) + 1)],
                       jnp.float32)
  warmup_steps, ratio = config.warmup_steps, config.warmup_ratio

  def schedule(step):
    step = jnp.asarray(step, jnp.int32)
    level = levels[jnp.sum(step // steps_per_epoch >= milestones)]
    # ratio + (1 - ratio) * i / W equals the mmcv form 1 - (1 - i/W)(1 - ratio) but has no
    # cancellation near i = 0, so float32 stays within an ulp or two of the float64 value.
    frac = step.astype(jnp.float32) / max(warmup_steps, 1)
    warm = jnp.where(step < warmup_steps, ratio + (1.0 - ratio) * frac, 1.0)
    return level * warm.astype(jnp.float32)

  return schedule


def make_optimizer(config: ml_collections.ConfigDict,
                   steps_per_epoch: int) -> optax.GradientTransformation:
  """Adam (eps outside the sqrt, as torch) driven by `make_schedule`."""
  return optax.adam(make_schedule(config, steps_per_epoch), b1=config.b1, b2=config.b2,
                    eps=config.eps)

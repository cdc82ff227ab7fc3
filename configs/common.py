"""Pieces shared by the configs: argument parsing and the model / data / run sections.

`get_config(arg)` takes a comma-separated `key=value` string (big_vision style), e.g.
`configs/mp100.py:split=2,shots=5,backbone=swinv2_s`. Every knob of a run lives in the
returned ConfigDict; train.py / eval.py only read it.
"""
from __future__ import annotations

import ml_collections

from capenext_jax.models.capenext import CapeNextConfig
from capenext_jax.training.schedule import default_optim_config

def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
  """'a=1,b=x,flag' -> ConfigDict over `defaults`, values cast to the default's type.

  A bare key sets a bool default to True. Unknown keys raise ValueError naming them.
  """
  out = ml_collections.ConfigDict(defaults)
  for item in filter(None, (arg or '').split(',')):
    key, _, value = item.partition('=')
    if key not in defaults:
      raise ValueError(f'config arg {key!r}: expected one of {sorted(defaults)}')
    kind = type(defaults[key])
    if kind is bool:
      out[key] = value.lower() in ('', '1', 'true', 'yes')
    else:
      out[key] = kind(value)
  return out


def model_config(backbone: str = 'swinv2_t', image_size: int | None = None, *,
                 capex: bool = False, fusion: str = '', **compute) -> ml_collections.ConfigDict:
  """`config.model`: `CapeNextConfig.variant(...).to_dict()` (the model reads it back with
  `CapeNextConfig.from_dict`; the widths where the parts meet are derived there). image_size:
  default the backbone's official input size. capex: no fusion module (plain CapeX). fusion:
  an official fusion class for the ablations (models/fusion.py MODULES; default the paper's
  SimpleMultiModalModule). compute: `dtype` ('float32' | 'bfloat16'), `remat` ('none' |
  'blocks' | a jax.checkpoint_policies name), `attention` (CapeNextConfig)."""
  if capex and fusion:
    raise ValueError(f'capex has no fusion module: drop fusion={fusion} or capex')
  c = ml_collections.ConfigDict(
      CapeNextConfig.variant(backbone, image_size=image_size, fusion=not capex,
                             **compute).to_dict())
  if fusion:
    c.fusion.module = fusion
  return c


def base_config() -> ml_collections.ConfigDict:
  """Run settings with the official recipe (docs/MODEL.md §4) and single-host defaults."""
  c = ml_collections.ConfigDict()
  c.seed = 1
  # A restart may change only run length, logging, evaluation and layout fields
  # (capenext_jax/training/workdir.py); True continues a workdir with any other change.
  c.allow_config_change = False
  # Pretrained weights, as the official recipe starts (ImageNet Swin V2, OpenAI CLIP). Empty
  # paths are refused unless from_scratch=True (a random backbone and CLIP: tests, toy runs).
  c.init = dict(backbone_path='', clip_path='', from_scratch=False)

  c.data = ml_collections.ConfigDict(dict(
      root='', image_root='', train_ann='', val_ann='', test_ann='',
      synthetic=ml_collections.ConfigDict(dict(enabled=False, categories=(12, 4, 4),
                                               instances=30, image_size=128)),
      shots=1,
      warp='host',            # 'host': tf.data warps; 'device': the step warps uint8 crops
      augment=True,
      val_episodes=100, test_episodes=200, num_queries=15,
      heatmap_size=0,         # MSRA target side; 0: a quarter of the input side
      on_bad_image='error',
      mask_outside_bbox=False,  # the official TopDownMaskImage (configs/clip_mask)
      # How the annotation files number skeleton keypoints: 0, 1 (COCO), or None: detected
      # (mp100/annotations.py skeleton_base; docs/CUSTOM_DATA.md).
      skeleton_base=ml_collections.config_dict.placeholder(int),
  ))

  c.batch_size = 32              # global; the official runs use 32 on one GPU
  c.eval_batch_size = 32
  c.num_epochs = 200
  c.total_steps = 0              # > 0 overrides num_epochs (short runs, tests)
  # optim.lr_scaling: 'none' keeps the recipe (lr 1e-5 at batch 32) for any batch_size;
  # 'sqrt' (Adam's rule) / 'linear' scale lr by (batch_size / optim.base_batch_size) ** 1/2 or 1
  # and keep the warmup's length in samples (capenext_jax/training/schedule.py).
  c.optim = default_optim_config()

  # Device mesh ('data', 'fsdp'); -1 takes the remaining devices. Sharding rules: (regex over
  # the '/'-joined param path, spec) with spec 'fsdp' (largest divisible dim) or a tuple of
  # axis names / None per dim; () replicates. First match wins, implicit final rule 'fsdp'.
  c.mesh_shape = dict(data=-1, fsdp=1)
  c.sharding_rules = (('clip/.*', ()),)     # frozen CLIP replicated: only read, never updated
  c.fsdp_min_bytes = 4 * 2**20  # 'fsdp' replicates tensors smaller than this (big_vision: 4 MiB)
  # jax_default_matmul_precision: 'highest' | 'high' | 'default', or 'auto': 'highest' for a
  # float32 model (the parity mode; CPU runs and fp32 baselines), 'default' (native) for
  # model.dtype=bfloat16, the setting for GPUs and TPUs (device/step.py matmul_precision).
  c.precision = 'auto'

  c.log_every_steps = 50
  c.validate = True              # periodic val PCK@0.2 (data.val_ann); best checkpoint by it
  c.eval_every_steps = 0         # 0: every `eval_every_epochs` epochs
  c.eval_every_epochs = 25       # official: validation every 25 epochs
  c.tensorboard_overlays = 4     # val overlays (one per category) written at each validation
  c.checkpoint_every_steps = 0   # 0: every `checkpoint_every_epochs` epochs
  c.checkpoint_every_epochs = 20
  c.keep_checkpoints = 3         # plus the best val PCK
  c.async_checkpoints = True
  c.test_at_start = False        # test-split PCK of the untrained model (step 0)
  c.test_at_end = False
  return c

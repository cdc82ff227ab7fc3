"""CapeNext on MP-100 (the headline run and its variants).

  train.py --config configs/mp100.py:split=1,shots=1 --workdir runs/split1
Args: split=1..5, shots=1|5,
backbone=swinv2_t|swinv2_s|swinv2_b|resnet50|hrnet_w32|... (`models/backbones.py` PRESETS,
including the CPU test sizes tiny|resnet_tiny|hrnet_tiny|...; the input size is the backbone's
official one, e.g. 224 for vit_b16), capex (no fusion module: plain CapeX),
fusion=<official fusion class> (the ablations, models/fusion.py MODULES, e.g.
SimpleMultiModalDoubleEncoder), mask (zero the image outside the instance box, the official
configs/clip_mask), dtype=float32|bfloat16 (model compute dtype: bfloat16 with precision
'auto' is the GPU / TPU setting; float32 'highest' the parity mode), runlocal (a few steps of the backbone's test size at 64 px on CPU, to check
the wiring), root=data/mp100 (holds annotations/mp100_split{n}_{train,val,test}.json and images/),
pipeline=auto|json|records (the training input: 'json' decodes whole images and warps them on
the host; 'records' reads TFDS records of pre-cut crops, built once under {root}/tfds, and
warps them in the step, `data.warp='device'`: about 10x more episodes per host core, README
"Data"; 'auto', the default, is 'records' for dtype=bfloat16, the GPU / TPU setting, unless
mask, and 'json' otherwise).
Pretrained weights (docs/MODEL.md §4) are required, as the official recipe starts from them:
init.backbone_path (the backbone's public release in its own layout, see docs/DESIGN.md
"Backbones") and init.clip_path, e.g.
  --config.init.backbone_path=swinv2_tiny_patch4_window16_256.pth --config.init.clip_path=clip-vit-base-patch32/model.safetensors
(--config.init.from_scratch=True trains from random weights instead.)
"""
from __future__ import annotations

from capenext_jax.models import backbones
from configs import common


def get_config(arg: str | None = None):
  a = common.parse_arg(arg, split=1, shots=1, backbone='swinv2_t', capex=False, fusion='',
                       mask=False, runlocal=False, root='data/mp100', dtype='float32',
                       pipeline='auto')
  if a.split not in range(1, 6) or a.shots not in (1, 5):
    raise ValueError(f'split must be 1..5 and shots 1 or 5, got {a.split}, {a.shots}')
  if a.pipeline not in ('auto', 'json', 'records'):
    raise ValueError(f"pipeline must be auto, json or records, got {a.pipeline!r}")
  c = common.base_config()
  c.data.root = a.root
  c.data.image_root = f'{a.root}/images'
  for part in ('train', 'val', 'test'):
    c.data[f'{part}_ann'] = f'{a.root}/annotations/mp100_split{a.split}_{part}.json'
  c.data.shots = a.shots
  c.data.mask_outside_bbox = a.mask
  pipeline = a.pipeline
  if pipeline == 'auto':   # the records cannot mask outside the box (their crops are cut)
    pipeline = 'records' if a.dtype == 'bfloat16' and not a.mask and not a.runlocal else 'json'
  if pipeline == 'records':   # (json configs stay as they were: their workdirs resume as is)
    c.data.train_records = f'{a.root}/tfds'
    c.data.warp = 'device'
  backbone = backbones.test_size_of(a.backbone) if a.runlocal else a.backbone
  c.model = common.model_config(backbone, image_size=64 if a.runlocal else None,
                                capex=a.capex, fusion=a.fusion, dtype=a.dtype)
  # The official configs' targets are 64 px at every input size (224 px for vit_b16).
  c.data.heatmap_size = 0 if a.runlocal else 64
  if a.runlocal:
    c.init.from_scratch = True           # a wiring check: no weights to download
    c.precision = 'default'
    c.total_steps = 4
    c.batch_size = c.eval_batch_size = 4
    c.log_every_steps = 2
    c.eval_every_steps = c.checkpoint_every_steps = 4
    c.data.val_episodes = c.data.test_episodes = 2
    c.data.num_queries = 1
    c.test_at_end = True
  return c

"""The default run: a tiny CapeNext trained on drawn MP-100-format data, minutes on a CPU.

  train.py --workdir runs/synthetic                  (this config is train.py's default)

The data (12 train / 4 val / 4 test categories, disjoint) is generated into
`<workdir>/data` on first use. Test-category PCK@0.2 is printed before training (step 0)
and after it, so the gain on unseen categories is visible.

Why not the official recipe: lr 1e-5 with a 1000-step warmup suits fine-tuning a pretrained
Swin-T for 200 epochs; a ~100k-parameter model from scratch in a few hundred steps needs
lr 2e-3, a short warmup and no dropout / drop-path to move at all. The Swin is cut to two
stages (depths (1, 1)) so the head sees an 8x8 map at 64 px, not 2x2: the keypoint discs are a
few pixels wide and the similarity-map proposals need cells smaller than the PCK@0.2 radius.
The CLIP towers are random (nothing can be downloaded), so the synthetic descriptions name
only a keypoint's colour ("red point"), the same words in every category: random text
embeddings still tell the colours apart, and what the model learns (colour word -> disc of
that colour) carries over to unseen categories.
Args: steps=N (default 600), batch=B (16), image_size=S (64), stages=N Swin stages (2),
lr (2e-3), backbone=tiny|resnet_tiny|hrnet_tiny|... (a CPU test size; the others keep their
stride-16 feature map, 4x4 at 64 px), dtype=float32|bfloat16 (model compute dtype; bfloat16 is
for GPUs / TPUs, XLA:CPU runs it slower than float32); the paper's ablations as in
configs/mp100.py: capex (no fusion module), fusion=<official fusion class>, mask (zero the
image outside the instance box).
"""
from __future__ import annotations

from configs import common


def get_config(arg: str | None = None):
  a = common.parse_arg(arg, steps=600, batch=16, image_size=64, stages=2, lr=2e-3,
                       backbone='tiny', dtype='float32', capex=False, fusion='', mask=False)
  c = common.base_config()
  c.data.synthetic.enabled = True        # root '' -> <workdir>/data
  c.data.mask_outside_bbox = a.mask
  c.init.from_scratch = True             # random backbone and CLIP: the task needs no pretraining
  c.model = common.model_config(a.backbone, image_size=a.image_size, capex=a.capex,
                                fusion=a.fusion, dtype=a.dtype)
  c.precision = 'default'
  if a.backbone == 'tiny':
    n = a.stages
    c.model.backbone.depths = (1,) * n
    c.model.backbone.num_heads = (1, 2, 2, 4)[:n]
    c.model.backbone.pretrained_window_sizes = (0,) * n
    # A few hundred steps from scratch: no regularisation (it only slows the fit down).
    c.model.backbone.drop_path_rate = 0.0
  c.model.head.dropout = 0.0
  if c.model.fusion:
    c.model.fusion.dropout = 0.0
  c.batch_size = a.batch
  c.eval_batch_size = 64
  c.total_steps = a.steps
  c.optim.lr = a.lr
  c.optim.warmup_steps = 50
  c.optim.milestones = (10_000,)         # no decay within the run (milestones are epochs)
  c.data.val_episodes = c.data.test_episodes = 10
  c.data.num_queries = 15
  c.log_every_steps = 50
  c.eval_every_steps = a.steps           # validate (and keep the best checkpoint) at the end
  c.checkpoint_every_steps = 200
  c.test_at_start = c.test_at_end = True
  return c

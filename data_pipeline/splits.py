"""The data of a run config: its annotation files, pipeline settings and one `Split` per role.

    data = run_splits(config, workdir, image_size=256)   # RunData(train, val, test)
    batches = data.train.train_batches(config.batch_size, start_step=0)
    for batch in data.test.eval_batches(pairs, 32): ...

The library's training loop and Evaluator read only what a `Split` offers (`dataset`,
`train_batches`, `eval_batches`), so they never import this package.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Iterator, NamedTuple

import ml_collections
import numpy as np

from capenext_jax.mp100.annotations import MP100Dataset
from capenext_jax.mp100.geometry import heatmap_side
from data_pipeline.pipeline import (PipelineConfig, Source, json_source, make_eval_iterator,
                                    make_train_iterator)


@dataclasses.dataclass
class Split:
  """One annotation file's instances with the pipeline settings of its role."""
  source: Source
  config: PipelineConfig

  @property
  def dataset(self) -> MP100Dataset:
    return self.source.dataset

  def train_batches(self, global_batch_size: int, *, start_step: int = 0) -> Iterator[dict]:
    """Endless training batches from global step `start_step` (this host's rows)."""
    return make_train_iterator(self.source, global_batch_size, self.config,
                               start_step=start_step)

  def eval_batches(self, pairs: np.ndarray, global_batch_size: int) -> Iterator[dict]:
    """Batches of `pairs` (db rows) in order, the last one padded (this host's rows)."""
    return make_eval_iterator(self.source, global_batch_size, self.config, pairs=pairs)


class RunData(NamedTuple):
  train: Split
  val: Split | None
  test: Split | None


def data_files(config: ml_collections.ConfigDict, workdir: str) -> dict[str, str]:
  """{'train', 'val', 'test': annotation json, 'image_root'}; draws the synthetic set if asked.

  Synthetic data goes to `config.data.root` or `<workdir>/data`; process 0 draws it once and
  the others wait for it.
  """
  d = config.data
  if not d.synthetic.enabled:
    return dict(train=d.train_ann, val=d.val_ann, test=d.test_ann, image_root=d.image_root)
  import jax
  from jax.experimental import multihost_utils

  from data_pipeline.synthetic import generate_synthetic
  root = d.root or os.path.join(workdir, 'data')
  files = {s: os.path.join(root, 'annotations', f'synthetic_{s}.json')
           for s in ('train', 'val', 'test')}
  if jax.process_index() == 0 and not all(os.path.exists(f) for f in files.values()):
    generate_synthetic(root, categories=tuple(d.synthetic.categories),
                       instances=d.synthetic.instances, image_size=d.synthetic.image_size,
                       seed=config.seed)
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices('synthetic data written')
  return dict(files, image_root=os.path.join(root, 'images'))


def pipeline_config(config: ml_collections.ConfigDict, *, image_size: int,
                    train: bool) -> PipelineConfig:
  """The pipeline settings of a run config for a model of input side `image_size` (the
  program's parsed `CapeNextConfig.image_size`), for training (augmented) or evaluation."""
  heatmap_size = heatmap_side(image_size, config.data.get('heatmap_size', 0))
  return PipelineConfig(shots=config.data.shots, image_size=image_size,
                        heatmap_size=heatmap_size, warp=config.data.warp,
                        crop_size=image_size * 3 // 2,
                        augment=train and config.data.augment, seed=config.seed,
                        # Run configs written before the option existed lack it.
                        mask_outside_bbox=config.data.get('mask_outside_bbox', False))


def eval_split(config: ml_collections.ConfigDict, ann_file: str, image_root: str, *,
               image_size: int, drop_missing_images: bool = False) -> Split:
  """An evaluation split of any annotation file with the run config's pipeline settings for
  a model of input side `image_size` (the official test set keeps records whose image is
  missing; val drops them)."""
  source = json_source(ann_file, image_root, drop_missing_images=drop_missing_images,
                       on_bad_image=config.data.on_bad_image,
                       skeleton_base=config.data.get('skeleton_base'))
  return Split(source, pipeline_config(config, image_size=image_size, train=False))


def train_source(config: ml_collections.ConfigDict, files: dict[str, str]) -> Source:
  """The training split's source: its json and images, or, when `config.data.train_records`
  names a folder, TFDS records of the same files with each crop pre-cut (built there on first
  use, reused after; `data_pipeline/tfds_mp100.py`): decoding a small crop instead of a whole
  image is what lets a few host cores feed an accelerator (README, benchmarks)."""
  d = config.data
  records_dir = d.get('train_records', '')
  if not records_dir:
    return json_source(files['train'], files['image_root'], drop_missing_images=True,
                       on_bad_image=d.on_bad_image, skeleton_base=d.get('skeleton_base'))
  import hashlib

  from data_pipeline import tfds_mp100 as tm
  ann, images = os.path.abspath(files['train']), os.path.abspath(files['image_root'])
  root = os.path.commonpath([ann, images])
  # Records are named by what they were built from: other files get other records.
  digest = hashlib.sha256(f'{ann}\n{images}\n{d.on_bad_image}'.encode()).hexdigest()[:12]
  builder_config = tm.Mp100Config.for_root_layout(
      f'train_{digest}', {'train': os.path.relpath(ann, root)},
      image_dir=os.path.relpath(images, root), on_bad_image=d.on_bad_image)
  return tm.load_records(tm.build_records(root, records_dir, builder_config), 'train')


def run_splits(config: ml_collections.ConfigDict, workdir: str, *, image_size: int) -> RunData:
  """The splits a training run of a model of input side `image_size` reads: train always;
  val when `config.validate`; test when it is evaluated at the start or the end. A split
  without an annotation file is None."""
  files = data_files(config, workdir)
  train = Split(train_source(config, files),
                pipeline_config(config, image_size=image_size, train=True))
  val = (eval_split(config, files['val'], files['image_root'], image_size=image_size,
                    drop_missing_images=True)
         if files['val'] and config.validate else None)
  test = (eval_split(config, files['test'], files['image_root'], image_size=image_size)
          if files['test'] and (config.test_at_start or config.test_at_end) else None)
  return RunData(train, val, test)

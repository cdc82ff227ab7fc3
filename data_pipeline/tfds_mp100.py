"""TFDS builder for MP-100 (or any MP-100-format root): one record per instance.

Each record holds every annotation field of the instance plus its image crop, pre-cut around the
bbox with the margin the training augmentation can reach (scale 1.15, rotation 30 degrees) and
re-encoded as JPEG (down-scaled when larger than ``max_crop`` px), so the training host decodes a
small crop instead of the whole image. The category table of each split is kept in the builder
metadata. ``load_records`` turns a split back into a pipeline :class:`Source` whose db order and
episodes equal those of the json path.

    builder = Mp100(config=Mp100Config.for_root_layout('mini', {'train': 'annotations/mini_train.json'},
                    image_dir='images'), data_dir=out_dir)
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=root))
    source = load_records(builder, 'train')
"""
from __future__ import annotations

import dataclasses
import io
import json
import os
import warnings

import numpy as np

from capenext_jax.errors import DataWarning
from capenext_jax.extras import require
from capenext_jax.mp100 import geometry
from capenext_jax.mp100.annotations import load_annotations
from data_pipeline.pipeline import Source, import_tf, load_rgb

tfds = require('tensorflow_datasets', 'data', 'the TFDS builder')

MANUAL_INSTRUCTIONS = """\
Put MP-100 in manual_dir: `annotations/mp100_split{1..5}_{train,val,test}.json` (Pose Anything's
files with skeletons) and the images as `<file_name>` relative to manual_dir (the official code's
layout; set `image_dir` for CapeX's `images/` layout)."""


@dataclasses.dataclass(eq=False)
class Mp100Config(tfds.core.BuilderConfig):
  """ann_files: split -> json path relative to manual_dir; image_dir: image root relative to it."""
  ann_files: dict = dataclasses.field(default_factory=dict)
  image_dir: str = ''
  max_crop: int = 384
  jpeg_quality: int = 95
  on_bad_image: str = 'error'     # or 'skip' (counted, warned)

  @classmethod
  def for_root_layout(cls, name: str, ann_files: dict, image_dir: str = '', **kw) -> 'Mp100Config':
    return cls(name=name, ann_files=dict(ann_files), image_dir=image_dir, **kw)


def _split_configs():
  return [Mp100Config(name=f'split{s}', description=f'MP-100 split {s}',
                      ann_files={k: f'annotations/mp100_split{s}_{k}.json'
                                 for k in ('train', 'val', 'test')}) for s in range(1, 6)]


class Mp100(tfds.core.GeneratorBasedBuilder):
  """MP-100 instances with pre-cut crops."""
  VERSION = tfds.core.Version('1.0.0')
  BUILDER_CONFIGS = _split_configs()
  MANUAL_DOWNLOAD_INSTRUCTIONS = MANUAL_INSTRUCTIONS
  # Nothing is downloaded: no checksum file to locate (TFDS would look it up next to the code).
  url_infos = None

  def _info(self):
    return tfds.core.DatasetInfo(
        builder=self,
        description='MP-100 instances with pre-cut image crops (capenext-jax).',
        features=tfds.features.FeaturesDict({
            'db_index': np.int64,
            'ann_id': np.int64,
            'image_id': np.int64,
            'file_name': tfds.features.Text(),
            'category_id': np.int64,
            # the annotation and image objects verbatim (JSON text keeps float64 and big ints
            # exact; tf.train.Example would store floats as float32)
            'annotation_json': tfds.features.Text(),
            'image_json': tfds.features.Text(),
            'crop': tfds.features.Image(shape=(None, None, 3), encoding_format='jpeg'),
            'crop_origin': tfds.features.Tensor(shape=(2,), dtype=np.int64),
            'crop_size': tfds.features.Tensor(shape=(2,), dtype=np.int64),
        }),
        metadata=tfds.core.MetadataDict(),
    )

  def _split_generators(self, dl_manager):
    root = dl_manager.manual_dir
    out = {}
    for split, rel in self.builder_config.ann_files.items():
      out[split] = self._generate_examples(os.fspath(root), rel, split)
    return out

  def _generate_examples(self, root, rel, split):
    cfg = self.builder_config
    ann_file = os.path.join(root, rel)
    with open(ann_file, encoding='utf-8') as f:
      data = json.load(f)
    image_root = os.path.join(root, cfg.image_dir) if cfg.image_dir else root
    # Official train/val drop records whose image is missing; test keeps them (and would fail).
    ds = load_annotations(ann_file, image_root, data=data, drop_missing_images=(split != 'test'))
    self.info.metadata.setdefault('categories', {})[split] = [
        {k: c[k] for k in ('id', 'name', 'supercategory', 'keypoints', 'skeleton')}
        for c in data['categories']]
    anns = {a['id']: a for a in data['annotations']}
    imgs = {im['id']: im for im in data['images']}
    origin, size, stored = geometry.crop_window(ds.center, ds.scale, ds.image_size, max_crop=cfg.max_crop)
    from PIL import Image
    cache_path, cache_img = None, None
    skipped = 0
    for i in range(len(ds)):
      path = ds.image_path[i]
      if path != cache_path:
        cache_path = path
        try:
          # upright (EXIF applied) and of the json's size, else ValueError naming the file
          cache_img = load_rgb(path, tuple(int(v) for v in ds.image_size[i]))
        except ValueError as e:
          cache_img = None
          if cfg.on_bad_image != 'skip':
            raise ValueError(f'annotation id {int(ds.ann_id[i])}: {e}') from e
      if cache_img is None:
        skipped += 1
        continue
      (x0, y0), (w, h), (sw, sh) = origin[i], size[i], stored[i]
      crop = Image.fromarray(cache_img[y0:y0 + h, x0:x0 + w])
      if (sw, sh) != (w, h):
        crop = crop.resize((int(sw), int(sh)), Image.BILINEAR)
      buf = io.BytesIO()
      crop.save(buf, format='JPEG', quality=cfg.jpeg_quality)
      ann = anns[int(ds.ann_id[i])]
      yield i, {
          'db_index': i, 'ann_id': int(ds.ann_id[i]), 'image_id': int(ds.image_id[i]),
          'file_name': ds.file_name[i], 'category_id': int(ann['category_id']),
          'annotation_json': json.dumps(ann), 'image_json': json.dumps(imgs[int(ds.image_id[i])]),
          'crop': io.BytesIO(buf.getvalue()),
          'crop_origin': origin[i], 'crop_size': size[i],
      }
    if skipped:
      warnings.warn(f'{ann_file}: skipped {skipped} instances with missing or unreadable images',
                    DataWarning)


def build_records(manual_dir: str, data_dir: str, config: Mp100Config | str = 'split1') -> Mp100:
  """Builds (or reuses) the records of ``config`` under ``data_dir``; returns the builder."""
  builder = Mp100(config=config, data_dir=data_dir)
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
  return builder


def load_records(builder: Mp100, split: str) -> Source:
  """Reads one split fully (crops stay encoded, in memory) into a pipeline Source."""
  tf = import_tf()
  ds = builder.as_dataset(split=split, decoders={'crop': tfds.decode.SkipDecoding()})
  rows = []
  for ex in ds.as_numpy_iterator():
    rows.append(ex)
  rows.sort(key=lambda r: int(r['db_index']))
  del tf
  cats = builder.info.metadata['categories'][split]
  images, seen, anns = [], set(), []
  for r in rows:
    img = json.loads(r['image_json'])
    if img['id'] not in seen:
      seen.add(img['id'])
      images.append(img)
    anns.append(json.loads(r['annotation_json']))
  name = f'{builder.name}/{builder.builder_config.name}:{split}'
  data = {'images': images, 'annotations': anns, 'categories': cats}
  dataset = load_annotations(name, '', data=data)
  if len(dataset) != len(rows):
    raise ValueError(f'{name}: {len(rows)} records rebuild {len(dataset)} instances')
  encoded = np.empty(len(rows), dtype=object)
  encoded[:] = [r['crop'] for r in rows]
  origin = np.stack([r['crop_origin'] for r in rows]).astype(np.int64)
  size = np.stack([r['crop_size'] for r in rows]).astype(np.int64)
  _, _, stored = geometry.crop_window(dataset.center, dataset.scale, dataset.image_size,
                                max_crop=builder.builder_config.max_crop)
  return Source(dataset=dataset, kind='records', encoded=encoded, crop_origin=origin,
                crop_size=size, crop_stored=stored)

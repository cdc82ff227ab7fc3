"""tf.data episode pipeline: MP-100 instances -> batches of numpy dicts (docs/DESIGN.md).

Two image sources share one pipeline:

* :func:`json_source` reads the annotation json and decodes the original images (no build step);
* ``data_pipeline.tfds_mp100.load_records`` reads the TFDS records (pre-cut crops, cheap decode).

All geometry (episodes, augmentation draws, affine matrices, transformed joints, target weights,
support and evaluation masks) is computed per epoch in float64 numpy (``capenext_jax/mp100/geometry.py``, ``episodes.py``); tf.data
only reads and decodes the query pixels and, in ``warp='host'`` mode, warps and normalises them.
Support pixels are never decoded: the model needs only the support mask (docs/MODEL.md §5.6).

Batch dict (per host; B = global_batch_size // process_count):
  query_image    float32 [B, S, S, 3]  ImageNet-normalised (warp='host')
  query_crop     uint8   [B, Hc, Wc, 3] and query_affine float32 [B, 2, 3] crop px -> S px
                 (warp='device'; see ``capenext_jax.image_ops.warp_and_normalize``)
  query_joints   float32 [B, 100, 2]   query keypoints in S-crop px (invisible: raw values)
  query_weight   float32 [B, 100]      visible AND heatmap in bounds
  support_mask   float32 [B, 100]      same for support shot 0 (augmented in training)
  adjacency      float32 [B, 100, 100] 0/1 symmetrised skeleton (include_adjacency=True)
  category_index int32   [B]           row of ``source.dataset.category_table()``
  eval extras (make_eval_iterator): pair_index int32 [B] (row of the pairs given), valid bool
  [B] (False on the padding of the last batch), eval_mask bool [B,100], query_ann_id int64 [B],
  support_ann_ids int64 [B, k].
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import warnings
from typing import Iterator

import numpy as np

from capenext_jax.errors import DataWarning
from capenext_jax.extras import require
from capenext_jax.mp100 import episodes as ep
from capenext_jax.mp100 import geometry
from capenext_jax.mp100.annotations import MP100Dataset, load_annotations
from capenext_jax.mp100.images import exif_orientation, load_rgb



def import_tf():
  """TensorFlow, imported lazily: only the data pipeline needs it."""
  return require('tensorflow', 'data', 'the tf.data pipeline')


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
  shots: int = 1                # training episodes' supports (evaluation: its pairs' own)
  image_size: int = 256
  heatmap_size: int = 64
  sigma: float = 1.0
  warp: str = 'host'            # 'host': tf.data warps; 'device': ship crops + matrices
  crop_size: int = 384          # device mode: crops are (down-scaled and) zero-padded to this
  augment: bool = True          # random scale / rotation in training
  include_adjacency: bool = True
  # The official `TopDownMaskImage` (CapeNext configs/clip_mask): zero the source image outside
  # the instance's cleaned bbox, truncated to integers, before the crop is cut (json source).
  mask_outside_bbox: bool = False
  seed: int = 0
  num_parallel_calls: int = -1  # tf.data.AUTOTUNE
  prefetch: int = 2


@dataclasses.dataclass
class Source:
  """Instances plus where their pixels come from.

  kind 'json': ``dataset.image_path`` files are decoded whole; 'records': ``encoded[i]`` holds
  instance i's crop (encoded image) covering ``crop_origin``/``crop_size`` source px, stored at
  ``crop_stored`` px (see ``transforms.crop_window``).
  """
  dataset: MP100Dataset
  kind: str
  encoded: np.ndarray | None = None
  crop_origin: np.ndarray | None = None
  crop_size: np.ndarray | None = None
  crop_stored: np.ndarray | None = None


def select_instances(dataset: MP100Dataset, keep: np.ndarray) -> MP100Dataset:
  """A copy with only the rows where ``keep`` is True (db order kept)."""
  keep = np.asarray(keep, bool)
  idx = np.nonzero(keep)[0]
  rows = {}
  for f in dataclasses.fields(dataset):
    v = getattr(dataset, f.name)
    if f.name in ('file_name', 'image_path'):
      rows[f.name] = [v[i] for i in idx]
    elif isinstance(v, np.ndarray) and v.shape[:1] == keep.shape and f.name not in (
        'category_ids', 'category_num_keypoints'):
      rows[f.name] = v[idx]
  return dataclasses.replace(dataset, **rows)


def scan_images(dataset: MP100Dataset, num_threads: int = 4) -> np.ndarray:
  """bool [N]: the instance's image exists, decodes and has the json's width/height."""
  paths = sorted(set(dataset.image_path))
  size_of = {p: tuple(int(v) for v in dataset.image_size[i])
             for i, p in enumerate(dataset.image_path)}

  def check(p):
    try:
      load_rgb(p, size_of[p])   # raises for a missing, broken or mis-sized image
      return True
    except ValueError:
      return False

  with concurrent.futures.ThreadPoolExecutor(num_threads) as pool:
    ok = dict(zip(paths, pool.map(check, paths)))
  return np.array([ok[p] for p in dataset.image_path], bool)


def json_source(ann_file: str, image_root: str, *, drop_missing_images: bool = True,
                on_bad_image: str = 'error', skeleton_base: int | None = None) -> Source:
  """Source reading the json and the original images.

  drop_missing_images: official train/val behaviour (True) vs test (False).
  on_bad_image: 'error' (a missing / corrupt image raises a ValueError naming it when reached)
    or 'skip' (all images are decoded once now; bad ones are dropped, counted and warned about;
    the db order, hence the evaluation pairs, then differ from the official ones).
  skeleton_base: 0 or 1, how the file numbers skeleton keypoints (None: detected).
  """
  if on_bad_image not in ('error', 'skip'):
    raise ValueError(f'on_bad_image must be "error" or "skip", got {on_bad_image!r}')
  ds = load_annotations(ann_file, image_root, drop_missing_images=drop_missing_images,
                        skeleton_base=skeleton_base)
  if on_bad_image == 'skip':
    ok = scan_images(ds)
    if not ok.all():
      bad = sorted({ds.image_path[i] for i in np.nonzero(~ok)[0]})
      warnings.warn(f'{ann_file}: skipped {int((~ok).sum())} instances in {len(bad)} missing or '
                    f'unreadable images, e.g. {bad[:3]}', DataWarning, stacklevel=2)
      lost = [('a missing or unreadable image', int(ds.ann_id[i]),
               int(ds.category_ids[ds.category_index[i]])) for i in np.nonzero(~ok)[0]]
      ds = select_instances(ds, ok)
      ds.dropped = ds.dropped + lost
  return Source(dataset=ds, kind='json')


# ----------------------------------------------------------------------------------------------
# Episode metadata (numpy)

def _crop_params(source: Source, config: PipelineConfig):
  """Crop windows (origin, size, stored) per instance, for records or device-mode json.

  Records hold crops of at most the builder's `max_crop` px; in device mode the pipeline ships
  at most `config.crop_size` px, so larger record crops are scaled down once more on the host
  (the stored size is then what the json path would store).
  """
  if source.kind == 'records':
    stored = source.crop_stored
    if config.warp == 'device' and stored.max() > config.crop_size:
      stored = np.where(stored.max(axis=1, keepdims=True) > config.crop_size,
                        geometry.stored_size(source.crop_size, config.crop_size), stored)
    return source.crop_origin, source.crop_size, stored
  d = source.dataset
  return geometry.crop_window(d.center, d.scale, d.image_size, max_crop=config.crop_size,
                              output_size=config.image_size)


def episode_arrays(source: Source, episodes: np.ndarray, config: PipelineConfig,
                   s_factor=None, rotation=None) -> dict:
  """Host-side metadata of a list of episodes (numpy, one row per episode)."""
  if config.mask_outside_bbox and source.kind != 'json':
    raise ValueError('mask_outside_bbox needs the json source (records hold cut crops)')
  d = source.dataset
  g = geometry.episode_geometry(d, episodes, s_factor, rotation, config.image_size,
                          config.heatmap_size, config.sigma)
  q = episodes[:, -1]
  m = g['query_matrix']                                   # source image px -> S px
  if source.kind == 'records' or config.warp == 'device':
    origin, size, stored = _crop_params(source, config)
    m = geometry.compose_affine(m, _invert(geometry.crop_matrix(origin[q], size[q], stored[q])))
  out = dict(
      query_db=q.astype(np.int64),
      query_affine=m.astype(np.float32),
      query_inverse=_invert(m).astype(np.float32),
      query_joints=g['query_joints'].astype(np.float32),
      query_weight=g['query_weight'],
      support_mask=g['support_mask'],
      category_index=g['category_index'].astype(np.int32),
  )
  if config.warp == 'device':
    out['crop_box'] = np.concatenate([origin[q], size[q], stored[q]], axis=1).astype(np.int32)
  if source.kind == 'json':
    out['image_hw'] = d.image_size[q][:, ::-1].astype(np.int32)
  if config.mask_outside_bbox:
    out['mask_box'] = bbox_mask_box(d.bbox[q])
  return out


def bbox_mask_box(bbox: np.ndarray) -> np.ndarray:
  """int32 [N, 4] (x0, y0, x1, y1): the pixels `TopDownMaskImage` keeps, x0 <= col < x1 and
  y0 <= row < y1, from cleaned bboxes [N, 4] (x, y, w, h) cast to int one by one as there."""
  x, y, w, h = np.trunc(bbox).astype(np.int64).T
  return np.stack([x, y, x + w, y + h], axis=1).astype(np.int32)


def _invert(m: np.ndarray) -> np.ndarray:
  lin = m[..., :, :2]
  inv = np.linalg.inv(lin)
  t = -np.einsum('...ij,...j->...i', inv, m[..., :, 2])
  return np.concatenate([inv, t[..., None]], axis=-1)


# ----------------------------------------------------------------------------------------------
# tf.data

def decode(raw):
  """Encoded bytes -> uint8 [H, W, 3] as stored."""
  tf = import_tf()
  # JPEG with the accurate integer IDCT, as libjpeg's default used by cv2 and PIL (TF's own
  # default, the fast IDCT, differs by up to ~20 grey levels); other formats via decode_image.
  img = tf.cond(tf.io.is_jpeg(raw),
                lambda: tf.io.decode_jpeg(raw, channels=3, dct_method='INTEGER_ACCURATE'),
                lambda: tf.io.decode_image(raw, channels=3, expand_animations=False))
  return tf.ensure_shape(img, [None, None, 3])


def decode_upright(raw):
  """`decode` with the EXIF orientation applied, as cv2's imdecode (and `load_rgb`) do.

  The tag is read on the host from the header alone; TF has no EXIF reader. Orientations
  2-8 are the flips / quarter turns / (anti-)transposes of the EXIF specification.
  """
  tf = import_tf()
  img = decode(raw)
  # numpy_function hands the string over as a 0-d object array.
  orientation = tf.numpy_function(lambda b: np.int64(exif_orientation(np.asarray(b).item())),
                                  [raw], tf.int64, stateful=False)
  transpose = lambda x: tf.transpose(x, [1, 0, 2])  # noqa: E731
  turns = [lambda: img,                                   # 1: upright
           lambda: tf.reverse(img, [1]),                  # 2: mirrored
           lambda: tf.reverse(img, [0, 1]),               # 3: upside down
           lambda: tf.reverse(img, [0]),                  # 4: mirrored upside down
           lambda: transpose(img),                        # 5: transposed
           lambda: tf.image.rot90(img, 3),                # 6: turn 90 degrees clockwise
           lambda: tf.reverse(transpose(img), [0, 1]),    # 7: anti-transposed
           lambda: tf.image.rot90(img, 1)]                # 8: turn 90 degrees anticlockwise
  img = tf.switch_case(tf.cast(tf.reshape(orientation, []), tf.int32) - 1, turns)
  return tf.ensure_shape(img, [None, None, 3])


def _decode_fn(source: Source, config: PipelineConfig):
  tf = import_tf()
  size = config.image_size
  if getattr(source, '_table', None) is None:
    values = source.encoded if source.kind == 'records' else np.asarray(
        source.dataset.image_path, dtype=object)
    source._table = tf.constant(values, tf.string)
  table = source._table
  mean = tf.constant(geometry.IMAGENET_MEAN, tf.float32)
  std = tf.constant(geometry.IMAGENET_STD, tf.float32)
  # Plain graph code: AutoGraph would try (and warn) to convert the lazy TensorFlow import.
  decode_query = tf.autograph.experimental.do_not_convert(
      decode_upright if source.kind == 'json' else decode)

  def fn(e):
    raw = tf.gather(table, e['query_db'])
    if source.kind == 'json':
      raw = tf.io.read_file(raw)
    img = decode_query(raw)
    out = {k: v for k, v in e.items()
           if k not in ('query_db', 'query_inverse', 'crop_box', 'image_hw', 'mask_box')}
    if source.kind == 'json':
      tf.debugging.assert_equal(tf.shape(img)[:2], e['image_hw'],
                                message='decoded image size differs from the json width/height')
    if config.mask_outside_bbox:
      box = e['mask_box']
      cols, rows = tf.range(tf.shape(img)[1]), tf.range(tf.shape(img)[0])
      keep = (((rows >= box[1]) & (rows < box[3]))[:, None]
              & ((cols >= box[0]) & (cols < box[2]))[None, :])
      img = img * tf.cast(keep, img.dtype)[..., None]
    if config.warp == 'host':
      inv = e['query_inverse']
      t = tf.concat([tf.reshape(inv, [6]), tf.zeros([2], tf.float32)], 0)
      warped = tf.raw_ops.ImageProjectiveTransformV3(
          images=tf.cast(img, tf.float32)[None], transforms=t[None], output_shape=[size, size],
          fill_value=0.0, interpolation='BILINEAR', fill_mode='CONSTANT')[0]
      warped = tf.clip_by_value(tf.round(warped), 0.0, 255.0)   # cv2 returns uint8
      out['query_image'] = (warped / 255.0 - mean) / std
    else:
      # crop_box: (x0, y0, w, h) of the window in source px, then its stored (w, h).
      box = e['crop_box']
      if source.kind == 'json':
        img = tf.image.crop_to_bounding_box(img, box[1], box[0], box[3], box[2])
      img = tf.cond(tf.reduce_all(tf.shape(img)[1::-1] == box[4:6]), lambda: img,
                    lambda: tf.cast(tf.clip_by_value(tf.round(tf.image.resize(
                        img, [box[5], box[4]], antialias=True)), 0, 255), tf.uint8))
      img = tf.image.pad_to_bounding_box(img[:config.crop_size, :config.crop_size], 0, 0,
                                         config.crop_size, config.crop_size)
      out['query_crop'] = tf.ensure_shape(img, [config.crop_size, config.crop_size, 3])
    return out
  return fn


def _batch_fn(source: Source, config: PipelineConfig):
  tf = import_tf()
  adj = tf.constant(source.dataset.category_table()['adjacency']) if config.include_adjacency else None

  def fn(b):
    if adj is not None:
      b['adjacency'] = tf.gather(adj, b['category_index'])
    return b
  return fn


def _dataset(source: Source, arrays: dict, batch: int, config: PipelineConfig):
  return _pipeline(source, import_tf().data.Dataset.from_tensor_slices(arrays), batch, config)


def _pipeline(source: Source, ds, batch: int, config: PipelineConfig):
  tf = import_tf()
  opts = tf.data.Options()
  opts.deterministic = True
  opts.threading.private_threadpool_size = 0
  ds = ds.with_options(opts)
  ds = ds.map(_decode_fn(source, config), num_parallel_calls=config.num_parallel_calls,
              deterministic=True)
  ds = ds.batch(batch, drop_remainder=True)
  ds = ds.map(_batch_fn(source, config), num_parallel_calls=config.num_parallel_calls,
              deterministic=True)
  return ds.prefetch(config.prefetch)


def _host_batch(global_batch_size: int, process_index, process_count):
  if process_index is None or process_count is None:
    import jax
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  if global_batch_size % process_count:
    raise ValueError(f'global_batch_size={global_batch_size} is not divisible by '
                     f'process_count={process_count}')
  return global_batch_size // process_count, process_index, process_count


def _host_rows(num_rows: int, global_batch: int, host_batch: int, process_index: int,
               start_batch: int = 0) -> np.ndarray:
  """Row indices of this host: global batch b holds rows [b*G, (b+1)*G), host p its p-th slice."""
  nb = num_rows // global_batch
  b = np.arange(start_batch, nb)
  rows = b[:, None] * global_batch + process_index * host_batch + np.arange(host_batch)[None]
  return rows.reshape(-1)


def _iterate(source: Source, ds, rows_of_batch) -> Iterator[dict]:
  tf = import_tf()
  it = iter(ds)
  k = 0
  while True:
    try:
      b = next(it)
    except StopIteration:
      return
    except tf.errors.OpError as err:
      raise _explain_failure(source, rows_of_batch(k), err) from err
    k += 1
    yield {key: v.numpy() for key, v in b.items()}


def _explain_failure(source: Source, db_rows: np.ndarray, err) -> Exception:
  """Names the image that broke a batch (missing, undecodable or of the wrong size)."""
  d = source.dataset
  if source.kind == 'json':
    for i in dict.fromkeys(int(r) for r in db_rows):
      p = d.image_path[i]
      try:
        load_rgb(p, tuple(int(v) for v in d.image_size[i]))
      except ValueError as e:
        return ValueError(f'{e} (annotation id {int(d.ann_id[i])}); use on_bad_image="skip" to '
                          'drop such images')
  return ValueError(f'image pipeline failed for one of annotation ids '
                    f'{sorted(set(int(d.ann_id[r]) for r in db_rows))}: {err.message}')


def _train_rows(source: Source, config: PipelineConfig, epoch: int, global_batch: int,
                host_batch: int, pidx: int) -> dict:
  episodes = ep.training_episodes(source.dataset, config.shots, config.seed, epoch)
  s, r = (ep.augmentation_params(config.seed, epoch, len(episodes), config.shots)
          if config.augment else (None, None))
  rows = _host_rows(len(episodes), global_batch, host_batch, pidx)
  return episode_arrays(source, episodes[rows], config,
                        None if s is None else s[rows], None if r is None else r[rows])


def make_train_iterator(source: Source, global_batch_size: int, config: PipelineConfig = PipelineConfig(),
                        *, start_step: int = 0, process_index: int | None = None,
                        process_count: int | None = None, num_epochs: int | None = None
                        ) -> Iterator[dict]:
  """Endless (or ``num_epochs``) training batches, resumable at any global step.

  Epoch e uses ``episodes.training_episodes(dataset, shots, seed, e)`` and the augmentation
  draws ``episodes.augmentation_params(seed, e, ...)``; an epoch has
  ``epoch_length // global_batch_size`` steps (the last partial batch is dropped). Batches of
  global step t are identical whether the run started at 0 or resumed at ``start_step <= t``.
  """
  tf = import_tf()
  host_batch, pidx, pcount = _host_batch(global_batch_size, process_index, process_count)
  steps_per_epoch = ep.epoch_length(source.dataset) // global_batch_size
  if steps_per_epoch == 0:
    raise ValueError(f'global_batch_size={global_batch_size} exceeds the epoch length '
                     f'{ep.epoch_length(source.dataset)}')
  first_epoch, skip = divmod(start_step, steps_per_epoch)
  probe = _train_rows(source, config, first_epoch, global_batch_size, host_batch, pidx)
  keys = sorted(probe)
  specs = {k: (tf.as_dtype(probe[k].dtype), probe[k].shape[1:]) for k in keys}
  cache = {first_epoch: probe}

  def rows_of_epoch(e):
    e = int(e)
    arr = cache.pop(e, None)
    if arr is None:
      arr = _train_rows(source, config, e, global_batch_size, host_batch, pidx)
    return tuple(arr[k] for k in keys)

  def epoch_ds(e):
    vals = tf.numpy_function(rows_of_epoch, [e], [specs[k][0] for k in keys], stateful=False)
    out = {}
    for k, v in zip(keys, vals):
      v.set_shape((None,) + tuple(specs[k][1]))
      out[k] = v
    return tf.data.Dataset.from_tensor_slices(out)

  end = tf.int64.max if num_epochs is None else num_epochs
  ds = tf.data.Dataset.range(first_epoch, end).flat_map(epoch_ds).skip(skip * host_batch)
  ds = _pipeline(source, ds, host_batch, config)

  def db_rows(k):   # the query db rows of the k-th batch yielded (for error messages)
    step = start_step + k
    arr = _train_rows(source, config, step // steps_per_epoch, global_batch_size, host_batch, pidx)
    j = step % steps_per_epoch
    return arr['query_db'][j * host_batch:(j + 1) * host_batch]

  yield from _iterate(source, ds, db_rows)


def make_eval_iterator(source: Source, global_batch_size: int, config: PipelineConfig = PipelineConfig(),
                       *, pairs: np.ndarray, process_index: int | None = None,
                       process_count: int | None = None) -> Iterator[dict]:
  """Evaluation batches of ``pairs`` (int64 [N, shots + 1] db rows, e.g. the official ones
  of ``capenext_jax.evaluation.EvalPairs``) in order, no augmentation; the last batch is
  padded (``valid`` False) so every host gets the same number of batches."""
  host_batch, pidx, _ = _host_batch(global_batch_size, process_index, process_count)
  d = source.dataset
  pairs = np.asarray(pairs, np.int64)
  n = len(pairs)
  total = -(-n // global_batch_size) * global_batch_size
  pair_index = np.minimum(np.arange(total), n - 1)
  rows = _host_rows(total, global_batch_size, host_batch, pidx)
  pidx_rows = pair_index[rows]
  ep_rows = pairs[pidx_rows]
  arrays = episode_arrays(source, ep_rows, config)
  q = ep_rows[:, -1]
  arrays.update(
      eval_mask=ep.eval_mask(d, ep_rows),
      pair_index=pidx_rows.astype(np.int32),
      valid=rows < n,
      query_ann_id=d.ann_id[q],
      support_ann_ids=d.ann_id[ep_rows[:, :-1]],
  )
  ds = _dataset(source, arrays, host_batch, config)
  qdb = arrays['query_db']
  yield from _iterate(source, ds, lambda k: qdb[k * host_batch:(k + 1) * host_batch])

"""What train.py and eval.py share: config -> model, data sources, sharded state, text cache,
and the device-side forward (text from the cache, optional on-device warp).

Nothing here reads flags; `config` is the ml_collections ConfigDict of `configs/`.
"""
from __future__ import annotations

import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec as P

from capenext_jax.image_ops import warp_and_normalize
from capenext_jax.models.capenext import CapeNext, CapeNextConfig
from capenext_jax.text.cache import CategoryText, TextCache, build_text_cache
from capenext_jax.training import partition, state as state_lib

# Batch entries the jitted steps read; the eval extras stay on the host.
DEVICE_KEYS = ('query_image', 'query_crop', 'query_affine', 'query_joints', 'query_weight',
               'support_mask', 'adjacency', 'category_index')


# ----------------------------------------------------------------------------- model
def sharding_rules(config: ml_collections.ConfigDict) -> list[tuple[str, Any]]:
  """`config.sharding_rules` with tuple specs turned into PartitionSpecs ('fsdp' kept)."""
  return [(rx, spec if spec == 'fsdp' else P(*spec)) for rx, spec in config.sharding_rules]


def init_state(config: ml_collections.ConfigDict, optimizer, mesh
               ) -> tuple[nnx.GraphDef, state_lib.TrainState, state_lib.TrainState]:
  """(graphdef, state, shardings): params created already sharded on `mesh`.

  The init runs under jit with `out_shardings`, so no device ever holds a full unsharded copy
  (eval_shape -> shardings -> jit(init)). Pretrained Swin / CLIP weights, when configured, are
  then read on the host and placed with the same shardings.
  """
  mcfg = CapeNextConfig.from_dict(config.model.to_dict())

  def init(rng):
    model = CapeNext(mcfg, rngs=nnx.Rngs(config.seed))
    return state_lib.init_train_state(model, optimizer, rng)[1]

  rng = jax.random.PRNGKey(config.seed)
  graphdef, _, _ = partition.split_model(nnx.eval_shape(
      lambda: CapeNext(mcfg, rngs=nnx.Rngs(config.seed))))
  abstract = jax.eval_shape(init, rng)
  shardings = state_lib.state_shardings(abstract, optimizer, mesh, sharding_rules(config))
  state = jax.jit(init, out_shardings=shardings)(rng)
  if config.init.swin_path or config.init.clip_path:
    from capenext_jax.pretrained import init_from_pretrained
    model = nnx.merge(graphdef, *to_host((state.trainable, state.frozen)))
    init_from_pretrained(model, config.init.swin_path or None, config.init.clip_path or None)
    _, trainable, frozen = partition.split_model(model)
    state = state.replace(trainable=jax.device_put(trainable, shardings.trainable),
                          frozen=jax.device_put(frozen, shardings.frozen))
  return graphdef, state, shardings


def to_host(tree):
  """Global arrays -> host values on every process (gathered across hosts when there are
  several). Typed PRNG keys (the dropout streams) travel as their raw key data."""
  def gather(x):
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
      return jax.random.wrap_key_data(gather(jax.random.key_data(x)),
                                      impl=jax.random.key_impl(x))
    if jax.process_count() > 1:
      return multihost_utils.process_allgather(x, tiled=True)
    return jax.device_get(x)
  return jax.tree.map(gather, tree)


# ----------------------------------------------------------------------------- text
def category_texts(dataset) -> list[CategoryText]:
  """The text-tower inputs of every category, in category-table order."""
  return [CategoryText(name, list(desc[:int(k)])) for name, desc, k in zip(
      dataset.raw_category_names, dataset.descriptions, dataset.category_num_keypoints)]


def text_cache(graphdef: nnx.GraphDef, state: state_lib.TrainState, dataset, mesh) -> TextCache:
  """Frozen CLIP text embeddings of `dataset`'s categories, replicated over `mesh`.

  Encoded from a host copy of the model so the same code serves one or several processes;
  this runs once per dataset, not per step.
  """
  model = nnx.merge(graphdef, *to_host((state.trainable, state.frozen)))
  cache = build_text_cache(model, category_texts(dataset))
  replicated = NamedSharding(mesh, P())

  def place(a):
    a = np.asarray(a)
    return jax.make_array_from_callback(a.shape, replicated, lambda index: a[index])

  return TextCache(place(cache.keypoint), place(cache.category))


# ----------------------------------------------------------------------------- forward
def make_forward(cache: TextCache, image_size: int):
  """`forward(model, batch) -> outputs`: cached text by category; device warp if crops given."""

  def forward(model, batch):
    if 'query_crop' in batch:
      image = warp_and_normalize(batch['query_crop'], batch['query_affine'], image_size)
    else:
      image = batch['query_image']
    keypoint_text, category_text = cache.lookup(batch['category_index'])
    return model(image, batch['support_mask'], batch['adjacency'],
                 keypoint_text=keypoint_text, category_text=category_text)

  return forward


def device_batch(batch: dict, mesh, keys=DEVICE_KEYS) -> dict:
  """The entries of a host batch the step reads, as global arrays split over the mesh."""
  return partition.shard_batch({k: batch[k] for k in keys if k in batch}, mesh)


def set_precision(config: ml_collections.ConfigDict) -> None:
  """For programs (eval.py, benchmarks): the process-wide matmul precision of the config."""
  jax.config.update('jax_default_matmul_precision', config.precision)


# ----------------------------------------------------------------------------- data
def data_files(config: ml_collections.ConfigDict, workdir: str) -> dict[str, str]:
  """{'train', 'val', 'test': annotation json, 'image_root'}; draws the synthetic set if asked.

  Synthetic data goes to `config.data.root` or `<workdir>/data`; process 0 draws it once and
  the others wait for it.
  """
  d = config.data
  if not d.synthetic.enabled:
    return dict(train=d.train_ann, val=d.val_ann, test=d.test_ann, image_root=d.image_root)
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


def pipeline_config(config: ml_collections.ConfigDict, *, train: bool):
  from data_pipeline.pipeline import PipelineConfig
  size = config.model.swin.img_size
  return PipelineConfig(shots=config.data.shots, image_size=size, heatmap_size=size // 4,
                        warp=config.data.warp, crop_size=size * 3 // 2,
                        augment=train and config.data.augment, seed=config.seed)

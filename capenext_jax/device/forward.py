"""The device-side forward of a pipeline batch, shared by the train step and the Evaluator.

Text comes from the frozen-text cache by `category_index`. The cache is an argument of the
jitted steps, not a constant closed over: a new cache of the same shape (another split, other
descriptions) reuses the compiled step, and the executable does not carry the embeddings.
When the host shipped uint8 crops and their 2x3 matrices (`warp='device'`) the warp and
ImageNet normalisation run here, inside the jitted step. The model's inputs keep the batch
split over the mesh (`partition.constrain_batch`, for FSDP).
"""
from __future__ import annotations

from typing import Protocol

from capenext_jax.device import partition
from capenext_jax.image_ops import warp_and_normalize

# Batch entries the jitted steps read; the rest of a host batch stays on the host.
DEVICE_KEYS = ('query_image', 'query_crop', 'query_affine', 'query_joints', 'query_weight',
               'support_mask', 'adjacency', 'category_index')


class TextRows(Protocol):
  """What the forward reads of a text cache (`text.cache.TextCache` is one; the text layer
  sits above this one, so it is named by what it does, not imported)."""

  def lookup(self, category_index):
    """(keypoint_text [B, K, D], category_text [B, D]) of each row's category."""


def make_forward(image_size: int):
  """`forward(model, batch, cache) -> outputs`: text rows of `cache` (a `TextRows`, e.g. a
  TextCache) by category; device warp if crops given."""

  def forward(model, batch, cache: TextRows):
    if 'query_crop' in batch:
      image = warp_and_normalize(batch['query_crop'], batch['query_affine'], image_size)
    else:
      image = batch['query_image']
    keypoint_text, category_text = cache.lookup(batch['category_index'])
    inputs = partition.constrain_batch((image, batch['support_mask'], batch['adjacency'],
                                        keypoint_text, category_text))
    return model(*inputs[:3], keypoint_text=inputs[3], category_text=inputs[4])

  return forward


def device_batch(batch: dict, mesh, keys=DEVICE_KEYS) -> dict:
  """The entries of a host batch the step reads, as global arrays split over the mesh."""
  return partition.shard_batch({k: batch[k] for k in keys if k in batch}, mesh)

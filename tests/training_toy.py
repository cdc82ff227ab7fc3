"""A tiny stand-in for CapeNext with DESIGN.md's call signature, for the training tests.

It has a frozen `clip` tower, dropout, and a trainable rest, which is all the generic
training machinery needs to see.
"""
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

S, K, E, B = 8, 4, 8, 4  # image size, keypoint slots, text width, batch


class ToyCapeNext(nnx.Module):

  def __init__(self, *, rngs: nnx.Rngs):
    self.clip = nnx.Linear(E, E, rngs=rngs)
    self.backbone = nnx.Linear(3, 16, rngs=rngs)
    self.text_proj = nnx.Linear(E, 16, rngs=rngs)
    self.dropout = nnx.Dropout(0.5, rngs=rngs)
    self.layers = nnx.List([nnx.Linear(16, 2, rngs=rngs) for _ in range(2)])

  def __call__(self, query_image, support_mask, adjacency, *, keypoint_text, category_text):
    img = self.backbone(query_image.mean(axis=(1, 2)))                  # [B, 16]
    text = self.clip(keypoint_text * support_mask[..., None])           # [B, K, E]
    text = text + self.clip(category_text)[:, None]
    feat = self.dropout(self.text_proj(text) + img[:, None])            # [B, K, 16]
    feat = feat + jnp.einsum('bkj,bjc->bkc', adjacency, feat) * 0.1
    kpts = jnp.stack([jax.nn.sigmoid(layer(feat)) for layer in self.layers])  # [L, B, K, 2]
    return {'keypoints': kpts, 'proposals': kpts[0]}


def toy_loss(outputs, batch):
  w = (batch['query_weight'] * batch['support_mask'])[..., None]
  target = batch['query_joints'] / S
  l1 = lambda p: (jnp.abs(p - target) * w).sum() / jnp.maximum(w.sum(), 1.0)
  terms = {'proposal_loss': l1(outputs['proposals']),
           'l1_loss_layer1': l1(outputs['keypoints'][-1])}
  terms['loss'] = sum(terms.values())
  return terms


def toy_batch(seed=0, batch=B):
  r = np.random.default_rng(seed)
  f32 = lambda *s: r.standard_normal(s).astype(np.float32)
  return {
      'query_image': f32(batch, S, S, 3),
      'support_mask': (r.random((batch, K)) > 0.2).astype(np.float32),
      'adjacency': (r.random((batch, K, K)) > 0.5).astype(np.float32),
      'keypoint_text': f32(batch, K, E),
      'category_text': f32(batch, E),
      'query_joints': (r.random((batch, K, 2)) * S).astype(np.float32),
      'query_weight': np.ones((batch, K), np.float32),
  }

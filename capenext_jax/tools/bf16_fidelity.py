"""bfloat16 against float32: how far the keypoints and losses of the same CapeNext weights move
when the model computes in bfloat16 (CapeNextConfig.dtype).

  python -m capenext_jax.tools.bf16_fidelity                         # the headline size, random
  python -m capenext_jax.tools.bf16_fidelity --backbone tiny --batch 8 --seed 1 [--perturb]
  python -m capenext_jax.tools.bf16_fidelity --fixture ../shared/fixtures/tiny_capenext.npz

Both passes run in eval mode on the same batch (a fixture's episodes, or random images and
unit text embeddings with 17 visible keypoints; --perturb adds noise to the parameters a
random model's initialisation leaves constant, see `perturb_constant_params`); float32 at matmul precision 'highest',
bfloat16 at 'default'. Prints one JSON line: the largest and the mean distance between the two
predictions over the counted keypoints (query and support visible), as a fraction of the crop
side, and each loss term's relative difference, with the bounds of `BOUNDS` and whether they
hold.

The decoder starts from a soft-argmax in the 3x3 window around the similarity map's arg-max.
Where two cells of a keypoint's map are nearly tied (common with random weights, whose maps
are flat), any rounding difference can pick the other cell and the prediction jumps by cells:
a discontinuity of the model, not an error that grows with the precision lost. Such keypoints
are counted apart ('argmax_moved', with their largest distance) and the distance bounds apply
to the others; 'ok' also asks that at most `MAX_MOVED` of the keypoints moved.
"""
from __future__ import annotations

import argparse
import json
import sys

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from capenext_jax import loading
from capenext_jax import losses as losses_lib
from capenext_jax.models.capenext import CapeNext, CapeNextConfig, with_compute
from capenext_jax.models.head import adjacency_from_skeleton
from capenext_jax.models.layers import init_rngs
from capenext_jax.mp100.geometry import heatmap_side
from capenext_jax.tools.check_parity import fixture_batch

# Largest / mean keypoint distance (fraction of the crop side), largest relative loss change.
BOUNDS = {'keypoint_max': 1e-2, 'keypoint_mean': 3e-3, 'loss_rel': 2e-2}
MAX_MOVED = 0.05   # fraction of the counted keypoints whose arg-max cell may differ
LOSS_TERMS = ('heatmap_loss', 'proposal_loss', 'loss')
MODEL_INPUTS = ('query_image', 'support_mask', 'adjacency', 'keypoint_text', 'category_text',
                'keypoint_tokens', 'category_tokens')


def random_batch(config: CapeNextConfig, batch_size: int, seed: int) -> dict[str, np.ndarray]:
  """Random images, unit text embeddings, a 17-keypoint chain skeleton, random targets."""
  rng = np.random.default_rng(seed)
  b, s, e = batch_size, config.image_size, config.clip.embed_dim
  unit = lambda x: (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)
  mask = np.zeros((b, 100), np.float32)
  mask[:, :17] = 1
  adjacency = adjacency_from_skeleton([[i, i + 1] for i in range(16)])
  return dict(query_image=rng.normal(size=(b, s, s, 3)).astype(np.float32), support_mask=mask,
              adjacency=np.broadcast_to(adjacency, (b, 100, 100)).copy(),
              keypoint_text=unit(rng.normal(size=(b, 100, e))),
              category_text=unit(rng.normal(size=(b, e))),
              query_joints=rng.uniform(0, s, (b, 100, 2)).astype(np.float32),
              query_weight=mask.copy())


def perturb_constant_params(model: CapeNext, seed: int) -> None:
  """In place: noise on every parameter tensor that the initialisation leaves constant
  (LayerNorm 1 / 0, zero biases, Swin V2's zeroed res-post-norms), N(0, 0.1) on 1-d tensors and
  N(0, 0.02) on the others, as the shared parity fixtures were made. Straight from its
  initialisation a Swin V2 is degenerate (every block is an identity, so the backbone is its
  patch embedding and merges) and every decoder layer predicts the same points."""
  rng = np.random.default_rng(seed)

  def perturb(p):
    a = np.asarray(p)
    if a.size > 1 and np.all(a == a.flat[0]):
      scale = 0.1 if a.ndim == 1 else 0.02
      return p + jnp.asarray(scale * rng.normal(size=a.shape), p.dtype)
    return p

  nnx.update(model, jax.tree.map(perturb, nnx.state(model, nnx.Param)))


def outputs_and_losses(model: CapeNext, batch: dict, heatmap_size: int, precision: str):
  """(last-layer keypoints [B, 100, 2], similarity arg-max [B, 100], loss terms) of `model` in
  eval mode, jitted."""
  graphdef, state = nnx.split(model)

  @jax.jit
  def run(state, batch):
    m = nnx.merge(graphdef, state)
    m.eval()
    out = m(*(batch[k] for k in MODEL_INPUTS[:3]),
            **{k: batch[k] for k in MODEL_INPUTS[3:] if k in batch})
    terms = losses_lib.capenext_losses(
        out, batch['query_joints'], batch['query_weight'], batch['support_mask'],
        image_size=m.config.image_size, heatmap_size=heatmap_size,
        target_heatmaps=batch.get('target_heatmaps'))
    sim = out['similarity']
    return out['keypoints'][-1], jnp.argmax(sim.reshape(*sim.shape[:2], -1), axis=-1), terms

  with jax.default_matmul_precision(precision):
    return jax.device_get(run(state, {k: jnp.asarray(v) for k, v in batch.items()}))


def compare(model: CapeNext, batch: dict, heatmap_size: int) -> dict:
  """Keypoint distances and relative loss differences of `model`'s weights computed in
  bfloat16 against float32 (see the module docstring), with `BOUNDS` and 'ok'."""
  kpt32, arg32, terms32 = outputs_and_losses(with_compute(model, dtype='float32'), batch,
                                              heatmap_size, 'highest')
  kpt16, arg16, terms16 = outputs_and_losses(with_compute(model, dtype='bfloat16'), batch,
                                              heatmap_size, 'default')
  counted = (np.asarray(batch['support_mask']) > 0) & (np.asarray(batch['query_weight']) > 0)
  moved = (arg32 != arg16)[counted]
  dist_all = np.linalg.norm(kpt16 - kpt32, axis=-1)[counted]
  dist = dist_all[~moved]
  rel = {k: float(abs(terms16[k] - terms32[k]) / max(abs(float(terms32[k])), 1e-12))
         for k in LOSS_TERMS}
  result = {'keypoint_max': float(dist.max()), 'keypoint_mean': float(dist.mean()),
            'loss_rel': max(rel.values()), 'loss_rel_by_term': rel,
            'loss_float32': float(terms32['loss']), 'loss_bfloat16': float(terms16['loss']),
            'keypoints_counted': int(counted.sum()), 'argmax_moved': int(moved.sum()),
            'argmax_moved_max': float(dist_all[moved].max()) if moved.any() else 0.0}
  result['ok'] = bool(all(result[k] <= bound for k, bound in BOUNDS.items()) and
                      moved.mean() <= MAX_MOVED)
  return {**result, 'bounds': BOUNDS}


def fixture_model_and_batch(path: str) -> tuple[CapeNext, dict, int]:
  """The fixture's model (its official weights), episodes and heatmap side."""
  z = np.load(path, allow_pickle=False)
  batch = fixture_batch(z)
  return loading.load_model(path), batch, batch['target_heatmaps'].shape[-1]


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--backbone', default='swinv2_t', help='a models/backbones.py preset')
  parser.add_argument('--fixture', help='a whole-model parity fixture instead of a random model')
  parser.add_argument('--batch', type=int, default=4)
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--perturb', action='store_true',
                      help='noise on the tensors the init leaves constant, as the parity '
                           'fixtures (`perturb_constant_params`); default: the init as is')
  args = parser.parse_args(argv)
  if args.fixture:
    model, batch, heatmap = fixture_model_and_batch(args.fixture)
    source = args.fixture
  else:
    config = CapeNextConfig.variant(args.backbone)
    model = CapeNext(config, rngs=init_rngs(args.seed))
    if args.perturb:
      perturb_constant_params(model, args.seed)
    batch = random_batch(config, args.batch, args.seed)
    heatmap = heatmap_side(config.image_size)
    source = f'random {args.backbone}' + (' (perturbed)' if args.perturb else '')
  result = compare(model, batch, heatmap)
  print(json.dumps({'model': source, 'batch': int(batch['query_image'].shape[0]), **result}))
  return 0 if result['ok'] else 1


if __name__ == '__main__':
  sys.exit(main())

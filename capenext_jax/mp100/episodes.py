"""Episode sampling: class-balanced training episodes and the official fixed val/test pairs.

An episode is a row of db indices ``[support_0, ..., support_{k-1}, query]``.

* Training (docs/MODEL.md §5.3): every category contributes ``M = max_c |cat2obj[c]|`` episodes
  per epoch, each ``k+1`` distinct instances of the category, then the epoch is shuffled. The
  draws are a pure function of ``(seed, epoch)`` so a run resumes at any step with the same
  episodes (and the same augmentation draws, see :func:`augmentation_params`).
* Evaluation (docs/MODEL.md §5.4): CPython ``random`` seeded with 1, for each category in table
  order and each of ``num_episodes`` episodes ``random.sample(cat2obj[c], k + num_queries)``;
  each query forms a pair with the shared supports. Identical to the official pairs for the
  same db order.
"""
from __future__ import annotations

import random

import numpy as np

from capenext_jax.mp100.annotations import MP100Dataset, check_episode_size

ROT_FACTOR = 15.0
SCALE_FACTOR = 0.15
ROT_PROB = 0.6


def _seed_words(seed: int, epoch: int, stream: int) -> list[int]:
  return [int(seed) & 0xFFFFFFFF, int(seed) >> 32 & 0xFFFFFFFF, int(epoch), int(stream)]


def training_episodes(dataset: MP100Dataset, shots: int, seed: int, epoch: int) -> np.ndarray:
  """Class-balanced episodes of one epoch: int64 [C * M, shots + 1] db indices, shuffled."""
  check_has_instances(dataset)
  check_episode_size(dataset, shots + 1, 'training episode')
  groups = dataset.cat2obj()
  m = max(len(g) for g in groups)
  seq = np.random.SeedSequence(_seed_words(seed, epoch, 0))
  py_rng = random.Random(int(seq.generate_state(2, np.uint64)[0]))
  out = np.empty((len(groups) * m, shots + 1), np.int64)
  row = 0
  for g in groups:
    pop = g.tolist()
    for _ in range(m):
      out[row] = py_rng.sample(pop, shots + 1)
      row += 1
  perm = np.random.default_rng(np.random.SeedSequence(_seed_words(seed, epoch, 1))).permutation(len(out))
  return out[perm]


def epoch_length(dataset: MP100Dataset) -> int:
  """Number of training episodes per epoch (C * max category size); a ValueError naming the
  file when it has nothing to train on."""
  check_has_instances(dataset)
  return dataset.num_categories * int(np.bincount(dataset.category_index).max())


def check_has_instances(dataset: MP100Dataset):
  """Raises ValueError naming the file and what it lacks: categories, annotations, or
  annotations that survived the filters."""
  if len(dataset):
    return
  if not dataset.num_categories:
    what = 'it has no categories'
  elif not dataset.dropped:
    what = 'it has no annotations (crowd ones are not instances)'
  else:
    what = f'all {len(dataset.dropped)} of its annotations were dropped (see the warning above)'
  raise ValueError(f'{dataset.ann_file}: no instances to train on: {what}')


def augmentation_params(seed: int, epoch: int, num_episodes: int, shots: int,
                        scale_factor: float = SCALE_FACTOR, rot_factor: float = ROT_FACTOR,
                        rot_prob: float = ROT_PROB) -> tuple[np.ndarray, np.ndarray]:
  """Random scale factor and rotation (degrees) per episode member, float64 [E, shots + 1].

  mmpose's TopDownGetRandomScaleRotation distributions: ``s = clip(N(0,1)*0.15 + 1, 0.85, 1.15)``,
  ``r = clip(N(0,1)*15, -30, 30)`` used with probability 0.6 (``U(0,1) <= 0.6``), else 0.
  """
  rng = np.random.default_rng(np.random.SeedSequence(_seed_words(seed, epoch, 2)))
  shape = (num_episodes, shots + 1)
  s = np.clip(rng.standard_normal(shape) * scale_factor + 1.0, 1.0 - scale_factor, 1.0 + scale_factor)
  r = np.clip(rng.standard_normal(shape) * rot_factor, -2.0 * rot_factor, 2.0 * rot_factor)
  r = np.where(rng.random(shape) <= rot_prob, r, 0.0)
  return s, r


def official_pairs(dataset: MP100Dataset, shots: int, num_episodes: int, num_queries: int) -> np.ndarray:
  """The official ``make_paired_samples``: int64 [C * num_episodes * num_queries, shots + 1]."""
  check_episode_size(dataset, shots + num_queries, 'evaluation episode')
  rng = random.Random(1)   # == random.seed(1) on the global generator
  rows = []
  for g in dataset.cat2obj():
    pop = g.tolist()
    for _ in range(num_episodes):
      drawn = rng.sample(pop, shots + num_queries)
      sup = drawn[:shots]
      for q in drawn[shots:]:
        rows.append(sup + [q])
  return np.asarray(rows, np.int64).reshape(-1, shots + 1)


def eval_mask(dataset: MP100Dataset, pairs: np.ndarray) -> np.ndarray:
  """bool [P, 100]: query visible AND every support visible (raw annotation, v > 0)."""
  vis = dataset.visible > 0
  return np.logical_and.reduce(vis[pairs], axis=1)

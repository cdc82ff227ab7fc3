"""Episode sampling: the official fixed pairs (docs/MODEL.md §5.4) and resumable training episodes."""
import random

import numpy as np
import pytest

from capenext_jax.evaluation.pairs import EvalPairs, EvalProtocol, pairs_of_file
from capenext_jax.mp100 import annotations as an
from capenext_jax.mp100 import episodes as ep


def _hand_built(n_per_cat=(20, 18, 25), k=(3, 4, 5), seed=0):
  """Images interleave categories so that db order != per-category JSON order."""
  rng = np.random.default_rng(seed)
  cats = [{'id': 90 + c, 'name': f'c{c}', 'supercategory': 's', 'keypoints': [f'k{i}' for i in range(k[c])],
           'skeleton': [[0, 1]]} for c in range(len(k))]
  images, anns = [], []
  labels = np.concatenate([np.full(n, c) for c, n in enumerate(n_per_cat)])
  rng.shuffle(labels)
  aid = 10 ** 16
  for i, c in enumerate(labels):
    iid = 10 ** 16 + 1000 + i
    images.append({'id': iid, 'file_name': f'{i}.jpg', 'width': 200, 'height': 150})
    # some images hold two instances
    for _ in range(1 + (i % 3 == 0)):
      kp = []
      for _j in range(k[c]):
        v = int(rng.integers(0, 3))
        kp += [float(rng.uniform(0, 199)), float(rng.uniform(0, 149)), v] if v else [0, 0, 0]
      kp[2] = 2
      kp[0], kp[1] = 5.0, 5.0
      anns.append({'id': aid, 'image_id': iid, 'category_id': 90 + int(c), 'bbox': [1, 2, 50, 40],
                   'keypoints': kp, 'num_keypoints': sum(1 for v in kp[2::3] if v), 'area': 10,
                   'iscrowd': 0})
      aid += 1
  # one annotation listed before its image, one crowd, one unlabeled: order/filters matter
  anns.insert(0, anns.pop(len(anns) // 2))
  anns.append(dict(anns[1], id=aid + 1, iscrowd=1))
  anns.append(dict(anns[1], id=aid + 2, keypoints=[0] * len(anns[1]['keypoints'])))
  return {'images': images, 'annotations': anns, 'categories': cats}


def _spec_pairs(data, shots, num_episodes, num_queries):
  """Independent rendering of make_paired_samples over the xtcocotools db order."""
  img_to_anns = {}
  for a in data['annotations']:
    img_to_anns.setdefault(a['image_id'], []).append(a)
  db = []
  for img in data['images']:
    for a in img_to_anns.get(img['id'], []):
      if a['iscrowd'] or max(a['keypoints']) == 0:
        continue
      db.append(a)
  cat2obj = {c['id']: [] for c in data['categories']}
  for i, a in enumerate(db):
    cat2obj[a['category_id']].append(i)
  random.seed(1)
  np.random.seed(0)
  pairs = []
  for c in data['categories']:
    for _ in range(num_episodes):
      s = random.sample(cat2obj[c['id']], shots + num_queries)
      for q in s[shots:]:
        pairs.append(s[:shots] + [q])
  return db, pairs


@pytest.mark.parametrize('shots', [1, 5])
def test_official_pairs_and_eval_arrays(shots):
  data = _hand_built()
  d = an.load_annotations('hand.json', '', data=data)
  db, pairs = _spec_pairs(data, shots, num_episodes=7, num_queries=4)
  assert [a['id'] for a in db] == d.ann_id.tolist()
  got = ep.official_pairs(d, shots, 7, 4)
  np.testing.assert_array_equal(got, np.array(pairs))
  out = EvalPairs.build(d, EvalProtocol(shots=shots, num_episodes=7, num_queries=4)).arrays
  n = len(pairs)
  assert out['support_ann_ids'].shape == (n, shots) and out['support_ann_ids'].dtype == np.int64
  assert out['query_ann_id'].dtype == np.int64 and out['query_ann_id'].shape == (n,)
  assert out['bbox_thr'].dtype == np.float64 and out['mask'].shape == (n, 100)
  for i, p in enumerate(pairs):
    assert out['query_ann_id'][i] == db[p[-1]]['id']
    assert out['support_ann_ids'][i].tolist() == [db[j]['id'] for j in p[:-1]]
    m = np.zeros(100, bool)
    k = len(db[p[-1]]['keypoints']) // 3
    m[:k] = True
    for j in p:
      m[:k] &= np.array(db[j]['keypoints'][2::3]) > 0
    np.testing.assert_array_equal(out['mask'][i], m)
    assert out['bbox_thr'][i] == 49.0   # max(w - 1, h - 1) of the clean box


def test_eval_pairs_from_path_without_images(tmp_path):
  import json
  data = _hand_built()
  p = tmp_path / 'x.json'
  p.write_text(json.dumps(data))
  out = pairs_of_file(str(p), EvalProtocol(shots=1, num_episodes=3, num_queries=2))
  _, pairs = _spec_pairs(data, 1, 3, 2)
  np.testing.assert_array_equal(out.pairs, np.array(pairs))


def test_training_episodes_balanced_and_resumable():
  d = an.load_annotations('hand.json', '', data=_hand_built())
  e0 = ep.training_episodes(d, 1, seed=3, epoch=0)
  m = np.bincount(d.category_index).max()
  assert e0.shape == (3 * m, 2) == (ep.epoch_length(d), 2)
  cats = d.category_index[e0]
  assert (cats == cats[:, :1]).all()                      # one category per episode
  assert (np.bincount(cats[:, 0]) == m).all()             # class balanced
  assert (e0[:, 0] != e0[:, 1]).all()                     # distinct instances
  np.testing.assert_array_equal(e0, ep.training_episodes(d, 1, seed=3, epoch=0))
  assert not np.array_equal(e0, ep.training_episodes(d, 1, seed=3, epoch=1))
  assert not np.array_equal(e0, ep.training_episodes(d, 1, seed=4, epoch=0))
  s, r = ep.augmentation_params(3, 0, 5000, 1)
  s2, r2 = ep.augmentation_params(3, 0, 5000, 1)
  np.testing.assert_array_equal(s, s2)
  assert s.min() >= 0.85 and s.max() <= 1.15 and np.abs(r).max() <= 30
  assert abs((r == 0).mean() - 0.4) < 0.03

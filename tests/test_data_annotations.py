"""Annotation reader / validator on the real mp100_mini files and on hand-built bad inputs."""
import copy
import json
import os

import numpy as np
import pytest

from capenext_jax.mp100 import annotations as an
from capenext_jax.mp100.descriptions import regular_descriptions
from conftest import MP100_MINI, REPO

MINI = str(MP100_MINI)
TRAIN = os.path.join(MINI, 'annotations', 'mini_train.json')
TEST = os.path.join(MINI, 'annotations', 'mini_test.json')


def test_mini_train_loads_with_exact_ids():
  d = an.load_annotations(TRAIN, os.path.join(MINI, 'images'), drop_missing_images=True)
  raw = json.load(open(TRAIN))
  assert len(d) == 47 and d.num_categories == 6
  assert d.ann_id.dtype == np.int64
  # db order: images in JSON order, then their annotations in JSON order
  order = []
  for img in raw['images']:
    order += [a['id'] for a in raw['annotations'] if a['image_id'] == img['id']]
  assert [int(v) for v in d.ann_id] == order
  big = [a['id'] for a in raw['annotations'] if a['id'] > 2 ** 53]
  assert big and set(big) <= set(int(v) for v in d.ann_id)
  assert d.category_ids.tolist() == [c['id'] for c in raw['categories']]
  assert all(os.path.exists(p) for p in d.image_path)


def test_center_scale_and_bbox_cleaning_float64():
  d = an.load_annotations(TRAIN, '')
  raw = json.load(open(TRAIN))
  by_id = {a['id']: a for a in raw['annotations']}
  imgs = {i['id']: i for i in raw['images']}
  for i in range(len(d)):
    a = by_id[int(d.ann_id[i])]
    img = imgs[a['image_id']]
    x, y, w, h = a['bbox']
    x1, y1 = max(0, x), max(0, y)
    x2 = min(img['width'] - 1, x1 + max(0, w - 1))
    y2 = min(img['height'] - 1, y1 + max(0, h - 1))
    cw, ch = x2 - x1, y2 - y1
    np.testing.assert_array_equal(d.bbox[i], [x1, y1, cw, ch])
    side = max(cw, ch)
    np.testing.assert_allclose(d.center[i], [x1 + cw / 2, y1 + ch / 2], rtol=0, atol=1e-12)
    np.testing.assert_allclose(d.scale[i], [side / 200 * 1.25] * 2, rtol=0, atol=1e-12)
    assert d.bbox_thr[i] == side
    k = len(a['keypoints']) // 3
    kp = np.array(a['keypoints'], float).reshape(-1, 3)
    np.testing.assert_array_equal(d.joints[i, :k], kp[:, :2])
    np.testing.assert_array_equal(d.visible[i, :k], np.minimum(1, kp[:, 2]))
    assert not d.joints[i, k:].any() and not d.visible[i, k:].any()


def test_descriptions_and_category_table():
  d = an.load_annotations(TRAIN, '')
  face40 = d.category_ids.tolist().index(40)
  table = json.load(open(os.path.join(REPO, 'capenext_jax', 'mp100', 'regular_descriptions.json')))
  assert d.descriptions[face40] == table['lists']['id==40']
  hand = d.raw_category_names.index('hand')
  assert d.descriptions[hand] == table['lists']['name==hand']
  mpii = d.raw_category_names.index('person_mpii')
  raw = json.load(open(TRAIN))
  cat = [c for c in raw['categories'] if c['name'] == 'person_mpii'][0]
  assert d.descriptions[mpii] == [k.replace('_', ' ') for k in cat['keypoints']]
  assert d.category_names[d.raw_category_names.index('long_sleeved_dress')] == 'long sleeved dress'
  t = d.category_table()
  assert t['descriptions'].shape == (6, 100) and t['adjacency'].shape == (6, 100, 100)
  assert (t['adjacency'] == np.swapaxes(t['adjacency'], 1, 2)).all()
  for c in range(6):
    k = t['num_keypoints'][c]
    assert (t['descriptions'][c, k:] == '').all() and (t['descriptions'][c, :k] != '').all()
    assert t['adjacency'][c, k:].sum() == 0
    for a, b in d.skeletons[c]:
      assert t['adjacency'][c, a, b] == 1
  # MP-100's own categories (id and name) get the table by its rules ...
  assert regular_descriptions({'id': 4, 'name': 'fennecfox_face', 'supercategory': 'animal_face',
                               'keypoints': []}) == table['lists']['supercategory==animal_face']
  # ... a user's category never does, whatever its id, name or supercategory matches.
  for user in ({'id': 18, 'name': 'okapi'}, {'id': 500, 'name': 'car', 'supercategory': 'vehicle'},
               {'id': 501, 'name': 'table'}, {'id': 1, 'name': 'fly', 'supercategory': 'animal_face'}):
    assert regular_descriptions(dict(user, keypoints=['left_ear', 'tail'])) == ['left ear', 'tail']


def _base():
  return {
      'images': [{'id': 2 ** 60 + 1, 'file_name': 'a.jpg', 'width': 100, 'height': 80}],
      'annotations': [{'id': 2 ** 60 + 7, 'image_id': 2 ** 60 + 1, 'category_id': 5,
                       'bbox': [10, 10, 30, 20], 'keypoints': [12, 12, 2, 20, 15, 1, 0, 0, 0],
                       'num_keypoints': 2, 'area': 600, 'iscrowd': 0}],
      'categories': [{'id': 5, 'name': 'thing', 'supercategory': 'x',
                      'keypoints': ['a_b', 'c', 'd'], 'skeleton': [[0, 1], [1, 2]]}],
  }


def _load(data):
  return an.load_annotations('bad.json', '', data=data)


def _set_k(data, k, **category):
  """The category gets k names (and `category` fields), its annotation k keypoints."""
  data['categories'][0].update(keypoints=[f'k{i}' for i in range(k)], **category)
  data['annotations'][0]['keypoints'] = [12, 12, 2] * k


@pytest.mark.parametrize('cid, name, k, names', [
    (18, 'face', 19, []),       # split-4 val / split-5 test: empty list, K from the annotations
    (40, 'face', 68, []),       # split-4 test
    (66, 'fly', 32, ['n'] * 33),  # more names than keypoints: the extra one is never used
    (5, 'thing', 2, ['a', 'b', 'c']),
])
def test_keypoint_count_comes_from_the_annotations(cid, name, k, names):
  data = _base()
  data['categories'][0].update(id=cid, name=name, supercategory='x', keypoints=names,
                               skeleton=[[0, k - 1]])
  data['annotations'][0].update(category_id=cid, keypoints=[12, 12, 2] * k)
  d = _load(data)
  assert d.category_num_keypoints.tolist() == [k] and d.num_keypoints.tolist() == [k]
  assert int(d.visible[0].sum()) == k
  want = regular_descriptions(data['categories'][0])   # the table's list, or the own names
  assert d.descriptions[0] == want and len(want) >= k
  assert d.category_table()['descriptions'][0, :k].tolist() == want[:k]
  if name == 'thing':   # no table entry: its own names, of which the first K are used
    assert want == names
  else:                 # the table's lists (19 and 68 names for the faces, 33 for the fly)
    assert len(want) == {19: 19, 68: 68, 32: 33}[k] and want != names


def test_good_hand_built_file():
  d = _load(_base())
  assert int(d.ann_id[0]) == 2 ** 60 + 7 and d.descriptions[0] == ['a b', 'c', 'd']


@pytest.mark.parametrize('mutate, pattern', [
    (lambda d: d['categories'][0].pop('skeleton'), r'bad.json: category #0 .*missing field "skeleton"'),
    (lambda d: d['annotations'][0].pop('category_id'), r'annotation #0 \(id=1152921504606846983\): missing field "category_id"'),
    (lambda d: d['images'][0].pop('width'), r'image #0 .*missing field "width"'),
    (lambda d: d.pop('annotations'), r'missing field "annotations"'),
    (lambda d: d['annotations'][0]['keypoints'].append(1), r'id=1152921504606846983.*field "keypoints" has 10 numbers.*K=3'),
    (lambda d: d['categories'][0]['skeleton'].append([1, 3]), r'category #0 \(id=5.*field "skeleton" edge \[1, 3\] out of range'),
    (lambda d: _set_k(d, 101), r'category #0.*101 keypoints, more than max_kpt_num=100'),
    (lambda d: (_set_k(d, 34, id=66, name='fly'), d['annotations'][0].update(category_id=66)),
     r'category #0 \(id=66, name=\'fly\'\).*description table \(name==fly\) has only 33 names for K=34'),
    # K comes from the annotations; the names must still cover it when no table entry does.
    (lambda d: d['categories'][0].update(keypoints=[]), r'category #0 \(id=5, name=\'thing\'\): field "keypoints" has only 0 names for K=3'),
    (lambda d: d['categories'][0].update(keypoints=['a', 'b']), r'category #0 \(id=5.*field "keypoints" has only 2 names for K=3'),
    (lambda d: d['annotations'].append(dict(d['annotations'][0], id=8, keypoints=[1, 1, 1] * 4)),
     r'category #0 \(id=5.*annotations disagree on the keypoint count K: annotation id=1152921504606846983 has 3 keypoints, annotation id=8 has 4'),
    (lambda d: (d['categories'][0].update(keypoints=[]), d['annotations'][0].pop('keypoints')),
     r'category #0 \(id=5.*field "keypoints" is empty and no annotation of the category has keypoints \(K unknown\)'),
    (lambda d: d['annotations'][0].update(category_id=9), r'annotation #0 .*field "category_id"=9 is not a category'),
    (lambda d: d['annotations'][0].update(id=1.5), r'field "id" must be an integer'),
])
def test_bad_inputs_name_the_place(mutate, pattern):
  data = copy.deepcopy(_base())
  mutate(data)
  with pytest.raises(ValueError, match=pattern):
    _load(data)


def test_record_filters():
  data = _base()
  a = data['annotations'][0]
  variants = [dict(bbox=[10, 10, 0.5, 20]), dict(area=0), dict(keypoints=[0] * 9), dict(num_keypoints=0),
              dict(iscrowd=1), dict(bbox=[10, 10, -5, 20]), dict(bbox=[10, 79.5, 30, 20])]
  for v in variants:
    d = copy.deepcopy(data)
    d['annotations'][0].update(v)
    assert len(_load(d)) == 0, v
  d = copy.deepcopy(data)
  d['annotations'][0].pop('bbox')
  assert len(_load(d)) == 0
  assert len(_load(data)) == 1 and a['bbox'] == [10, 10, 30, 20]


def test_too_few_instances_and_missing_images(tmp_path):
  from capenext_jax.mp100 import episodes as ep
  d = _load(_base())
  with pytest.raises(ValueError, match=r'category id=5 \(thing\) has 1 instances'):
    ep.official_pairs(d, 1, 1, 1)
  with pytest.raises(ValueError, match='thing'):
    ep.training_episodes(d, 1, 0, 0)
  p = tmp_path / 'a.json'
  p.write_text(json.dumps(_base()))
  with pytest.warns(an.DataWarning, match=r'a.json: dropped 1 annotations \(the official filters '
                    r'and the reader.s checks\): 1 with image missing under .* '
                    r'\(ids 1152921504606846983\)'):
    dropped = an.load_annotations(str(p), str(tmp_path), drop_missing_images=True)
  assert len(dropped) == 0 and dropped.dropped == [
      (f'image missing under {str(tmp_path)!r}', 1152921504606846983, 5)]
  with pytest.raises(ValueError, match=r'\(thing\) has 0 instances \(1 more were dropped, see '):
    ep.official_pairs(dropped, 1, 1, 1)
  assert len(an.load_annotations(str(p), str(tmp_path), drop_missing_images=False)) == 1

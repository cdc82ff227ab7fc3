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
    # Malformed values that once crashed inside the checks with a TypeError.
    (lambda d: d['annotations'][0].update(category_id={}), r'annotation #0 .*field "category_id" must be an integer, got \{\}'),
    (lambda d: d['annotations'][0].update(area='x'), r'annotation #0 .*field "area" must be a number, got \'x\''),
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


# ------------------------------------------------- real-format files through split_categories
def coco_family(tmp_path, counts=(3, 3, 3), skeleton=((1, 2), (2, 3), (3, 4)), **cat_fields):
  """A COCO-family file as the AP-10K / ATRW / COCO releases write it: 1-based skeletons (an
  edge uses index K=4), no "supercategory"; `counts` instances per category on 192 px images
  (all written under `tmp_path/images`). Returns (path, the parsed dict)."""
  from PIL import Image
  (tmp_path / 'images').mkdir(parents=True, exist_ok=True)
  Image.new('RGB', (192, 192)).save(tmp_path / 'images' / 'a.jpg')
  coco = {'images': [], 'annotations': [], 'categories': []}
  for c, (name, n) in enumerate(zip(('antelope', 'jaguar', 'tiger'), counts), 1):
    coco['categories'].append(dict({'id': c, 'name': name, 'keypoints': ['nose', 'l_eye',
                                    'r_eye', 'tail'], 'skeleton': [list(e) for e in skeleton]},
                                   **cat_fields))
    for i in range(n):
      iid = 100 * c + i
      coco['images'].append({'id': iid, 'file_name': 'a.jpg', 'width': 192, 'height': 192})
      coco['annotations'].append({'id': iid, 'image_id': iid, 'category_id': c, 'iscrowd': 0,
                                  'bbox': [10, 10, 150, 150], 'num_keypoints': 4,
                                  'keypoints': [20, 20, 2, 40, 30, 2, 60, 30, 1, 150, 150, 2]})
  path = tmp_path / 'ap10k.json'
  path.write_bytes(json.dumps(coco).encode())
  return path, coco


def split_categories(capsys, path, *args):
  """(exit status, stdout, stderr) of the user's command; the input file must be unchanged."""
  from capenext_jax.tools import split_categories as tool
  before = path.read_bytes()
  status = tool.main([str(path), '--image_root', str(path.parent / 'images'), *args])
  out, err = capsys.readouterr()
  assert path.read_bytes() == before
  return status, out, err


def test_coco_family_file_splits_with_0_based_skeletons(tmp_path, capsys):
  path, _ = coco_family(tmp_path)
  status, out, err = split_categories(capsys, path, '--val', 'jaguar', '--test', 'tiger',
                                      '--out_dir', str(tmp_path / 'out'))
  assert status == 0, err
  assert 'antelope: K=4, 3 instances' in out
  for split in ('train', 'val', 'test'):
    written = json.loads((tmp_path / 'out' / f'ap10k_{split}.json').read_text())
    assert written['skeleton_base'] == 0
    assert [c['skeleton'] for c in written['categories']] == [[[0, 1], [1, 2], [2, 3]]]
    assert an.load_annotations(str(tmp_path / 'out' / f'ap10k_{split}.json')).skeletons == [
        [(0, 1), (1, 2), (2, 3)]]
    assert 'supercategory' not in written['categories'][0]
  # the input read directly: the same 0-based edges
  assert an.load_annotations(str(path)).skeletons == [[(0, 1), (1, 2), (2, 3)]] * 3


def test_skeleton_base_detection_rule(tmp_path, capsys):
  k = 4
  base = lambda edges: an.skeleton_base([(edges, k)], 'f.json')
  assert base([(0, 1)]) == 0 and base([(1, k)]) == 1 and base([]) == 0
  with pytest.raises(ValueError, match='no edge uses index 0 or index K.*--skeleton_base'):
    base([(1, 2)])
  # through the program: refused naming the flag, then read as told
  path, _ = coco_family(tmp_path, skeleton=((1, 2), (2, 3)))
  status, _, err = split_categories(capsys, path)
  assert status == 2 and err.count('\n') == 1
  assert f'{path}: cannot tell whether' in err and '--skeleton_base 0 or 1' in err
  status, _, err = split_categories(capsys, path, '--skeleton_base', '1')
  assert status == 0, err
  assert an.load_annotations(str(path), skeleton_base=1).skeletons[0] == [(0, 1), (1, 2)]
  assert an.load_annotations(str(path), skeleton_base=0).skeletons[0] == [(1, 2), (2, 3)]


def test_every_invalid_category_in_one_error(tmp_path, capsys):
  path, coco = coco_family(tmp_path)
  coco['categories'][0]['keypoints'] = ['nose']          # 1 name for K=4
  coco['categories'][2]['skeleton'].append([4, 9])       # out of range (1-based: [1, 5))
  coco['categories'][1]['keypoints'][2] = ''             # an empty name
  path.write_text(json.dumps(coco))
  status, _, err = split_categories(capsys, path)
  assert status == 2 and err.count('\n') == 1, err
  assert '3 problems' in err
  assert "category #0 (id=1, name='antelope'): field \"keypoints\" has only 1 names for K=4" in err
  assert "category #1 (id=2, name='jaguar')" in err and 'keypoint 2 has an empty name' in err
  assert "category #2 (id=3, name='tiger'): field \"skeleton\" edge [4, 9] out of range [1, 5)" in err


def test_too_few_instances_and_no_train_split_are_refused(tmp_path, capsys):
  path, _ = coco_family(tmp_path, counts=(3, 1, 1))
  status, _, err = split_categories(capsys, path, '--val', 'jaguar', '--test', 'tiger',
                                    '--out_dir', str(tmp_path / 'out'))
  assert status == 2 and err.count('\n') == 1
  assert 'category id=2 (jaguar) has 1 instances; category id=3 (tiger) has 1 instances' in err
  assert 'too few instances for a 1-shot episode of 2' in err and not (tmp_path / 'out').exists()
  path, _ = coco_family(tmp_path, counts=(3, 3, 3))
  status, _, err = split_categories(capsys, path, '--shots', '3')
  assert status == 2 and 'category id=1 (antelope) has 3 instances' in err
  status, _, err = split_categories(capsys, path, '--val', 'antelope,jaguar', '--test', 'tiger',
                                    '--out_dir', str(tmp_path / 'none'))
  assert status == 2 and 'none is left to train on' in err
  assert not (tmp_path / 'none').exists()


def test_dropped_annotations_warn_in_one_plain_line(tmp_path, capsys):
  path, coco = coco_family(tmp_path, counts=(4, 3, 3))
  coco['annotations'][0]['image_id'] = 999                        # not an image
  coco['annotations'][1]['keypoints'][:3] = [5000, -3000, 2]      # far outside its 192 px image
  coco['annotations'][2]['keypoints'][:3] = [-30, 200, 2]         # slightly outside: kept
  path.write_text(json.dumps(coco))
  status, out, err = split_categories(capsys, path)
  assert status == 0, err
  assert err.splitlines() == [
      f'warning: {path}: dropped 2 annotations (the official filters and the reader\'s checks): '
      '1 with an image_id that is not in "images" (ids 100); 1 with a labelled keypoint far '
      'outside its image (ids 101)']
  assert 'antelope: K=4, 2 instances' in out


@pytest.mark.parametrize('v', [-1, 0.5, 3])
def test_visibility_outside_0_1_2_is_refused(tmp_path, capsys, v):
  path, coco = coco_family(tmp_path)
  coco['annotations'][4]['keypoints'][3 * 2 + 2] = v
  coco['annotations'][5]['keypoints'][2] = v
  path.write_text(json.dumps(coco))
  status, _, err = split_categories(capsys, path)
  assert status == 2 and err.count('\n') == 1
  assert (f'{path}: annotation #4 (id=201): keypoint 2 has visibility v={v!r} in field '
          '"keypoints" (want 0: not labelled, 1 or 2: labelled) (1 more annotations') in err


def test_keypoint_name_longer_than_clip_is_refused_by_every_reader(tmp_path, capsys):
  path, coco = coco_family(tmp_path)
  coco['categories'][1]['keypoints'][3] = 'the very tip of the tail ' * 13   # 78 + 2 tokens
  path.write_text(json.dumps(coco))
  status, _, err = split_categories(capsys, path)
  assert status == 2
  assert err.count('\n') == 1 and ("category #1 (id=2, name='jaguar'): the category's "
                                   "\"keypoints\" names: keypoint 3 name 'the very tip of the "
                                   "tail the very tip of'... is 80 CLIP tokens long, more than "
                                   "CLIP's 77") in err
  with pytest.raises(ValueError, match="keypoint 3 name .* more than CLIP's 77"):
    an.load_annotations(str(path))            # train.py and eval.py read through here
  from capenext_jax.mp100 import text_variants
  ok = an.load_annotations(str(coco_family(tmp_path / 'ok')[0]))
  names = tmp_path / 'names.json'
  names.write_text(json.dumps({'1': ['a', 'b', 'c', 'x ' * 80]}))
  with pytest.raises(ValueError, match="keypoint 3 name .* more than CLIP's 77"):
    text_variants.apply_descriptions(ok, str(names))   # eval --descriptions FILE


@pytest.mark.parametrize('encoding', ['utf-8-sig', 'utf-16', 'utf-16-be', 'utf-32'])
def test_utf16_and_bom_files_read_as_utf8(tmp_path, capsys, encoding):
  path, coco = coco_family(tmp_path)
  coco['categories'][0]['keypoints'][0] = 'nez (museau)'
  coco['categories'][0]['keypoints'][1] = 'œil gauche'
  text = json.dumps(coco, ensure_ascii=False)
  raw = text.encode(encoding)
  if encoding == 'utf-16-be':   # python's utf-16-be writes no BOM: add it
    raw = b'\xfe\xff' + raw
  path.write_bytes(raw)
  status, out, err = split_categories(capsys, path)
  assert status == 0, err
  assert an.load_annotations(str(path)).descriptions[0][:2] == ['nez (museau)', 'œil gauche']


def test_latin1_file_is_refused_naming_file_and_encoding(tmp_path, capsys):
  path, coco = coco_family(tmp_path)
  coco['categories'][0]['keypoints'][1] = 'œil gauche'.replace('œ', 'é')
  path.write_bytes(json.dumps(coco, ensure_ascii=False).encode('latin-1'))
  status, _, err = split_categories(capsys, path)
  assert status == 2 and err.count('\n') == 1
  assert f'{path}: not UTF-8 text (byte 0xe9 at offset' in err and 'latin-1' in err
  path.write_bytes(json.dumps(coco).encode('utf-16-le'))   # UTF-16 without its BOM
  status, _, err = split_categories(capsys, path)
  assert status == 2 and 'UTF-16 without a byte-order mark' in err


def test_mp100_table_only_for_mp100_categories_and_sources_reported(tmp_path):
  from capenext_jax.mp100 import text_variants
  path, coco = coco_family(tmp_path)
  coco['categories'][0].update(id=18, name='okapi')              # MP-100's id 18 is "face"
  coco['categories'][1].update(name='table')                     # an MP-100 rule's name
  coco['categories'][2].update(supercategory='vehicle')          # an MP-100 rule's supercategory
  for a in coco['annotations']:
    a['category_id'] = {1: 18}.get(a['category_id'], a['category_id'])
  path.write_text(json.dumps(coco))
  d = an.load_annotations(str(path))
  assert d.descriptions == [['nose', 'l eye', 'r eye', 'tail']] * 3
  _, record = text_variants.apply_text_options(d)       # eval.py's report info gets this
  assert record['description_sources'] == {str(c): 'the category\'s "keypoints" names'
                                           for c in (18, 2, 3)}
  mini = an.load_annotations(TEST)                      # real MP-100 categories: the table
  _, record = text_variants.apply_text_options(mini)
  assert record['description_sources']['18'] == 'MP-100 description table (id==18)'
  assert record['description_sources']['102'] == 'the category\'s "keypoints" names'


def test_split_with_nothing_usable_names_the_file():
  from capenext_jax.mp100 import episodes as ep
  data = _base()
  data['annotations'][0]['bbox'] = [10, 10, 0, 0]
  empty = an.load_annotations('train.json', '', data=data)
  with pytest.raises(ValueError, match=r'^train.json: no instances to train on: all 1 of its '
                     r'annotations were dropped'):
    ep.epoch_length(empty)
  data['annotations'] = []
  with pytest.raises(ValueError, match='train.json: no instances to train on: it has no annot'):
    ep.epoch_length(an.load_annotations('train.json', '', data=data))


def test_a_workdir_from_before_skeleton_base_resumes():
  """config.data.skeleton_base (None: detected) added since: an older config.json lacks it."""
  from capenext_jax.training.workdir import config_changes
  assert config_changes({'data': {'shots': 1}}, {'data': {'shots': 1, 'skeleton_base': None}}) == []
  assert config_changes({'data': {}}, {'data': {'skeleton_base': 1}}) == [
      "data.skeleton_base: '<absent>' -> 1"]


def test_train_on_a_split_with_nothing_usable_names_the_file(tmp_path):
  """train.py itself (it fails before building a model): exit 2, one line naming the file."""
  import subprocess
  import sys
  path, coco = coco_family(tmp_path, counts=(2, 0, 0))
  for a in coco['annotations']:
    a['bbox'] = [10, 10, 0, 0]          # every annotation dropped by the official filters
  path.write_text(json.dumps(coco))
  before = path.read_bytes()
  proc = subprocess.run(
      [sys.executable, str(REPO / 'train.py'), f'--workdir={tmp_path / "run"}',
       f'--config={REPO}/configs/mp100.py:runlocal,root={tmp_path}',
       f'--config.data.train_ann={path}', '--config.data.val_ann=', '--config.data.test_ann=',
       f'--config.data.image_root={tmp_path / "images"}'],
      env=dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=str(REPO)), capture_output=True,
      text=True, timeout=300)
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert f'train.py: error: {path}: no instances to train on: all 2 of its annotations were ' \
         'dropped' in proc.stderr
  # Before the error, the reader's warning as one plain line (not Python's warning format).
  assert any(line.startswith(f'warning: {path}: dropped 2 annotations')
             for line in proc.stderr.splitlines()), proc.stderr
  assert 'DataWarning' not in proc.stderr and 'warnings.warn' not in proc.stderr
  assert path.read_bytes() == before


def test_mp100_mini_loses_nothing_to_the_new_checks():
  """The far-outside rule keeps real data (labelled points slightly outside stay): every
  mp100_mini annotation loads, none dropped."""
  for path in (TRAIN, TEST):
    raw = json.load(open(path))
    d = an.load_annotations(path)
    assert d.dropped == [] and len(d) == len(raw['annotations'])

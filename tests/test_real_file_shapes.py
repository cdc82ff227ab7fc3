"""The shapes of the real MP-100 files that the official config reads, end to end.

In `mp100_split{4,5}_{val,test}.json` both `face` categories (id 18: 19 keypoints, id 40: 68)
have an empty `keypoints` name list, and `fly` (32 keypoints) has more names in the
description table than keypoints. K comes from the annotations' keypoint arrays and the names
from the description table, so a file with empty name lists must give exactly what the same
file with its lists filled in gives: the same pairs, scores, model outputs and training batches.
"""
import json
import os

import numpy as np

from conftest import FIXTURES, MP100_MINI
from capenext_jax.mp100.descriptions import regular_descriptions

IMAGES = MP100_MINI / 'images'


def real_shapes(tmp_path):
  """(blank, filled): mini_test plus the 68-point face of mini_train; in `blank` both faces
  have an empty name list, as in the real files; in both, fly lists the table's 33 names."""
  test = json.loads((MP100_MINI / 'annotations' / 'mini_test.json').read_text())
  train = json.loads((MP100_MINI / 'annotations' / 'mini_train.json').read_text())
  test['categories'] += [c for c in train['categories'] if c['id'] == 40]
  face68 = [a for a in train['annotations'] if a['category_id'] == 40]
  test['annotations'] += face68
  test['images'] += [im for im in train['images'] if im['id'] in {a['image_id'] for a in face68}]
  for c in test['categories']:
    if c['name'] == 'fly':
      c['keypoints'] = regular_descriptions(c)
      assert len(c['keypoints']) == 33
  filled = tmp_path / 'filled.json'
  filled.write_text(json.dumps(test))
  for c in test['categories']:
    if c['id'] in (18, 40):
      c['keypoints'] = []
  blank = tmp_path / 'blank.json'
  blank.write_text(json.dumps(test))
  return blank, filled


def test_reader_takes_k_from_the_annotations(tmp_path):
  from capenext_jax.mp100.annotations import load_annotations
  blank, filled = real_shapes(tmp_path)
  a = load_annotations(str(blank), str(IMAGES))
  b = load_annotations(str(filled), str(IMAGES))
  assert dict(zip(a.category_ids.tolist(), a.category_num_keypoints.tolist())) == {
      66: 32, 18: 19, 102: 15, 103: 8, 40: 68}
  assert a.descriptions == b.descriptions
  for name in ('ann_id', 'joints', 'visible', 'num_keypoints', 'bbox'):
    np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
  np.testing.assert_array_equal(a.category_table()['descriptions'],
                                b.category_table()['descriptions'])


def test_export_and_score_episodes(tmp_path):
  from capenext_jax.evaluation.pairs import EvalProtocol, export_episodes, pairs_of_file
  blank, filled = real_shapes(tmp_path)
  protocol = EvalProtocol(shots=1, num_episodes=3, num_queries=1)
  n = export_episodes(str(blank), str(tmp_path / 'blank.npz'), protocol)
  export_episodes(str(filled), str(tmp_path / 'filled.npz'), protocol)
  assert n == 5 * 3
  got, want = np.load(tmp_path / 'blank.npz'), np.load(tmp_path / 'filled.npz')
  assert set(got.files) == set(want.files)
  for key in got.files:
    np.testing.assert_array_equal(got[key], want[key], err_msg=key)
  assert sorted(set(got['num_keypoints'].tolist())) == [8, 15, 19, 32, 68]
  # Ground truth as predictions scores PCK 1 on every category, the faces included.
  pairs = pairs_of_file(str(blank), protocol)
  pairs.write_predictions(str(tmp_path / 'gt.json'), got['gt_keypoints'])
  scores = pairs.score_file(str(tmp_path / 'gt.json'))
  assert scores['PCK@0.2'] == 1.0 and scores['num_pairs'] == n
  assert {int(c) for c in scores['per_category']} == {66, 18, 102, 103, 40}
  assert all(s['PCK@0.2'] == 1.0 for s in scores['per_category'].values())


def test_tiny_eval_same_report_as_filled_names(tmp_path):
  """eval.py with the official tiny fixture: empty name lists give the filled file's report."""
  from conftest import run_eval_cli   # in-process: no start-up of jax and TensorFlow per run
  blank, filled = real_shapes(tmp_path)
  reports = {}
  for f in (blank, filled):
    reports[f] = tmp_path / f'{f.stem}_report.json'
    status, line = run_eval_cli(f'--checkpoint={FIXTURES / "tiny_capenext.npz"}',
                                f'--annotations={f}', f'--image_root={IMAGES}', '--shots=1',
                                '--num_episodes=1', '--num_queries=1', '--batch_size=4',
                                f'--output={reports[f]}')
    assert status == 0, line
  a, b = (json.loads(reports[f].read_text()) for f in (blank, filled))
  assert a['overall']['num_pairs'] == 5
  assert a['overall'] == b['overall'] and a['per_category'] == b['per_category']


def test_training_batches_and_predict_coco(tmp_path):
  from capenext_jax import predict
  from data_pipeline import pipeline as pl
  blank, filled = real_shapes(tmp_path)
  cfg = pl.PipelineConfig(image_size=64, heatmap_size=16, warp='host', seed=3)
  batches = [next(pl.make_train_iterator(pl.json_source(str(f), str(IMAGES)), 4, cfg,
                                         process_index=0, process_count=1))
             for f in (blank, filled)]
  assert set(batches[0]) == set(batches[1])
  for key in batches[0]:
    np.testing.assert_array_equal(batches[0][key], batches[1][key], err_msg=key)
  # The TFDS builder keeps the empty lists in its metadata and rebuilds the same instances.
  from data_pipeline import tfds_mp100 as tm
  cfg_tfds = tm.Mp100Config.for_root_layout('blank', {'test': os.path.relpath(blank, IMAGES)})
  records = tm.load_records(tm.build_records(str(IMAGES), str(tmp_path / 'tfds'), cfg_tfds), 'test')
  json_ds = pl.json_source(str(blank), str(IMAGES), drop_missing_images=False).dataset
  assert records.dataset.descriptions == json_ds.descriptions
  for name in ('ann_id', 'joints', 'category_num_keypoints'):
    np.testing.assert_array_equal(getattr(records.dataset, name), getattr(json_ds, name))
  # capenext-predict --coco reads the categories with the same rules.
  queries, anns = predict.coco_queries(str(blank), str(IMAGES))
  want, _ = predict.coco_queries(str(filled), str(IMAGES))
  assert len(queries) == len(anns) == len(want)
  for q, w, ann in zip(queries, want, anns):
    assert len(q.descriptions) == len(ann['keypoints']) // 3
    assert (q.category, q.descriptions, q.skeleton) == (w.category, w.descriptions, w.skeleton)

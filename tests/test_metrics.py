"""Metrics, predictions files and reports: hand-computed cases and the tiny official fixture."""
import json

import numpy as np
import pytest

from capenext_jax import metrics
from capenext_jax.evaluation import predictions, report
from capenext_jax.mp100 import geometry
from conftest import load_fixture

BIG_ID = 2**53 + 1  # not representable as float64: a float round trip would change it


def _three_pairs():
  """Hand-checked batch of 3 pairs with 5 slots.

  Pair 0 (bbox 100): errors 0, 5, 10, 20 px on the valid slots (dist 0, .05, .1, .2) and a
    masked slot 4 with a huge error. Pair 1: no valid keypoint. Pair 2 (bbox 50): perfect.
  """
  gt = np.full((3, 5, 2), 30.0)
  pred = gt.copy()
  pred[0, 1] += (3.0, 4.0)
  pred[0, 2] += (0.0, 10.0)
  pred[0, 3] += (20.0, 0.0)
  pred[0, 4] += (1000.0, 0.0)
  pred[1] += 7.0
  mask = np.array([[1, 1, 1, 1, 0], [0, 0, 0, 0, 0], [1, 1, 1, 0, 0]], dtype=bool)
  return pred, gt, mask, np.array([100.0, 80.0, 50.0])


# ----------------------------------------------------------------------------- per instance
def test_per_instance_hand_computed():
  m = metrics.per_instance_metrics(*_three_pairs())
  # A distance exactly equal to t * bbox does not count (strict <): 0.05, 0.1 and 0.2 miss.
  np.testing.assert_allclose(m['PCK@0.05'], [0.25, 0.0, 1.0])
  np.testing.assert_allclose(m['PCK@0.1'], [0.5, 0.0, 1.0])
  np.testing.assert_allclose(m['PCK@0.15'], [0.75, 0.0, 1.0])
  np.testing.assert_allclose(m['PCK@0.2'], [0.75, 0.0, 1.0])
  np.testing.assert_allclose(m['PCK@0.25'], [1.0, 0.0, 1.0])
  np.testing.assert_allclose(m['NME'], [0.0875, 0.0, 0.0], atol=1e-8)
  np.testing.assert_allclose(m['EPE'], [8.75, 0.0, 0.0], atol=1e-6)
  # Pair 0: hits per step t = 0, .05, .1, .15, .2 are 0, 1, 2, 3, 3 of 4, then 4 of 4 for the
  # 15 steps .25..95. A perfect pair gets 19/20: the t = 0 step never counts.
  np.testing.assert_allclose(m['AUC'], [(9 / 4 + 15) / 20, 0.0, 0.95])
  np.testing.assert_array_equal(m['num_valid'], [4, 0, 3])


def test_threshold_compared_in_float32_like_mmpose():
  # 0.2 - 1e-10 is below 0.2 in float64 but mmpose's float32 distance buffer rounds it onto
  # float32(0.2), which is not < float32(0.2).
  gt = np.zeros((1, 1, 2))
  pred = np.array([[[0.2 - 1e-10, 0.0]]])
  m = metrics.per_instance_metrics(pred, gt, np.ones((1, 1), bool), np.array([1.0]))
  assert m['PCK@0.2'][0] == 0.0 and m['PCK@0.25'][0] == 1.0


def test_score_pairs_means_and_per_category():
  s = metrics.score_pairs(*_three_pairs(), category_ids=np.array([7, 7, 3]))
  assert s['num_pairs'] == 3 and s['num_empty_pairs'] == 1
  # The empty pair counts as 0 in every mean.
  assert s['PCK@0.2'] == pytest.approx((0.75 + 0 + 1) / 3)
  assert s['mPCK'] == pytest.approx((0.65 + 0 + 1) / 3)
  assert s['AUC'] == pytest.approx((0.8625 + 0 + 0.95) / 3)
  assert s['EPE'] == pytest.approx(8.75 / 3, abs=1e-6)
  assert list(s['per_category']) == [3, 7]
  c3, c7 = s['per_category'][3], s['per_category'][7]
  assert c3['num_pairs'] == 1 and c3['PCK@0.2'] == 1.0 and c3['AUC'] == pytest.approx(0.95)
  assert c7['num_pairs'] == 2 and c7['num_empty_pairs'] == 1
  assert c7['PCK@0.2'] == pytest.approx(0.375) and c7['NME'] == pytest.approx(0.04375, abs=1e-8)
  assert c7['mPCK'] == pytest.approx(0.325)


def test_perfect_predictions_ceiling():
  gt = np.random.default_rng(0).uniform(0, 500, (4, 100, 2))
  mask = np.random.default_rng(1).random((4, 100)) < 0.5
  s = metrics.score_pairs(gt, gt, mask, np.full(4, 120.0))
  assert s['mPCK'] == 1.0 and s['NME'] == 0.0 and s['EPE'] == 0.0
  assert s['AUC'] == pytest.approx(0.95)


@pytest.mark.parametrize('bad, match', [
    (dict(bbox_thr=np.array([100.0, 0.0, 50.0])), 'pair 1'),
    (dict(mask=np.ones((3, 5), np.float32)), 'mask'),
    (dict(gt=np.zeros((3, 4, 2))), 'gt shape'),
])
def test_score_pairs_rejects_bad_input(bad, match):
  args = dict(zip(('pred', 'gt', 'mask', 'bbox_thr'), _three_pairs()))
  args.update(bad)
  with pytest.raises(ValueError, match=match):
    metrics.score_pairs(**args)


def test_score_pairs_rejects_non_finite_valid_prediction():
  pred, gt, mask, thr = _three_pairs()
  pred[2, 1, 0] = np.nan
  with pytest.raises(ValueError, match='pair 2, keypoint 1'):
    metrics.score_pairs(pred, gt, mask, thr)
  pred[2, 1, 0] = 0.0
  pred[1, 1, 0] = np.nan  # masked slot: ignored, as officially
  metrics.score_pairs(pred, gt, mask, thr)


# ----------------------------------------------------------------------------- acc_pose
def test_keypoint_pck_accuracy_pools_batch_per_slot():
  gt = np.zeros((2, 3, 2))
  pred = np.array([[[1, 0], [1, 0], [9, 9]], [[5, 0], [9, 9], [9, 9]]], dtype=np.float64)
  mask = np.array([[1, 1, 0], [1, 0, 0]], dtype=bool)
  acc, avg, cnt = metrics.keypoint_pck_accuracy(pred, gt, mask, 0.2, np.full((2, 2), 10.0))
  np.testing.assert_allclose(acc, [0.5, 1.0, -1.0])
  assert avg == pytest.approx(0.75) and cnt == 2


def test_acc_pose_matches_fixture():
  z = load_fixture('tiny_capenext.npz')
  pred = z['out_kpts'][-1] * np.float32(64)  # fixture crop is 64 px
  gt = np.stack([z[f'meta_b{b}_query_joints_3d'][:, :2] for b in range(3)])
  mask = (z['in_target_weight_q'][..., 0] * z['in_target_weight_s'][..., 0]) > 0
  _, avg, _ = metrics.keypoint_pck_accuracy(pred, gt, mask, 0.2, np.full((3, 2), 64.0))
  assert avg == pytest.approx(float(z['loss_acc_pose']), abs=1e-7)


def test_transform_preds_matches_fixture():
  z = load_fixture('tiny_capenext.npz')
  for b in range(3):
    crop = z[f'test_b{b}_points'][-1][None] * np.float32(64)
    out = geometry.transform_preds(crop, z[f'meta_b{b}_query_center'][None],
                                   z[f'meta_b{b}_query_scale'][None], image_size=64)
    np.testing.assert_array_equal(out, z[f'test_b{b}_preds'][:, :, :2])


def test_transform_preds_formula():
  out = geometry.transform_preds(np.array([[[0.0, 0.0], [128.0, 256.0]]]),
                                 np.array([[50.0, 60.0]]), np.array([[0.5, 1.0]]))
  # s = (100, 200): x = x * 100 / 256 + 50 - 50, y = y * 200 / 256 + 60 - 100.
  np.testing.assert_allclose(out, [[[0.0, -40.0], [50.0, 160.0]]])


# ----------------------------------------------------------------------------- predictions files
def _records():
  return [
      predictions.PredictionRecord((np.int64(BIG_ID),), 10**16 + 3,
                                   np.array([[1.5, 2.25], [3.0, 4.0]], np.float32), 7),
      predictions.PredictionRecord((BIG_ID + 2, 2**60 + 5), BIG_ID, np.array([[0.1, 1e-7]])),
  ]


def test_predictions_round_trip_exact_ids(tmp_path):
  path = tmp_path / 'p.json'
  predictions.write_predictions(path, _records())
  back = predictions.read_predictions(path)
  assert [r.key for r in back] == [((BIG_ID,), 10**16 + 3), ((BIG_ID + 2, 2**60 + 5), BIG_ID)]
  assert all(type(i) is int for r in back for i in (*r.support_ann_ids, r.query_ann_id))
  assert [r.category_id for r in back] == [7, None]
  np.testing.assert_array_equal(back[0].keypoints, [[1.5, 2.25], [3.0, 4.0]])
  assert back[1].keypoints[0, 1] == 1e-7
  assert str(BIG_ID) in path.read_text()


def _write_raw(tmp_path, pairs, **header):
  doc = {'format': 'capenext-predictions', 'version': 1, 'coordinates': 'original_image_pixels',
         'pairs': pairs}
  doc.update(header)
  path = tmp_path / 'bad.json'
  path.write_text(json.dumps(doc))
  return path


GOOD = {'support_ann_ids': [1], 'query_ann_id': 2, 'keypoints': [[0, 1]]}


@pytest.mark.parametrize('pair, match', [
    ({**GOOD, 'query_ann_id': 1e16}, "pair 1: field 'query_ann_id'"),
    ({**GOOD, 'query_ann_id': True}, "pair 1: field 'query_ann_id'"),
    ({**GOOD, 'support_ann_ids': []}, "pair 1: field 'support_ann_ids'"),
    ({**GOOD, 'support_ann_ids': [1.0]}, "pair 1: field 'support_ann_ids'"),
    ({**GOOD, 'keypoints': [[0, 1, 2]]}, "pair 1: field 'keypoints'"),
    ({**GOOD, 'keypoints': [[0, float('nan')]]}, "pair 1: field 'keypoints'"),
    ({**GOOD, 'keypoints': [[0, '1']]}, "pair 1: field 'keypoints'"),
    ({**GOOD, 'category_id': 'dog'}, "pair 1: field 'category_id'"),
    ({'support_ann_ids': [1], 'query_ann_id': 2}, r"pair 1: missing fields \['keypoints'\]"),
    ({**GOOD, 'keypoint': []}, r"pair 1: .*unknown fields \['keypoint'\]"),
    ([1, 2], 'pair 1: must be an object'),
])
def test_read_predictions_errors_name_pair_and_field(tmp_path, pair, match):
  with pytest.raises(ValueError, match=match):
    predictions.read_predictions(_write_raw(tmp_path, [GOOD, pair]))


def test_read_predictions_rejects_bad_header_and_json(tmp_path):
  with pytest.raises(ValueError, match="field 'format'"):
    predictions.read_predictions(_write_raw(tmp_path, [GOOD], format='other'))
  with pytest.raises(ValueError, match='version'):
    predictions.read_predictions(_write_raw(tmp_path, [GOOD], version=2))
  path = tmp_path / 'broken.json'
  path.write_text('{"format": ')
  with pytest.raises(ValueError, match='not valid JSON'):
    predictions.read_predictions(path)


def test_write_predictions_rejects_float_ids_and_nan(tmp_path):
  rec = predictions.PredictionRecord((1,), 1e16, np.zeros((2, 2)))
  with pytest.raises(ValueError, match="pair 0: query_ann_id"):
    predictions.write_predictions(tmp_path / 'x.json', [rec])
  rec = predictions.PredictionRecord((1,), 2, np.array([[0.0, np.nan]]))
  with pytest.raises(ValueError, match='pair 0: keypoints'):
    predictions.write_predictions(tmp_path / 'x.json', [rec])


# ----------------------------------------------------------------------------- alignment, scoring
def _episodes():
  """The _three_pairs batch as official pairs (K = 4, 2, 3); pairs 0 and 1 share their key."""
  pred, gt, mask, thr = _three_pairs()
  ks = (4, 2, 3)
  keys = [((BIG_ID,), BIG_ID + 2), ((BIG_ID,), BIG_ID + 2), ((5, 6), 2**60)]
  eps = [predictions.EvalPair(s, q, c, gt[i, :k], mask[i, :k], thr[i])
         for i, ((s, q), c, k) in enumerate(zip(keys, (7, 7, 3), ks))]
  recs = [predictions.PredictionRecord(s, q, pred[i, :k], c)
          for i, ((s, q), c, k) in enumerate(zip(keys, (7, 7, 3), ks))]
  return eps, recs


def test_score_predictions_file_matches_score_pairs(tmp_path):
  eps, recs = _episodes()
  path = tmp_path / 'p.json'
  # Reordered file: pair 2 first; the duplicated key is matched occurrence by occurrence.
  predictions.write_predictions(path, [recs[2], recs[0], recs[1]])
  got = predictions.score_predictions_file(path, eps)
  pred, gt, mask, thr = _three_pairs()
  want = metrics.score_pairs(pred, gt, mask, thr, category_ids=np.array([7, 7, 3]))
  for g, w in [(got, want)] + [(got['per_category'][c], want['per_category'][c]) for c in (3, 7)]:
    assert {k: v for k, v in g.items() if k != 'per_category'} == pytest.approx(
        {k: v for k, v in w.items() if k != 'per_category'})


@pytest.mark.parametrize('edit, match', [
    (lambda r: r[:2],
     rf'evaluation pair 2 \(support_ann_ids=\[5, 6\], query_ann_id={2**60}\) has no prediction'),
    (lambda r: r + [r[2]], r'1 predictions match no evaluation pair, first: prediction 3'),
    (lambda r: [r[0], r[1], predictions.PredictionRecord((5, 6), 2**60, np.zeros((4, 2)))],
     r'prediction 2 .* has 4 keypoints, evaluation pair 2 expects 3'),
    (lambda r: [r[0], r[1], predictions.PredictionRecord((5, 6), 2**60, np.zeros((3, 2)), 9)],
     r'prediction 2 .* category_id 9, evaluation pair 2 is category 3'),
    (lambda r: [r[0], r[1], predictions.PredictionRecord((6, 5), 2**60, np.zeros((3, 2)))],
     r'evaluation pair 2 .* has no prediction'),
])
def test_alignment_errors(tmp_path, edit, match):
  eps, recs = _episodes()
  path = tmp_path / 'p.json'
  predictions.write_predictions(path, edit(recs))
  with pytest.raises(ValueError, match=match):
    predictions.score_predictions_file(path, eps)


# ----------------------------------------------------------------------------- report
def test_report_table_and_json(tmp_path, capsys):
  s = metrics.score_pairs(*_three_pairs(), category_ids=np.array([7, 7, 3]))
  names = {3: 'face', 7: 'dog'}
  report.print_report(s, names)
  lines = capsys.readouterr().out.splitlines()
  assert 'PCK@0.2' in lines[0] and 'mPCK' in lines[0]
  assert lines[2].split()[:3] == ['3', 'face', '1'] and lines[3].split()[:3] == ['7', 'dog', '2']
  assert lines[5].split()[:2] == ['all', 'mean'] and '58.33' in lines[5]  # PCK@0.2 = 1.75 / 3
  path = tmp_path / 'r.json'
  report.write_report(path, s, names, info={'split': 1})
  doc = json.loads(path.read_text())
  assert doc['info'] == {'split': 1}
  assert doc['overall']['PCK@0.2'] == pytest.approx(1.75 / 3)
  assert [(c['category_id'], c['name'], c['num_pairs']) for c in doc['per_category']] == [
      (3, 'face', 1), (7, 'dog', 2)]

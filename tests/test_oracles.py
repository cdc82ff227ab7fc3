"""Oracles for the user paths: eval.py and capenext-predict with a stand-in forward that knows
the answer, so everything around the model (host pipeline, padded batches, the mapping back
to original-image pixels, scoring, reports, batch vs single-image prediction) must give it back.
"""
import importlib.util
import json

import numpy as np
import pytest
from absl import flags

from conftest import FIXTURES, MP100_MINI, REPO

TEST_ANN = MP100_MINI / 'annotations' / 'mini_test.json'
IMAGES = MP100_MINI / 'images'
FIXTURE = FIXTURES / 'tiny_capenext.npz'   # official tiny weights, input size 64
SIZE = 64


@pytest.fixture(scope='module')
def eval_program():
  """eval.py imported once (its absl flags can be defined once per process)."""
  spec = importlib.util.spec_from_file_location('eval_program', REPO / 'eval.py')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def run_eval(eval_program, *argv):
  """eval.py's main in this process, with fresh flag values."""
  flags.FLAGS.unparse_flags()
  flags.FLAGS(['eval.py', *argv])
  eval_program.main([])


def oracle_forward(shift=(0.0, 0.0)):
  """`forward.make_forward` stand-in: the true query keypoints (crop px, from the batch) moved
  by `shift` crop px, as the model's last decoder layer would give them (in [0, 1] units)."""

  def make_forward(cache, image_size):
    del cache

    def forward(model, batch):
      del model
      return {'keypoints': ((batch['query_joints'] + np.float32(shift)) / image_size)[None]}

    return forward

  return make_forward


@pytest.mark.parametrize('warp', ['host', 'device'])
def test_eval_oracle_scores_perfectly(eval_program, tmp_path, monkeypatch, warp):
  from capenext_jax import forward
  monkeypatch.setattr(forward, 'make_forward', oracle_forward())
  report = tmp_path / 'report.json'
  config = tmp_path / 'config.py'   # the default config with the warp under test
  config.write_text('from configs import synthetic\n\n\ndef get_config(arg=None):\n'
                    '  c = synthetic.get_config(arg)\n'
                    f'  c.data.warp = {warp!r}\n  return c\n')
  # 4 categories x 3 episodes x 1 query = 12 pairs in batches of 5: the last one is padded.
  run_eval(eval_program, f'--checkpoint={FIXTURE}', f'--annotations={TEST_ANN}',
           f'--image_root={IMAGES}', '--shots=1', '--num_episodes=3', '--num_queries=1',
           '--batch_size=5', f'--output={report}', f'--config={config}')
  r = json.loads(report.read_text())
  overall = r['overall']
  assert overall['num_pairs'] == 12 and overall['num_empty_pairs'] == 0
  for thr in ('0.05', '0.1', '0.15', '0.2', '0.25'):
    assert overall[f'PCK@{thr}'] == 1.0, thr
  assert overall['mPCK'] == 1.0
  # The threshold-0 step of the AUC never counts a hit (strict <): 19 of 20 steps.
  assert overall['AUC'] == pytest.approx(0.95)
  # float32 round-off of the crop coordinates, scaled back to image px (crops up to ~1000 px).
  assert overall['NME'] < 1e-6 and overall['EPE'] < 1e-3
  assert len(r['per_category']) == 4
  assert all(c['PCK@0.05'] == 1.0 for c in r['per_category'])


def test_eval_oracle_shift_gives_the_hand_computed_error(eval_program, tmp_path, monkeypatch):
  """A shift of dx crop px is dx * s / 64 image px, s = the square crop's side (1.25 * the
  longer bbox side); EPE and NME are its per-pair mean over pairs (pairs are never empty here)."""
  from capenext_jax import forward
  from capenext_jax.evaluation.pairs import EvalProtocol, pairs_of_file
  dx = 3.0
  monkeypatch.setattr(forward, 'make_forward', oracle_forward((dx, 0.0)))
  report = tmp_path / 'report.json'
  run_eval(eval_program, f'--checkpoint={FIXTURE}', f'--annotations={TEST_ANN}',
           f'--image_root={IMAGES}', '--shots=1', '--num_episodes=3', '--num_queries=1',
           '--batch_size=5', f'--output={report}')
  overall = json.loads(report.read_text())['overall']
  # By hand from the annotation json: the query's bbox [x, y, w, h] -> clean side max(w, h) - 1.
  ann = {a['id']: a for a in json.loads(TEST_ANN.read_text())['annotations']}
  pairs = pairs_of_file(str(TEST_ANN), EvalProtocol(shots=1, num_episodes=3, num_queries=1))
  sides = np.array([max(ann[int(q)]['bbox'][2:]) - 1.0 for q in pairs.arrays['query_ann_id']])
  shift_px = dx * np.float32(sides * 1.25 / 200.0) * np.float32(200.0) / SIZE
  assert overall['EPE'] == pytest.approx(np.mean(shift_px), rel=1e-5)
  assert overall['NME'] == pytest.approx(np.mean(shift_px / sides), rel=1e-5)


def predictor_oracle(queries, anns, size):
  """A stand-in for `Predictor._forward` that returns each query's annotated keypoints in
  crop px / size, computed here from the spec's formulas: the box clipped to the image
  (x1 = max(0, x), x2 = min(W - 1, x1 + w - 1)), a square crop of side s = 1.25 * max(w', h')
  centred on it, x_crop = (x - c + s / 2) * size / s. Padding rows repeat the batch's last."""
  expected = []
  for q, ann in zip(queries, anns):
    height, width = q.image.shape[:2]
    x, y, w, h = ann['bbox']
    x1, y1 = max(0.0, x), max(0.0, y)
    w2 = min(width - 1.0, x1 + max(0.0, w - 1.0)) - x1
    h2 = min(height - 1.0, y1 + max(0.0, h - 1.0)) - y1
    side = 1.25 * max(w2, h2)
    corner = np.array([x1 + w2 / 2, y1 + h2 / 2]) - side / 2
    kp = np.asarray(ann['keypoints'], np.float64).reshape(-1, 3)[:, :2]
    slots = np.zeros((100, 2), np.float32)
    slots[:len(kp)] = (kp - corner) / side
    expected.append(slots)
  consumed = [0]

  def forward(images, mask, adjacency, keypoint_text, category_text):
    del mask, adjacency, keypoint_text, category_text
    first, rows = consumed[0], images.shape[0]
    real = min(rows, len(expected) - first)
    consumed[0] += real
    return np.stack(expected[first:first + real] + [expected[first + real - 1]] * (rows - real))

  return forward


def test_predict_batch_oracle_and_single_image_mode(tmp_path):
  """Batch mode (batch 3 over 8 annotations: the last batch padded) maps the oracle's points
  back to every annotation's keypoints; with the real model, batch mode equals single-image
  mode for every annotation."""
  from capenext_jax import loading, predict
  from capenext_jax.predictor import Predictor
  coco = json.loads(TEST_ANN.read_text())
  queries, anns = predict.coco_queries(str(TEST_ANN), str(IMAGES))
  assert len(queries) == 8
  model = loading.load_model(FIXTURE)
  oracle = Predictor(model, batch_size=3)
  oracle._forward = predictor_oracle(queries, anns, SIZE)
  for points, ann in zip(oracle(queries), coco['annotations']):
    want = np.asarray(ann['keypoints'], np.float64).reshape(-1, 3)[:, :2]
    np.testing.assert_allclose(points, want, atol=2e-3)   # float32 crop units, ~1000 px crops
  batched = Predictor(model, batch_size=3)(queries)
  single = Predictor(model, batch_size=1)
  for q, points in zip(queries, batched):
    np.testing.assert_allclose(single([q])[0], points, atol=1e-3)

"""Oracles for the user paths: eval.py and capenext-predict with a stand-in forward that knows
the answer, so everything around the model (host pipeline, padded batches, the mapping back
to original-image pixels, scoring, reports, batch vs single-image prediction) must give it back.
"""
import json

import numpy as np
import pytest
from absl import flags

import conftest
from conftest import FIXTURES, MP100_MINI

TEST_ANN = MP100_MINI / 'annotations' / 'mini_test.json'
IMAGES = MP100_MINI / 'images'
FIXTURE = FIXTURES / 'tiny_capenext.npz'   # official tiny weights, input size 64
SIZE = 64


@pytest.fixture(scope='module')
def eval_program():
  return conftest.eval_program()


def run_eval(eval_program, *argv):
  """eval.py's main in this process, with fresh flag values."""
  flags.FLAGS.unparse_flags()
  flags.FLAGS(['eval.py', *argv])
  eval_program.main([])


def oracle_forward(shift=(0.0, 0.0)):
  """`forward.make_forward` stand-in: the true query keypoints (crop px, from the batch) moved
  by `shift` crop px, as the model's last decoder layer would give them (in [0, 1] units)."""

  def make_forward(image_size):

    def forward(model, batch, cache):
      del model, cache
      return {'keypoints': ((batch['query_joints'] + np.float32(shift)) / image_size)[None]}

    return forward

  return make_forward


@pytest.mark.parametrize('warp', ['host', 'device'])
def test_eval_oracle_scores_perfectly(eval_program, tmp_path, monkeypatch, warp):
  from capenext_jax.device import forward
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
  from capenext_jax.device import forward
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
  back to every annotation's keypoints; with the real model, `capenext-predict --coco` equals
  single-image mode (same category, descriptions, skeleton and box) for one annotation of each
  category and kind of box."""
  from capenext_jax import loading, predict
  from capenext_jax.predictor import Predictor
  coco = json.loads(TEST_ANN.read_text())
  queries, anns = predict.coco_queries(str(TEST_ANN), str(IMAGES))
  assert len(queries) == 8
  oracle = Predictor(loading.load_model(FIXTURE), batch_size=3)
  oracle._forward = predictor_oracle(queries, anns, SIZE)
  for points, ann in zip(oracle(queries), coco['annotations']):
    want = np.asarray(ann['keypoints'], np.float64).reshape(-1, 3)[:, :2]
    np.testing.assert_allclose(points, want, atol=2e-3)   # float32 crop units, ~1000 px crops
  assert predict.main(['--coco', str(TEST_ANN), '--image_root', str(IMAGES), '--checkpoint',
                       str(FIXTURE), '--output', str(tmp_path / 'coco.json'),
                       '--batch_size', '3']) == 0
  batched = json.loads((tmp_path / 'coco.json').read_text())
  images = {im['id']: im['file_name'] for im in coco['images']}
  # Single-image runs of 4 of the 8: one per category (its descriptions, skeleton and name, two
  # with an underscore), covering each kind of box the file has (fractional: 1, and 2 in a
  # portrait image; the whole image: 4; to the image's edges: 7) and each batch position (first
  # batch, middle batch, the padded last batch). The other 4 repeat these cases with other
  # numbers; the oracle above checks all 8 in batch mode.
  for i in (1, 2, 4, 7):
    q, ann, result = queries[i], anns[i], batched[i]
    (tmp_path / f'kp{i}.json').write_text(json.dumps(list(q.descriptions)))
    argv = [str(IMAGES / images[ann['image_id']]), '--checkpoint', str(FIXTURE),
            '--category', q.category, '--keypoints_file', str(tmp_path / f'kp{i}.json'),
            '--skeleton', json.dumps([list(e) for e in q.skeleton]),
            '--bbox', ','.join(map(str, ann['bbox'])), '--output', str(tmp_path / f'{i}.json'),
            '--no_overlay']
    assert predict.main(argv) == 0
    single = json.loads((tmp_path / f'{i}.json').read_text())
    np.testing.assert_array_equal(single['bbox'], q.bbox)
    xy = np.array([[k['x'], k['y']] for k in single['keypoints']])
    coco_xy = np.asarray(result['keypoints']).reshape(-1, 3)[:, :2]
    assert result['annotation_id'] == ann['id'] and len(xy) == len(ann['keypoints']) // 3
    np.testing.assert_allclose(xy, coco_xy, atol=1e-3)   # batch 3 vs 1: float32 round-off


# ----------------------------------------------------------------------------- device warp
def gradient_dataset(root):
  """One 1200 x 1000 PNG whose red and green channels are linear in x and y (R = x / 5,
  G = y / 4, B = 90): bilinear resampling of it is exact, antialiased downscaling too away
  from the window edges. Four boxes of one category, from far larger than the 96 px crops the
  device warp ships at 64 px (downscaled) to smaller (copied as is)."""
  from PIL import Image
  (root / 'images').mkdir(parents=True)
  (root / 'annotations').mkdir()
  y, x = np.mgrid[0:1000, 0:1200].astype(np.float64)
  rgb = np.stack([x / 5, y / 4, np.full_like(x, 90.0)], -1)
  Image.fromarray(np.round(rgb).astype(np.uint8)).save(root / 'images' / 'g.png')
  boxes = [[100, 80, 900, 760], [300, 200, 400, 500], [700, 600, 60, 50], [50, 500, 90, 300]]
  anns = [dict(id=i + 1, image_id=1, category_id=1, bbox=b, area=b[2] * b[3], iscrowd=0,
               num_keypoints=2, keypoints=[b[0] + 5, b[1] + 5, 2, b[0] + 20, b[1] + 9, 2])
          for i, b in enumerate(boxes)]
  data = dict(images=[dict(id=1, file_name='g.png', width=1200, height=1000)], annotations=anns,
              categories=[dict(id=1, name='thing', supercategory='x', keypoints=['a', 'b'],
                               skeleton=[[0, 1]])])
  (root / 'annotations' / 'g.json').write_text(json.dumps(data))
  return root / 'annotations' / 'g.json', boxes


def device_images(source, size=64):
  """The eval batch of every instance as a query (support: the next one), warped on device,
  back in 0..255 levels: float [N, size, size, 3]."""
  import jax.numpy as jnp
  from capenext_jax import image_ops
  from data_pipeline import pipeline as pl
  n = len(source.dataset)
  pairs = np.stack([(np.arange(n) + 1) % n, np.arange(n)], 1)
  cfg = pl.PipelineConfig(image_size=size, heatmap_size=size // 4, warp='device',
                          crop_size=size * 3 // 2)
  (batch,) = pl.make_eval_iterator(source, n, cfg, pairs=pairs, process_index=0,
                                   process_count=1)
  normed = np.asarray(image_ops.warp_and_normalize(jnp.asarray(batch['query_crop']),
                                                   jnp.asarray(batch['query_affine']), size))
  mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
  return (normed * std + mean) * 255.0


def test_device_warp_of_downscaled_crops_is_the_analytic_image(tmp_path):
  """Crop -> antialiased downscale (tf.data) -> pad -> bilinear warp (device) reproduces the
  gradient at the source point of every output pixel: mmpose's test crop maps output pixel u
  to source x = c + (u - 32) * s / 64, c the clean box centre, s = 1.25 * its longer side."""
  from data_pipeline import pipeline as pl
  ann, boxes = gradient_dataset(tmp_path / 'g')
  images = device_images(pl.json_source(str(ann), str(tmp_path / 'g' / 'images')))
  u = np.arange(64.0)
  for image, (x, y, w, h) in zip(images, boxes):
    w, h = w - 1.0, h - 1.0
    side = 1.25 * max(w, h)
    sx = x + w / 2 + (u - 32) * side / 64
    sy = y + h / 2 + (u - 32) * side / 64
    want_r = np.broadcast_to(sx[None, :] / 5, (64, 64))
    want_g = np.broadcast_to(sy[:, None] / 4, (64, 64))
    # Pixels whose source lies inside the box, 8 px from its edges and the image's.
    inside = ((sx[None, :] > max(x, 0) + 8) & (sx[None, :] < min(x + w, 1199) - 8) &
              (sy[:, None] > max(y, 0) + 8) & (sy[:, None] < min(y + h, 999) - 8))
    assert inside.sum() > 500
    # Two uint8 roundings (the downscale, the warp) and the PNG's own: within 1.5 levels.
    assert np.abs(image[..., 0] - want_r)[inside].max() <= 1.5
    assert np.abs(image[..., 1] - want_g)[inside].max() <= 1.5
    assert np.abs(image[..., 2] - 90)[inside].max() <= 0.5


def test_tfds_records_with_device_warp_equal_the_json_path(tmp_path):
  """The TFDS records (crops pre-cut at up to 384 px and re-encoded as JPEG quality 95; the
  64 px pipeline ships 96 px crops, so they are scaled down again) give the json path's
  device-warped images up to the JPEG and double-resampling error."""
  from data_pipeline import pipeline as pl
  from data_pipeline import tfds_mp100 as tm
  ann, _ = gradient_dataset(tmp_path / 'g')
  cfg = tm.Mp100Config.for_root_layout('g', {'test': 'annotations/g.json'}, image_dir='images')
  records = tm.load_records(tm.build_records(str(tmp_path / 'g'), str(tmp_path / 'tfds'), cfg),
                            'test')
  want = device_images(pl.json_source(str(ann), str(tmp_path / 'g' / 'images')))
  got = device_images(records)
  # Measured: max 3.0, mean 0.22 grey levels (before the fix, record crops larger than the
  # pipeline's crop were cut instead of scaled: mean 65).
  assert np.abs(got - want).mean() < 0.5 and np.abs(got - want).max() <= 4.0


def test_eval_text_options_change_only_their_cache_rows(eval_program, tmp_path, monkeypatch):
  """--descriptions synonyms on mp100_mini re-encodes exactly the keypoint rows whose names the
  table changes, --category_prompt wrong exactly the category rows (both in one run: neither
  touches the other's rows); a user's descriptions file (every category's names reversed)
  exactly the rows it changes; the reports say which."""
  from capenext_jax.device import forward
  from capenext_jax.evaluation import predict_fn
  caches = []

  def recording(*args):
    caches.append(evaluator_cache(*args))
    return caches[-1]

  evaluator_cache = predict_fn.replicated_text_cache
  monkeypatch.setattr(predict_fn, 'replicated_text_cache', recording)
  monkeypatch.setattr(forward, 'make_forward', oracle_forward())
  ann = json.loads(TEST_ANN.read_text())
  reversed_names = {str(c['id']): c['keypoints'][::-1] for c in ann['categories']}
  (tmp_path / 'names.json').write_text(json.dumps(reversed_names))
  reports = {}
  for name, extra in (('regular', []), ('varied', ['--descriptions=synonyms',
                                                  '--category_prompt=wrong',
                                                  '--category_prompt_seed=3']),
                      ('file', [f'--descriptions={tmp_path / "names.json"}'])):
    reports[name] = tmp_path / f'{name}.json'
    run_eval(eval_program, f'--checkpoint={FIXTURE}', f'--annotations={TEST_ANN}',
             f'--image_root={IMAGES}', '--shots=1', '--num_episodes=1', '--num_queries=1',
             '--batch_size=4', f'--output={reports[name]}', *extra)
  regular, varied, from_file = ([np.asarray(c.keypoint), np.asarray(c.category)] for c in caches)
  info = {n: json.loads(p.read_text())['info'] for n, p in reports.items()}
  assert info['regular']['descriptions'] == 'regular'
  assert info['regular']['category_prompt'] == 'true'
  from capenext_jax.mp100.annotations import load_annotations
  from capenext_jax.mp100.text_variants import description_table
  table, _ = description_table('synonyms')
  ds = load_annotations(str(TEST_ANN), str(IMAGES))
  changed_rows = np.zeros(regular[0].shape[:2], bool)
  for c, (cid, k) in enumerate(zip(ds.category_ids, ds.category_num_keypoints)):
    if int(cid) in table:
      changed_rows[c, :k] = [a != b for a, b in zip(table[int(cid)], ds.descriptions[c][:k])]
  assert changed_rows.any()
  differs = np.abs(varied[0] - regular[0]).max(axis=-1) > 0
  np.testing.assert_array_equal(differs, changed_rows)
  s = info['varied']
  assert s['descriptions'].startswith('synonyms')
  assert sorted(s['descriptions_not_in_table']) == [102, 103]   # not MP-100: regular names kept
  assert sum(s['descriptions_changed'].values()) == changed_rows.sum()
  # Wrong prompts: every category row differs; the names used are recorded.
  assert (np.abs(varied[1] - regular[1]).max(axis=-1) > 0).all()
  w = info['varied']
  assert w['category_prompt'] == 'wrong' and w['category_prompt_seed'] == 3
  names = {str(c): n for c, n in zip(ds.category_ids, ds.raw_category_names)}
  assert w['category_prompt_names'].keys() == names.keys()
  assert all(w['category_prompt_names'][c] != names[c] for c in names)
  # The user's file: the keypoint rows whose reversed name differs, the category rows untouched.
  reversed_rows = np.zeros_like(changed_rows)
  for c, (cid, k) in enumerate(zip(ds.category_ids, ds.category_num_keypoints)):
    reversed_rows[c, :k] = [a != b for a, b in zip(reversed_names[str(cid)],
                                                   ds.descriptions[c][:k])]
  assert reversed_rows.any()
  np.testing.assert_array_equal(np.abs(from_file[0] - regular[0]).max(axis=-1) > 0, reversed_rows)
  np.testing.assert_array_equal(from_file[1], regular[1])
  assert info['file']['descriptions'].startswith(str(tmp_path / 'names.json'))
  assert sum(info['file']['descriptions_changed'].values()) == reversed_rows.sum()

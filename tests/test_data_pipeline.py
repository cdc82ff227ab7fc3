"""tf.data pipeline end to end on mp100_mini, synthetic data and TFDS records."""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from capenext_jax.mp100 import episodes as ep
from capenext_jax.mp100.images import load_rgb
from data_pipeline import pipeline as pl
from capenext_jax.mp100 import geometry as tr
from tests.test_data_transforms import ref_warp, ref_weight_and_heatmap
from conftest import MP100_MINI, REPO

MINI = str(MP100_MINI)
ANN = {s: os.path.join(MINI, 'annotations', f'mini_{s}.json') for s in ('train', 'test')}
MEAN = np.array([0.485, 0.456, 0.406])
STD = np.array([0.229, 0.224, 0.225])
ONE_LEVEL = 1.01 / 255 / 0.224


def _eval_batches(src, cfg, batch=4, **kw):
  return list(pl.make_eval_iterator(src, batch, cfg, pairs=ep.official_pairs(src.dataset, 1, 1, 1),
                                    process_index=0, process_count=1, **kw))


@pytest.mark.parametrize('split', ['train', 'test'])
def test_eval_images_host_device_and_reference(split):
  """Grey (fly) and palette (300W face) images come out RGB; host warp == device warp == ref."""
  import jax.numpy as jnp
  from capenext_jax import image_ops
  src = pl.json_source(ANN[split], os.path.join(MINI, 'images'), drop_missing_images=False)
  d = src.dataset
  host = _eval_batches(src, pl.PipelineConfig(warp='host'))
  dev = _eval_batches(src, pl.PipelineConfig(warp='device', crop_size=2048))
  pairs = ep.official_pairs(d, 1, 1, 1)
  for hb, db in zip(host, dev):
    for i in range(len(hb['valid'])):
      p = pairs[hb['pair_index'][i]]
      q = p[-1]
      img = load_rgb(d.image_path[q])
      m = tr.affine_matrix(d.center[q], d.scale[q], 0.0)
      ref = (np.clip(np.round(ref_warp(img, m)), 0, 255) / 255 - MEAN) / STD
      assert np.abs(hb['query_image'][i] - ref).max() <= ONE_LEVEL
      assert np.mean(np.abs(hb['query_image'][i] - ref) > 1e-4) < 0.01
      joints = tr.transform_joints(m, d.joints[q], d.visible[q])
      np.testing.assert_allclose(hb['query_joints'][i], joints, atol=1e-4)
      np.testing.assert_array_equal(hb['query_weight'][i], ref_weight_and_heatmap(joints, d.visible[q])[0])
      np.testing.assert_array_equal(hb['eval_mask'][i], (d.visible[p] > 0).all(0))
      assert hb['query_ann_id'][i] == d.ann_id[q]
    devimg = np.asarray(image_ops.warp_and_normalize(jnp.asarray(db['query_crop']),
                                                     jnp.asarray(db['query_affine'])))
    assert np.abs(devimg - hb['query_image']).max() <= ONE_LEVEL
    assert np.mean(np.abs(devimg - hb['query_image']) > 1e-4) < 0.01
    for k in ('query_joints', 'query_weight', 'support_mask', 'adjacency', 'category_index'):
      np.testing.assert_array_equal(hb[k], db[k])
  assert sum(int(b['valid'].sum()) for b in host) == len(pairs)
  assert host[0]['query_image'].dtype == np.float32 and host[0]['query_image'].shape[1:] == (256, 256, 3)
  assert dev[0]['query_crop'].dtype == np.uint8 and dev[0]['query_affine'].shape[1:] == (2, 3)


def test_train_resume_and_multihost():
  src = pl.json_source(ANN['train'], os.path.join(MINI, 'images'))
  cfg = pl.PipelineConfig(warp='device', crop_size=96)
  it = pl.make_train_iterator(src, 32, cfg, process_index=0, process_count=1)
  full = [next(it) for _ in range(6)]                  # 3 steps per epoch: crosses epochs
  for start in (2, 4):
    it2 = pl.make_train_iterator(src, 32, cfg, start_step=start, process_index=0, process_count=1)
    for t in range(start, 6):
      b = next(it2)
      for k in full[t]:
        np.testing.assert_array_equal(b[k], full[t][k], err_msg=f'{k} step {t}')
  halves = [next(pl.make_train_iterator(src, 32, cfg, process_index=p, process_count=2)) for p in (0, 1)]
  for k in full[0]:
    np.testing.assert_array_equal(np.concatenate([h[k] for h in halves]), full[0][k])
  # the episode rows behind step 0 give the shipped masks
  e = ep.training_episodes(src.dataset, 1, 0, 0)[:32]
  s, r = ep.augmentation_params(0, 0, ep.epoch_length(src.dataset), 1)
  g = tr.episode_geometry(src.dataset, e, s[:32], r[:32])
  np.testing.assert_allclose(full[0]['query_joints'], g['query_joints'], atol=1e-4)
  np.testing.assert_array_equal(full[0]['support_mask'], g['support_mask'])
  np.testing.assert_array_equal(full[0]['category_index'], src.dataset.category_index[e[:, 1]])
  with pytest.raises(ValueError, match='not divisible'):
    next(pl.make_train_iterator(src, 33, cfg, process_index=0, process_count=2))


def _mini_copy(tmp_path):
  root = tmp_path / 'mini'
  shutil.copytree(MINI, root)
  return root


def test_bad_images_error_or_counted_skip(tmp_path):
  root = _mini_copy(tmp_path)
  ann = str(root / 'annotations' / 'mini_test.json')
  fly = root / 'images' / 'fly_body'
  for f in ('1400.jpg', '1450.jpg'):            # the fly query is one of the two
    (fly / f).write_bytes(b'not a jpeg at all')
  src = pl.json_source(ann, str(root / 'images'), drop_missing_images=False)
  with pytest.raises(ValueError, match=r'fly_body/14[05]0.jpg: (cannot read image|no such image file)'):
    _eval_batches(src, pl.PipelineConfig(), batch=4)
  with pytest.warns(UserWarning, match=r'skipped 2 instances in 2 missing or unreadable images'):
    src2 = pl.json_source(ann, str(root / 'images'), drop_missing_images=False, on_bad_image='skip')
  assert len(src2.dataset) == 6 and [r for r, _, _ in src2.dataset.dropped] == [
      'a missing or unreadable image'] * 2
  for f in ('1400.jpg', '1450.jpg'):
    os.remove(fly / f)
  src3 = pl.json_source(ann, str(root / 'images'), drop_missing_images=False)
  with pytest.raises(ValueError, match=r'fly_body/14[05]0.jpg: (cannot read image|no such image file)'):
    _eval_batches(src3, pl.PipelineConfig(warp='device'), batch=4)
  with pytest.warns(UserWarning, match='dropped 2 annotations .* 2 with image missing'):
    assert len(pl.json_source(ann, str(root / 'images')).dataset) == 6


def test_cmyk_alpha_images_decode_to_rgb(tmp_path):
  from PIL import Image
  rng = np.random.default_rng(0)
  rgb = rng.integers(0, 255, (64, 80, 3)).astype(np.uint8)
  rgb = np.repeat(np.repeat(rgb[::8, ::8], 8, 0), 8, 1)[:64, :80]   # blocky: JPEG-friendly
  (tmp_path / 'im').mkdir()
  Image.fromarray(rgb).convert('CMYK').save(tmp_path / 'im' / 'c.jpg', quality=100)
  Image.fromarray(np.dstack([rgb, np.full((64, 80), 7, np.uint8)])).save(tmp_path / 'im' / 'a.png')
  cat = {'id': 1, 'name': 'x', 'supercategory': 'x', 'keypoints': ['a', 'b'], 'skeleton': [[0, 1]]}
  images = [{'id': i, 'file_name': f, 'width': 80, 'height': 64} for i, f in enumerate(['c.jpg', 'a.png'])]
  anns = [{'id': i, 'image_id': i, 'category_id': 1, 'bbox': [10, 10, 50, 40], 'keypoints': [20, 20, 2, 40, 30, 2],
           'num_keypoints': 2, 'area': 100, 'iscrowd': 0} for i in range(2)]
  (tmp_path / 'a.json').write_text(json.dumps({'images': images, 'annotations': anns, 'categories': [cat]}))
  src = pl.json_source(str(tmp_path / 'a.json'), str(tmp_path / 'im'))
  b = _eval_batches(src, pl.PipelineConfig(), batch=2)[0]
  for i in range(2):   # both files hold `rgb`: the reference is the array itself
    q = ep.official_pairs(src.dataset, 1, 1, 1)[b['pair_index'][i]][-1]
    ref = (np.round(ref_warp(rgb, tr.affine_matrix(src.dataset.center[q], src.dataset.scale[q], 0.0))) / 255 - MEAN) / STD
    assert np.abs(b['query_image'][i] - ref).mean() < 3 / 255 / 0.224   # CMYK conversions differ slightly


def test_tfds_records_roundtrip_and_tf_isolation(tmp_path):
  from data_pipeline import synthetic, tfds_mp100 as tm
  files = synthetic.generate_synthetic(str(tmp_path / 'syn'), (3, 1, 2), 8, 96, seed=1)
  r = subprocess.run([sys.executable, str(MP100_MINI.parent / 'validate_mp100.py'), str(tmp_path / 'syn')],
                     capture_output=True, text=True)
  assert r.returncode == 0, r.stdout[-2000:]
  cfg = tm.Mp100Config.for_root_layout('t', {'train': 'annotations/synthetic_train.json',
                                             'test': 'annotations/synthetic_test.json'}, image_dir='images')
  tm.build_records(str(tmp_path / 'syn'), str(tmp_path / 'tfds'), cfg)
  builder = tm.Mp100(config=cfg, data_dir=str(tmp_path / 'tfds'))     # fresh: metadata from disk
  for split in ('train', 'test'):
    rec = tm.load_records(builder, split)
    js = pl.json_source(files[split], str(tmp_path / 'syn' / 'images'))
    np.testing.assert_array_equal(rec.dataset.ann_id, js.dataset.ann_id)
    np.testing.assert_array_equal(rec.dataset.joints, js.dataset.joints)
    np.testing.assert_array_equal(rec.dataset.category_table()['adjacency'], js.dataset.category_table()['adjacency'])
    assert rec.dataset.descriptions == js.dataset.descriptions
  cfgp = pl.PipelineConfig(warp='host')
  a = next(pl.make_train_iterator(rec, 4, cfgp, process_index=0, process_count=1))
  b = next(pl.make_train_iterator(js, 4, cfgp, process_index=0, process_count=1))
  for k in ('query_joints', 'query_weight', 'support_mask', 'category_index'):
    np.testing.assert_array_equal(a[k], b[k])
  assert np.abs(a['query_image'] - b['query_image']).mean() < 0.05     # JPEG re-encode only
  code = ('import sys, capenext_jax.image_ops, capenext_jax.mp100.annotations, '
          'capenext_jax.mp100.episodes, capenext_jax.mp100.geometry, capenext_jax.mp100.images, '
          'data_pipeline, data_pipeline.pipeline, data_pipeline.synthetic; '
          'assert "tensorflow" not in sys.modules')
  assert subprocess.run([sys.executable, '-c', code], cwd=REPO).returncode == 0


def test_library_never_imports_data_pipeline():
  """Every module of capenext_jax imports without data_pipeline (which owns TensorFlow)."""
  code = ('import importlib, pkgutil, sys, capenext_jax\n'
          'for m in pkgutil.walk_packages(capenext_jax.__path__, "capenext_jax."):\n'
          '  importlib.import_module(m.name)\n'
          'bad = sorted(k for k in sys.modules if k.split(".")[0] == "data_pipeline")\n'
          'assert not bad, bad\n'
          'print(len([k for k in sys.modules if k.startswith("capenext_jax.")]))')
  proc = subprocess.run([sys.executable, '-c', code], cwd=REPO, capture_output=True, text=True)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert int(proc.stdout.split()[-1]) >= 40   # the walk reached the whole package


def test_mask_outside_bbox_is_the_official_top_down_mask_image():
  """mask_outside_bbox (configs/clip_mask): the query crop is the warp of the source image with
  everything outside the int-cast cleaned bbox zeroed, as `TopDownMaskImage` does it; host and
  device warps agree; the crop's margin (the 1.25 box padding) really is black."""
  import jax.numpy as jnp
  from capenext_jax import image_ops
  src = pl.json_source(ANN['test'], os.path.join(MINI, 'images'), drop_missing_images=False)
  d = src.dataset
  host = _eval_batches(src, pl.PipelineConfig(warp='host', mask_outside_bbox=True))
  dev = _eval_batches(src, pl.PipelineConfig(warp='device', crop_size=2048,
                                             mask_outside_bbox=True))
  plain = _eval_batches(src, pl.PipelineConfig(warp='host'))
  pairs = ep.official_pairs(d, 1, 1, 1)
  black = (0 - MEAN) / STD
  changed = []   # whether masking changed the crop (not where the box margin is off-image)
  for hb, db, pb in zip(host, dev, plain):
    for i in range(len(hb['valid'])):
      q = pairs[hb['pair_index'][i]][-1]
      img = load_rgb(d.image_path[q])
      x, y, w, h = (int(v) for v in d.bbox[q])       # as TopDownMaskImage
      masked = np.zeros_like(img)
      masked[y:y + h, x:x + w] = img[y:y + h, x:x + w]
      m = tr.affine_matrix(d.center[q], d.scale[q], 0.0)
      ref = (np.clip(np.round(ref_warp(masked, m)), 0, 255) / 255 - MEAN) / STD
      assert np.abs(hb['query_image'][i] - ref).max() <= ONE_LEVEL
      assert np.mean(np.abs(hb['query_image'][i] - ref) > 1e-4) < 0.01
      corner = hb['query_image'][i][:4, :4].reshape(-1, 3)   # outside the box: black
      np.testing.assert_allclose(corner, np.broadcast_to(black, corner.shape), atol=1e-5)
      changed.append(np.abs(hb['query_image'][i] - pb['query_image'][i]).max() > 0.5)
    devimg = np.asarray(image_ops.warp_and_normalize(jnp.asarray(db['query_crop']),
                                                     jnp.asarray(db['query_affine'])))
    assert np.abs(devimg - hb['query_image']).max() <= ONE_LEVEL
  assert sum(changed) >= len(changed) // 2, changed
  records = pl.Source(dataset=d, kind='records')
  with pytest.raises(ValueError, match='mask_outside_bbox needs the json source'):
    pl.episode_arrays(records, pairs[:1], pl.PipelineConfig(mask_outside_bbox=True))

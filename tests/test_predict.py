"""capenext-predict on mp100_mini images, its input parsing and geometry, and the overlay.

The checkpoint is the tiny parity fixture (official weights, input size 64); batch mode reads
it through our export format, single-image mode through the fixture reader.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from capenext_jax import export, loading, predict, predictor
from capenext_jax.evaluation.visualize import draw_overlay
from conftest import FIXTURES, MP100_MINI
from capenext_jax.mp100.geometry import bbox_to_center_scale, transform_preds
from capenext_jax.mp100.geometry import affine_matrix, apply_affine

TIGER = 'tiger_body'
DESCRIPTIONS = 'left ear,right ear,nose,right shoulder,right front paw,tail'


def _display_height(height: int, width: int, min_side: int = 768) -> int:
  return round(height * max(1.0, min_side / max(height, width)))


def test_outside_image_on_non_square_photos():
  """A point is off a W != H photo by its own side: x against the width, y against the height
  (points in the band between the two sides are inside under one orientation only), in
  `outside_image` and in the keypoint records capenext-predict writes (both modes)."""
  from capenext_jax.evaluation.visualize import outside_image
  points = np.array([[150, 50], [50, 150], [150, 150], [-1, 50], [200, 100], [0, 0]], float)
  wide_off = [False, True, True, True, False, False]    # 200 wide, 100 high
  tall_off = [True, False, True, True, True, False]     # 100 wide, 200 high
  for (width, height), off in (((200, 100), wide_off), ((100, 200), tall_off)):
    assert outside_image(points, width, height).tolist() == off
    query = predictor.Query(image=np.zeros((height, width, 3), np.uint8),
                            bbox=np.array([0, 0, width, height], np.float32), category='c',
                            descriptions=tuple('abcdef'), skeleton=())
    assert [k['outside_image'] for k in predict.keypoints_record(points, query)] == off


def test_single_image_cli(tmp_path):
  photo = sorted((MP100_MINI / 'images' / TIGER).glob('*.jpg'))[0]
  # A wide strip of the photo (925 x 300), with a box whose padded square crop reaches below
  # the strip: some predictions land in the band 300 < y <= 925, off the image only if y is
  # compared with the height (and not the width).
  image = tmp_path / 'tiger_strip.png'
  Image.open(photo).crop((0, 200, 925, 500)).save(image)
  # The overlay's default path is named after --output, beside it.
  out, png = tmp_path / 'tiger.json', tmp_path / 'tiger_overlay.png'
  rc = predict.main([str(image), '--checkpoint', str(FIXTURES / 'tiny_capenext.npz'),
                     '--category', 'tiger', '--keypoints', DESCRIPTIONS,
                     '--skeleton', '0-2,1-2,2-3,3-4,3-5', '--bbox', '100,50,700,250',
                     '--output', str(out)])
  assert rc == 0
  result = json.loads(out.read_text())
  width, height = Image.open(image).size
  assert (result['width'], result['height']) == (width, height) == (925, 300)
  for k in result['keypoints']:
    off = not (0 <= k['x'] <= width and 0 <= k['y'] <= height)
    assert k['outside_image'] is off
  assert any(0 <= k['x'] <= width and height < k['y'] <= width for k in result['keypoints'])
  assert [k['description'] for k in result['keypoints']] == DESCRIPTIONS.split(',')
  xy = np.array([[k['x'], k['y']] for k in result['keypoints']])
  assert np.isfinite(xy).all()
  # the head's points lie in the crop, which the padded square box (1.25 x 600 px) bounds
  center, scale = bbox_to_center_scale(np.array(result['bbox']))
  # the box as given, and as cleaned (w, h - 1), with the note saying so
  assert result['bbox_given'] == [100, 50, 700, 250] and result['bbox'] == [100, 50, 699, 249]
  assert 'official box cleaning' in result['bbox_note']
  assert (np.abs(xy - center) <= scale * 200 / 2 + 1e-3).all()
  overlay = Image.open(png)
  assert overlay.height == _display_height(height, width)
  assert overlay.width > overlay.height * width / height  # photo + legend panel


def test_batch_mode_with_export(tmp_path):
  model = loading.load_model(FIXTURES / 'tiny_capenext.npz')
  export.export_model(model, tmp_path / 'export')
  ann = MP100_MINI / 'annotations' / 'mini_test.json'
  rc = predict.main(['--coco', str(ann), '--image_root', str(MP100_MINI / 'images'),
                     '--checkpoint', str(tmp_path / 'export'), '--output',
                     str(tmp_path / 'preds.json'), '--overlay_dir', str(tmp_path / 'ov'),
                     '--batch_size', '4'])
  assert rc == 0
  coco = json.loads(ann.read_text())
  preds = json.loads((tmp_path / 'preds.json').read_text())
  assert [p['annotation_id'] for p in preds] == [a['id'] for a in coco['annotations']]
  for p, a in zip(preds, coco['annotations']):
    assert len(p['keypoints']) == len(a['keypoints']) and np.isfinite(p['keypoints']).all()
  assert len(list((tmp_path / 'ov').glob('*.png'))) == len(preds)


def test_errors_exit_cleanly(tmp_path, capsys):
  image = sorted((MP100_MINI / 'images' / TIGER).glob('*.jpg'))[0]
  rc = predict.main([str(image), '--checkpoint', str(tmp_path / 'missing.pth'),
                     '--category', 'tiger', '--keypoints', 'nose'])
  assert rc == 2 and 'no such checkpoint' in capsys.readouterr().err


def test_parsing(tmp_path):
  (tmp_path / 'kp.txt').write_text('left eye\n right eye \nnose, tip\n\n')
  assert predict.parse_descriptions(None, str(tmp_path / 'kp.txt')) == (
      'left eye', 'right eye', 'nose, tip')
  assert predict.parse_descriptions(' a , b ', None) == ('a', 'b')
  with pytest.raises(ValueError, match='101 keypoint descriptions: between 1 and 100'):
    predict.parse_descriptions(','.join(['x'] * 101), None)
  assert predict.parse_skeleton('0-1, 1-2', 3) == ((0, 1), (1, 2))
  assert predict.parse_skeleton('[[0, 2]]', 3) == ((0, 2),)
  with pytest.raises(ValueError, match='index past'):
    predict.parse_skeleton('0-3', 3)
  np.testing.assert_array_equal(predictor.clean_bbox(None, 640, 480), [0, 0, 639, 479])
  np.testing.assert_array_equal(predictor.clean_bbox([-5, 10, 100, 1000], 640, 480),
                                [0, 10, 99, 469])
  with pytest.raises(ValueError, match='no area'):
    predictor.clean_bbox([700, 0, 10, 10], 640, 480)


def test_crop_and_back_transform_agree():
  """The warp samples the image where transform_preds (the decoding) says a crop pixel came
  from, and a point mapped by the affine matrix decodes back to itself."""
  ys, xs = np.mgrid[0:120, 0:200]
  image = np.stack([xs, ys, (xs + ys) // 2], -1).astype(np.uint8)  # linear: bilinear is exact
  bbox = predictor.clean_bbox([30, 20, 90, 70], 200, 120)
  crop, center, scale = predictor.model_input(image, bbox, 64)
  assert crop.shape == (64, 64, 3)
  mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
  pixels = (np.asarray(crop) * std + mean) * 255
  for u, v in ((5, 7), (32, 32), (60, 41)):
    x, y = transform_preds(np.array([[[u, v]]], float), center[None], scale[None], 64)[0, 0]
    np.testing.assert_allclose(pixels[v, u], [x, y, (x + y) / 2], atol=1.01)
  points = np.array([[50.0, 40.0], [100.0, 60.0]])
  in_crop = apply_affine(affine_matrix(center, scale, 0.0, (64, 64)), points)
  np.testing.assert_allclose(transform_preds(in_crop[None], center[None], scale[None], 64)[0],
                             points, atol=1e-3)


def test_draw_overlay():
  image = np.full((100, 150, 3), 128, np.uint8)
  kpts = np.array([[10.0, 10.0], [140.0, 90.0], [75.0, 50.0]])
  out = draw_overlay(image, kpts, [(0, 2), (2, 1)], ['a', 'b', 'c'], gt=kpts + 3)
  assert out.height == 512 and out.width > 768
  assert draw_overlay(image, kpts, legend=False, min_side=0).size == (150, 100)
  with pytest.raises(ValueError, match='index past'):
    draw_overlay(image, kpts, [(0, 3)])

"""Overlay legibility: palette, label placement, the box, error lines, out-of-image points.
(capenext-predict's `outside_image` flags and default overlay path: test_predict.py.)"""
from __future__ import annotations

import os

import numpy as np

from capenext_jax.evaluation import visualize as vis


def test_palette_has_100_distinct_colours():
  lab = vis._srgb_to_lab(vis.PALETTE / 255.0)
  distance = np.linalg.norm(lab[:, None] - lab[None], axis=-1)
  np.fill_diagonal(distance, np.inf)
  # CIELAB distance ~ perceived difference; ~2.3 is "just noticeable". The first dozen colours
  # (most categories have fewer keypoints) are far apart, all 100 still clearly apart.
  assert distance.min() > 15 and distance[:12, :12].min() > 45
  assert len({tuple(c) for c in vis.keypoint_colors(100)}) == 100


def test_labels_avoid_each_other_and_the_points():
  rng = np.random.default_rng(0)
  points = [tuple(p) for p in rng.normal(200, 20, (12, 2))]   # a tight cluster
  sizes = [(14, 12)] * len(points)
  corners = vis.place_labels(points, sizes, (400, 400), radius=4)
  boxes = [(x, y, x + w, y + h) for (x, y), (w, h) in zip(corners, sizes)]
  dots = [(x - 4, y - 4, x + 4, y + 4) for x, y in points]
  for i, a in enumerate(boxes):
    assert all(vis._overlap(a, b) == 0 for b in boxes[i + 1:] + dots), i
  # Each label stays near its point: within the farthest ring of candidates (4 gaps of
  # radius + 2 diagonally, plus half the label).
  centres = np.array([((a[0] + a[2]) / 2, (a[1] + a[3]) / 2) for a in boxes])
  reach = 4 * 6 * 2 ** 0.5 + np.hypot(14, 12) / 2
  assert (np.linalg.norm(centres - np.array(points), axis=1) <= reach + 1e-6).all()


def _canvas(**kwargs):
  image = np.full((100, 100, 3), 128, np.uint8)
  return np.asarray(vis.draw_overlay(image, kwargs.pop('points'), legend=False, min_side=0,
                                     **kwargs))


def test_box_error_lines_and_points_outside_the_image():
  grey = np.array([128, 128, 128])
  inside = np.array([[30.0, 50.0]])
  # the box: its edge is drawn, its inside is not
  boxed = _canvas(points=inside, bbox=(10, 10, 80, 80))
  assert (boxed[10, 50] != grey).any() and (boxed[50, 70] == grey).all()
  # error lines: the midpoint between prediction and a far ground truth
  gt = np.array([[80.0, 50.0]])
  with_lines = _canvas(points=inside, gt=gt)
  without = _canvas(points=inside, gt=gt, error_lines=False)
  assert (with_lines[50, 55] != grey).any() and (without[50, 55] == grey).all()
  # a prediction left of the image is drawn at the left border (not dropped) in its colour
  outside = np.array([[-40.0, 50.0]])
  drawn = _canvas(points=outside)
  colour = np.array(vis.keypoint_colors(1)[0])
  assert (np.abs(drawn[48:53, 0:6].astype(int) - colour).sum(-1) < 30).any()
  assert vis.outside_image([[-40, 50], [50, 50], [50, 101]], 100, 100).tolist() == [
      True, False, True]


def test_overlay_file_names_are_safe_unique_and_short(tmp_path):
  """Category names and annotation ids become file names: none leaves its folder, repeats get
  their own file, and a 272-character name still makes a file (eval.py names overlays before
  the evaluation runs, so no name fails after it)."""
  from types import SimpleNamespace
  long = 'x' * 272
  stems = vis.file_stems(['../escaped', 7, 7, 'Cat', 'cat', long, long, '.hidden', 'chat/猫'])
  assert stems[:5] == ['_escaped', '7', '7_2', 'Cat', 'cat_2']
  assert stems[7:] == ['hidden', 'chat_猫']
  assert stems[5] != stems[6] and all(len(s.encode()) <= vis.MAX_STEM_BYTES for s in stems)
  # eval.py's overlays: `<category>_<pair>.png`, two pairs of each category
  dataset = SimpleNamespace(raw_category_names=[long, 'a/b'], category_index={10: 0, 11: 1})
  pairs = SimpleNamespace(arrays={'category_id': np.array([5, 5, 6, 5]),
                                  'pairs': np.array([[0, 10], [0, 10], [0, 11], [0, 10]])})
  paths = vis.overlay_paths(pairs, dataset, str(tmp_path), per_category=2)
  assert sorted(paths) == [0, 1, 2] and os.path.basename(paths[2]) == 'a_b_2.png'
  for path in paths.values():
    assert os.path.dirname(path) == str(tmp_path)
    open(path, 'wb').close()   # the file system takes the name

"""Keypoint overlays for people: numbered points, skeleton, legend, optional ground truth.

The photo is drawn at its own pixel grid, upscaled (never downscaled) so that its longer side
is at least `min_side` pixels: labels stay readable on small MP-100 crops. A legend panel to
the right lists "i  description" in each keypoint's colour, so it never hides a point.
"""
from __future__ import annotations

import colorsys
import os
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

PANEL_BG = (250, 250, 250)
TEXT = (20, 20, 20)
OUTLINE = (0, 0, 0)
LIGHT = (255, 255, 255)


def keypoint_colors(n: int) -> list[tuple[int, int, int]]:
  """n well-separated saturated colours (golden-ratio hue walk, alternating brightness)."""
  out = []
  for i in range(n):
    hue = (i * 0.618033988749895) % 1.0
    r, g, b = colorsys.hsv_to_rgb(hue, 0.85, 1.0 if i % 2 == 0 else 0.8)
    out.append((int(r * 255), int(g * 255), int(b * 255)))
  return out


def _font(size: int) -> ImageFont.ImageFont:
  # Pillow >= 10.1 ships a scalable default font; older ones only have the tiny bitmap font.
  try:
    return ImageFont.load_default(size=size)
  except TypeError:
    return ImageFont.load_default()


def _display_scale(width: int, height: int, min_side: int) -> float:
  return max(1.0, min_side / max(width, height))


def _to_pil(image) -> Image.Image:
  """PIL RGB image from a PIL image or an [H, W, 3] uint8 / [0, 1] float array."""
  if isinstance(image, Image.Image):
    return image.convert('RGB')
  arr = np.asarray(image)
  if arr.dtype != np.uint8:
    arr = np.clip(arr * (255.0 if arr.max() <= 1.0 else 1.0), 0, 255).astype(np.uint8)
  return Image.fromarray(arr).convert('RGB')


def _draw_skeleton(draw, points, skeleton, colors, width: int) -> None:
  """Lines between drawn points: a dark casing under a line in the first endpoint's colour."""
  for i, j in skeleton:
    if points[i] is None or points[j] is None:
      continue
    draw.line([points[i], points[j]], fill=OUTLINE, width=width + 2)
    draw.line([points[i], points[j]], fill=colors[i], width=width)


def _draw_gt(draw, points, gt_points, colors, radius: float, width: int) -> None:
  """Ground truth as hollow rings, joined to the prediction by a thin error line."""
  for k, g in enumerate(gt_points):
    if g is None:
      continue
    if points[k] is not None:
      draw.line([g, points[k]], fill=colors[k], width=max(1, width // 2))
    box = [g[0] - radius, g[1] - radius, g[0] + radius, g[1] + radius]
    draw.ellipse(box, outline=OUTLINE, width=width + 2)
    draw.ellipse(box, outline=colors[k], width=width)


def _draw_points(draw, points, colors, radius: float, font) -> None:
  """Filled dots with a white rim and the index in outlined white text beside them."""
  for k, p in enumerate(points):
    if p is None:
      continue
    box = [p[0] - radius, p[1] - radius, p[0] + radius, p[1] + radius]
    draw.ellipse(box, fill=colors[k], outline=LIGHT, width=max(1, int(radius / 3)))
    draw.text((p[0] + radius + 1, p[1] - radius - 1), str(k), font=font, fill=LIGHT,
              stroke_width=max(2, font.size // 6), stroke_fill=OUTLINE, anchor='lb')


def _legend_panel(descriptions, colors, height: int, font, title: str) -> Image.Image:
  """Columns of "index  description" rows in the keypoint colours, as tall as the photo."""
  size = font.size
  row, pad = int(size * 1.35), size // 2
  rows_per_col = max(1, (height - 2 * pad - row) // row)
  n_cols = -(-len(descriptions) // rows_per_col) if descriptions else 1
  measure = ImageDraw.Draw(Image.new('RGB', (1, 1)))
  labels = [f'{k:>2}  {d}' for k, d in enumerate(descriptions)]
  col_w = max([measure.textlength(t, font=font) for t in labels + [title]] or [0])
  col_w = int(col_w + 2 * size)
  panel = Image.new('RGB', (n_cols * col_w + 2 * pad, height), PANEL_BG)
  draw = ImageDraw.Draw(panel)
  draw.text((pad, pad), title, font=font, fill=TEXT)
  for k, text in enumerate(labels):
    col, r = divmod(k, rows_per_col)
    x, y = pad + col * col_w, pad + row * (r + 1)
    dot = size * 0.35
    cy = y + row / 2
    draw.ellipse([x, cy - dot, x + 2 * dot, cy + dot], fill=colors[k], outline=OUTLINE)
    draw.text((x + 3 * dot, cy), text, font=font, fill=TEXT, anchor='lm')
  return panel


def draw_overlay(image, keypoints, skeleton: Sequence[Sequence[int]] = (),
                 descriptions: Sequence[str] | None = None, gt=None, *,
                 visible=None, gt_visible=None, title: str | None = None,
                 min_side: int = 768, legend: bool = True) -> Image.Image:
  """Draw predicted (and optionally ground-truth) keypoints on an image.

  Args:
    image: PIL image or [H, W, 3] array (uint8, or float in [0, 1]).
    keypoints: [K, 2] (x, y) in the image's pixel coordinates.
    skeleton: 0-based [i, j] pairs; edges with an index >= K raise ValueError.
    descriptions: K strings for the legend (default: none, only numbers).
    gt: optional [K, 2] ground truth, drawn as rings joined to the prediction.
    visible / gt_visible: optional [K] bools; hidden points are not drawn.
    title: legend heading (default 'keypoints', or 'dot: prediction, ring: ground truth').
    min_side: the photo is upscaled until its longer side has at least this many pixels.
    legend: False returns the (scaled) photo alone.
  Returns:
    PIL RGB image of height H*s and width W*s (+ the legend panel), s = the display scale.
  """
  photo = _to_pil(image)
  kpts = np.asarray(keypoints, np.float64).reshape(-1, 2)
  k = len(kpts)
  bad = [e for e in skeleton if not (0 <= int(e[0]) < k and 0 <= int(e[1]) < k)]
  if bad:
    raise ValueError(f'skeleton edges {bad} index past the {k} keypoints')
  if descriptions is not None and len(descriptions) != k:
    raise ValueError(f'{len(descriptions)} descriptions for {k} keypoints')
  scale = _display_scale(*photo.size, min_side)
  if scale > 1:
    photo = photo.resize((round(photo.width * scale), round(photo.height * scale)),
                         Image.Resampling.LANCZOS)
  base = max(photo.size)
  radius, width = max(4.0, base / 110), max(2, round(base / 250))
  font = _font(max(12, round(base / 40)))
  colors = keypoint_colors(k)

  def placed(points, mask):
    mask = np.ones(k, bool) if mask is None else np.asarray(mask, bool).reshape(k)
    return [tuple(p * scale) if m and np.isfinite(p).all() else None
            for p, m in zip(points, mask)]

  points = placed(kpts, visible)
  draw = ImageDraw.Draw(photo)
  _draw_skeleton(draw, points, [(int(i), int(j)) for i, j in skeleton], colors, width)
  if gt is not None:
    gt_points = placed(np.asarray(gt, np.float64).reshape(k, 2), gt_visible)
    _draw_gt(draw, points, gt_points, colors, radius * 1.6, width)
  _draw_points(draw, points, colors, radius, font)
  if not legend:
    return photo
  if title is None:
    title = 'dot: prediction, ring: ground truth' if gt is not None else 'keypoints'
  names = list(descriptions) if descriptions is not None else [''] * k
  panel = _legend_panel(names, colors, photo.height, _font(max(12, round(base / 48))), title)
  canvas = Image.new('RGB', (photo.width + panel.width, photo.height), PANEL_BG)
  canvas.paste(photo, (0, 0))
  canvas.paste(panel, (photo.width, 0))
  return canvas


def write_overlays(pred: np.ndarray, pairs, dataset, out_dir: str, per_category: int
                   ) -> list[str]:
  """PNG overlays (prediction dots, ground-truth rings) of the first `per_category` pairs of
  every category, named `<category>_<pair>.png` in `out_dir`. Returns the paths written.

  pred: [N, 100, 2] original-image px, aligned with `pairs` (an `EvalPairs` of `dataset`).
  """
  from capenext_jax.mp100.images import load_rgb
  os.makedirs(out_dir, exist_ok=True)
  a = pairs.arrays
  q = a['pairs'][:, -1]
  paths = []
  for c in np.unique(a['category_id']):
    for i in np.flatnonzero(a['category_id'] == c)[:per_category]:
      row = dataset.category_index[q[i]]
      k = int(a['num_keypoints'][i])
      photo = load_rgb(dataset.image_path[q[i]], tuple(dataset.image_size[q[i]]))
      image = draw_overlay(photo, pred[i, :k], dataset.skeletons[row],
                           dataset.descriptions[row][:k], gt=a['gt_keypoints'][i, :k],
                           gt_visible=a['mask'][i, :k])
      name = dataset.raw_category_names[row].replace('/', '_').replace(' ', '_')
      paths.append(os.path.join(out_dir, f'{name}_{i}.png'))
      image.save(paths[-1])
  return paths

"""Keypoint overlays for people: numbered points, skeleton, legend, optional ground truth.

The photo is drawn at its own pixel grid, upscaled (never downscaled) so that its longer side
is at least `min_side` pixels: labels stay readable on small MP-100 crops. A legend panel to
the right lists "i  description" in each keypoint's colour, so it never hides a point.
Colours come from a fixed palette of 100 perceptually distinct ones (one per keypoint slot).
Number labels are placed greedily around their point where they overlap no other label and
no other point. A prediction outside the image is drawn on its border as a triangle pointing
the way it left (`outside_image` tells which ones).

Overlay files are named from user-given parts (category names, annotation ids) through
`file_stems`: safe characters only, unique, and short enough for any file system, so a name
can neither leave its folder, overwrite another overlay, nor fail after the work is done.
"""
from __future__ import annotations

import colorsys
import os
import re
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from capenext_jax.mp100.images import load_rgb

PANEL_BG = (250, 250, 250)
TEXT = (20, 20, 20)
OUTLINE = (0, 0, 0)
LIGHT = (255, 255, 255)


def _srgb_to_lab(rgb: np.ndarray) -> np.ndarray:
  """[N, 3] sRGB in [0, 1] -> CIELAB (D65)."""
  linear = np.where(rgb <= 0.04045, rgb / 12.92, ((rgb + 0.055) / 1.055) ** 2.4)
  xyz = linear @ np.array([[0.4124, 0.3576, 0.1805], [0.2126, 0.7152, 0.0722],
                           [0.0193, 0.1192, 0.9505]]).T / np.array([0.9505, 1.0, 1.089])
  f = np.where(xyz > (6 / 29) ** 3, np.cbrt(xyz), xyz / (3 * (6 / 29) ** 2) + 4 / 29)
  return np.stack([116 * f[:, 1] - 16, 500 * (f[:, 0] - f[:, 1]), 200 * (f[:, 1] - f[:, 2])], 1)


def _palette(n: int = 100) -> np.ndarray:
  """uint8 [n, 3]: farthest-point sampling in CIELAB over saturated and mid-tone colours.

  Candidates are HSV colours bright enough to read on a dark casing and dark enough to read on
  a light legend; starting from red, each next colour is the candidate farthest (Euclidean
  CIELAB, ~ perceptual difference) from every colour already chosen, so the first k colours of
  the palette are as distinct as this greedy choice makes any k of them.
  """
  hsv = np.array([(h / 72, s, v) for h in range(72) for s in (1.0, 0.75, 0.5)
                  for v in (1.0, 0.8, 0.6)])
  rgb = np.array([colorsys.hsv_to_rgb(*c) for c in hsv])
  lab = _srgb_to_lab(rgb)
  chosen = [0]
  distance = np.linalg.norm(lab - lab[0], axis=1)
  for _ in range(n - 1):
    chosen.append(int(np.argmax(distance)))
    distance = np.minimum(distance, np.linalg.norm(lab - lab[chosen[-1]], axis=1))
  return np.round(rgb[chosen] * 255).astype(np.uint8)


PALETTE = _palette()


def keypoint_colors(n: int) -> list[tuple[int, int, int]]:
  """The first n palette colours (distinct up to 100 keypoints; repeats past that)."""
  return [tuple(int(c) for c in PALETTE[i % len(PALETTE)]) for i in range(n)]


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


def _draw_gt(draw, points, gt_points, colors, radius: float, width: int,
             error_lines: bool) -> None:
  """Ground truth as hollow rings, joined to the prediction by a thin error line."""
  for k, g in enumerate(gt_points):
    if g is None:
      continue
    if error_lines and points[k] is not None:
      draw.line([g, points[k]], fill=colors[k], width=max(1, width // 2))
    box = [g[0] - radius, g[1] - radius, g[0] + radius, g[1] + radius]
    draw.ellipse(box, outline=OUTLINE, width=width + 2)
    draw.ellipse(box, outline=colors[k], width=width)


def _draw_points(draw, points, colors, radius: float, outside) -> None:
  """Filled dots with a white rim; points clamped to the border from outside the image are
  triangles pointing outwards (the direction in which the prediction left the image)."""
  for k, p in enumerate(points):
    if p is None:
      continue
    rim = max(1, int(radius / 3))
    if outside[k] is None:
      box = [p[0] - radius, p[1] - radius, p[0] + radius, p[1] + radius]
      draw.ellipse(box, fill=colors[k], outline=LIGHT, width=rim)
      continue
    d = np.asarray(outside[k]) / np.linalg.norm(outside[k])
    normal = np.array([-d[1], d[0]])
    r = radius * 1.6
    tip = np.asarray(p)   # the tip touches the border; the base sits inside
    base = tip - d * 1.7 * r
    triangle = [tuple(tip), tuple(base + normal * r), tuple(base - normal * r)]
    draw.polygon(triangle, fill=colors[k], outline=LIGHT, width=rim)


# Directions in which a label may sit from its point, in order of preference (upper right
# first, as a reader expects), tried on a near ring and then on farther ones (those get a
# leader line to their point).
_DIRECTIONS = ((1, -1), (1, 0), (-1, -1), (-1, 0), (0, -1), (0, 1), (1, 1), (-1, 1))
_RINGS = (1.0, 2.5, 4.0)


def _label_boxes(p, w: float, h: float, gap: float):
  """Candidate (x0, y0, x1, y1) boxes of a w x h label around point p."""
  for ring in _RINGS:
    for dx, dy in _DIRECTIONS:
      ax, ay = p[0] + dx * gap * ring, p[1] + dy * gap * ring
      x = ax if dx > 0 else ax - w if dx < 0 else ax - w / 2
      y = ay if dy > 0 else ay - h if dy < 0 else ay - h / 2
      yield (x, y, x + w, y + h)


def _overlap(a, b) -> float:
  w = min(a[2], b[2]) - max(a[0], b[0])
  h = min(a[3], b[3]) - max(a[1], b[1])
  return max(0.0, w) * max(0.0, h)


def place_labels(points, sizes, bounds, radius: float) -> list[tuple[float, float] | None]:
  """Greedy label placement: for each point (in order) the first candidate box around it that
  overlaps no placed label and no point's dot, else the candidate overlapping least.

  points: [K] (x, y) or None. sizes: [K] (w, h) of each label. bounds: (W, H) of the canvas
  (boxes leaving it count as overlapping). Returns the top-left corner of each label.
  """
  dots = [(p[0] - radius, p[1] - radius, p[0] + radius, p[1] + radius)
          for p in points if p is not None]
  placed, out = [], []
  for p, (w, h) in zip(points, sizes):
    if p is None:
      out.append(None)
      continue
    best, best_cost = None, np.inf
    for box in _label_boxes(p, w, h, radius + 2):
      inside = box[0] >= 0 and box[1] >= 0 and box[2] <= bounds[0] and box[3] <= bounds[1]
      cost = sum(_overlap(box, o) for o in placed + dots) + (0 if inside else w * h)
      if cost < best_cost:
        best, best_cost = box, cost
      if cost == 0:
        break
    placed.append(best)
    out.append(best[:2])
  return out


def _draw_labels(draw, points, font, radius: float, bounds) -> None:
  """The index of each point in outlined white text, placed by `place_labels`."""
  stroke = max(2, font.size // 6)
  texts = [str(k) for k in range(len(points))]
  sizes = []
  for t in texts:
    left, top, right, bottom = draw.textbbox((0, 0), t, font=font, stroke_width=stroke)
    sizes.append((right - left, bottom - top))
  for k, corner in enumerate(place_labels(points, sizes, bounds, radius)):
    if corner is None:
      continue
    w, h = sizes[k]
    # The box's point nearest to the keypoint; a label beyond the near ring gets a leader.
    near = (min(max(points[k][0], corner[0]), corner[0] + w),
            min(max(points[k][1], corner[1]), corner[1] + h))
    if np.hypot(near[0] - points[k][0], near[1] - points[k][1]) > 2 * (radius + 2):
      draw.line([points[k], near], fill=OUTLINE, width=3)
      draw.line([points[k], near], fill=LIGHT, width=1)
    left, top, _, _ = draw.textbbox((0, 0), texts[k], font=font, stroke_width=stroke)
    draw.text((corner[0] - left, corner[1] - top), texts[k], font=font, fill=LIGHT,
              stroke_width=stroke, stroke_fill=OUTLINE)


def _draw_box(draw, box, scale: float, width: int) -> None:
  """The query's bbox (x, y, w, h in image px): a white line on a dark casing."""
  x, y, w, h = (float(v) * scale for v in box)
  draw.rectangle([x, y, x + w, y + h], outline=OUTLINE, width=width + 2)
  draw.rectangle([x + 1, y + 1, x + w - 1, y + h - 1], outline=LIGHT, width=max(1, width - 1))


def draw_box(image, box, corners=()) -> Image.Image:
  """The photo at its own size with the box (x, y, w, h in image px) drawn as the overlays draw
  it, and small marks at `corners` ((x, y) clicks that do not make a box yet)."""
  photo = _to_pil(image)
  width = max(2, round(max(photo.size) / 250))
  draw = ImageDraw.Draw(photo)
  if box is not None:
    _draw_box(draw, box, 1.0, width)
  for x, y in corners:
    r = 3 * width
    draw.line([(x - r, y), (x + r, y)], fill=OUTLINE, width=width + 2)
    draw.line([(x, y - r), (x, y + r)], fill=OUTLINE, width=width + 2)
    draw.line([(x - r, y), (x + r, y)], fill=LIGHT, width=width)
    draw.line([(x, y - r), (x, y + r)], fill=LIGHT, width=width)
  return photo


def outside_image(keypoints, width: int, height: int) -> np.ndarray:
  """bool [K]: predictions that fall outside [0, width] x [0, height] (image pixels)."""
  k = np.asarray(keypoints, np.float64).reshape(-1, 2)
  return ~((k[:, 0] >= 0) & (k[:, 0] <= width) & (k[:, 1] >= 0) & (k[:, 1] <= height))


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
                 min_side: int = 768, legend: bool = True, bbox=None,
                 error_lines: bool = True) -> Image.Image:
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
    bbox: optional (x, y, w, h) of the object box, drawn as a rectangle.
    error_lines: with `gt`, join each prediction to its ground truth (False: rings only).
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

  # Predictions off the image are drawn where they cross its border, pointing outwards.
  width0, height0 = photo.width / scale, photo.height / scale
  off = outside_image(kpts, width0, height0)
  clamped = np.stack([np.clip(kpts[:, 0], 0, width0), np.clip(kpts[:, 1], 0, height0)], 1)
  outside = [tuple(kpts[i] - clamped[i]) if off[i] and np.isfinite(kpts[i]).all() else None
             for i in range(k)]
  points = placed(np.where(off[:, None], clamped, kpts), visible)
  draw = ImageDraw.Draw(photo)
  if bbox is not None:
    _draw_box(draw, bbox, scale, width)
  _draw_skeleton(draw, points, [(int(i), int(j)) for i, j in skeleton], colors, width)
  if gt is not None:
    gt_points = placed(np.asarray(gt, np.float64).reshape(k, 2), gt_visible)
    _draw_gt(draw, points, gt_points, colors, radius * 1.6, width, error_lines)
  _draw_points(draw, points, colors, radius, outside)
  _draw_labels(draw, points, font, radius, photo.size)
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


def pair_overlay(pred: np.ndarray, pairs, dataset, i: int, **kwargs) -> Image.Image:
  """The overlay of eval pair `i`: its query photo, box, prediction dots and ground-truth rings.

  pred: [N, 100, 2] original-image px, aligned with `pairs` (an `EvalPairs` of `dataset`).
  kwargs: passed to `draw_overlay`.
  """
  a = pairs.arrays
  q = a['pairs'][i, -1]
  row, k = dataset.category_index[q], int(a['num_keypoints'][i])
  photo = load_rgb(dataset.image_path[q], tuple(dataset.image_size[q]))
  return draw_overlay(photo, pred[i, :k], dataset.skeletons[row], dataset.descriptions[row][:k],
                      gt=a['gt_keypoints'][i, :k], gt_visible=a['mask'][i, :k],
                      bbox=dataset.bbox[q], **kwargs)


# Characters a file name keeps from a user's id or name; '/' and the rest become '_'.
_UNSAFE = re.compile(r'[^\w.+-]+')
# Bytes of a stem: well under the 255 of common file systems, with room for '_<n>.png'.
MAX_STEM_BYTES = 120


def file_stems(parts: Sequence) -> list[str]:
  """Safe, unique file-name stems from user-given parts (annotation ids, category names), in
  order: other characters than letters, digits and '._+-' become '_' and leading dots go (no
  stem leaves its folder or hides), each is cut to MAX_STEM_BYTES of UTF-8, and a stem met
  before (compared case-blind, as on macOS and Windows) gets '_2', '_3', ..."""
  stems, used = [], set()
  for part in parts:
    stem = _cut(_UNSAFE.sub('_', str(part)).lstrip('.') or '_', MAX_STEM_BYTES)
    unique, n = stem, 1
    while unique.casefold() in used:
      n += 1
      unique = f'{_cut(stem, MAX_STEM_BYTES - len(str(n)) - 1)}_{n}'
    used.add(unique.casefold())
    stems.append(unique)
  return stems


def _cut(text: str, max_bytes: int) -> str:
  """`text` shortened to at most `max_bytes` of UTF-8 (whole characters)."""
  return text.encode()[:max_bytes].decode(errors='ignore')


def overlay_paths(pairs, dataset, out_dir: str, per_category: int) -> dict[int, str]:
  """{pair index: PNG path} of the first `per_category` pairs of every category, named
  `<category>_<pair>.png` in `out_dir` (through `file_stems`). Known before the evaluation
  runs, so a name cannot fail after it."""
  a = pairs.arrays
  chosen = [int(i) for c in np.unique(a['category_id'])
            for i in np.flatnonzero(a['category_id'] == c)[:per_category]]
  names = [f'{dataset.raw_category_names[dataset.category_index[a["pairs"][i, -1]]]}_{i}'
           for i in chosen]
  return {i: os.path.join(out_dir, f'{stem}.png') for i, stem in zip(chosen, file_stems(names))}


def write_overlays(pred: np.ndarray, pairs, dataset, out_dir: str, per_category: int
                   ) -> list[str]:
  """PNG overlays (`pair_overlay`) at `overlay_paths(...)`. Returns the paths written."""
  os.makedirs(out_dir, exist_ok=True)
  paths = overlay_paths(pairs, dataset, out_dir, per_category)
  for i, path in paths.items():
    pair_overlay(pred, pairs, dataset, i).save(path, format='PNG')
  return list(paths.values())


def overlay_grid(pred: np.ndarray, pairs, dataset, count: int, size: int = 320) -> np.ndarray:
  """uint8 [n, size, size, 3]: overlays (no legend) of the first pair of up to `count`
  categories, each letterboxed into a square, for TensorBoard's image dashboard."""
  a = pairs.arrays
  first = [int(np.flatnonzero(a['category_id'] == c)[0]) for c in np.unique(a['category_id'])]
  out = np.zeros((min(count, len(first)), size, size, 3), np.uint8)
  for n, i in enumerate(first[:count]):
    image = pair_overlay(pred, pairs, dataset, i, legend=False, min_side=size)
    image.thumbnail((size, size), Image.Resampling.LANCZOS)
    x, y = (size - image.width) // 2, (size - image.height) // 2
    out[n, y:y + image.height, x:x + image.width] = np.asarray(image)
  return out

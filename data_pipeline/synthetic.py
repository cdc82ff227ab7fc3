"""A procedural MP-100-format dataset: drawn objects with named, coloured keypoints.

Every category is a random template of one of several families (polygon, star, stick animal,
chair, fan, ladder) with its own skeleton. An instance draws the template under a random
similarity transform with small per-joint jitter on a noisy background: limbs as thick lines in
the category colour and each keypoint as a filled disc of its own colour. A category gives its
keypoints distinct colours (a random pick and order from one shared palette) and each keypoint's
description names only its colour ("red point", ...): the description carries the visual
attribute the same way in every category, so the text -> appearance mapping learned on the
training categories transfers to unseen ones (the CLIP towers are random here, so words that
never occur in training, such as a new category's name, carry no meaning). Output: ``<root>/annotations/{prefix}_{train,val,test}.json`` (disjoint categories)
and ``<root>/images/<category>/<n>.jpg``. Ids are ``category_id * 10**14 + n`` (> 2**53 for
category ids >= 91, as in MP-100).

    python -m data_pipeline.synthetic OUT_DIR --categories 12 4 4 --instances 30
"""
from __future__ import annotations

import argparse
import json
import os

import numpy as np

COLORS = [('red', (230, 25, 75)), ('green', (60, 180, 75)), ('yellow', (255, 225, 25)),
          ('blue', (0, 130, 200)), ('orange', (245, 130, 48)), ('purple', (145, 30, 180)),
          ('cyan', (70, 240, 240)), ('magenta', (240, 50, 230)), ('white', (255, 255, 255)),
          ('pink', (250, 190, 212)), ('teal', (0, 128, 128)), ('brown', (170, 110, 40)),
          ('lime', (210, 245, 60)), ('maroon', (128, 0, 0)), ('navy', (0, 0, 128)),
          ('olive', (128, 128, 0))]
ADJECTIVES = ('tiny', 'spiky', 'round', 'tall', 'flat', 'bent', 'wide', 'narrow', 'twisted', 'long',
              'short', 'lopsided', 'bold', 'thin', 'heavy', 'light', 'crooked', 'neat', 'wavy', 'sharp',
              'soft', 'broad', 'slim', 'stout', 'odd', 'plain', 'fancy', 'rough', 'smooth', 'giant')
FAMILIES = ('polygon', 'star', 'stick', 'chair', 'fan', 'ladder')
# Keypoint colours: the first PALETTE entries of COLORS, well apart in RGB. A category has at
# most 12 keypoints (star 2 * 6, stick 12), so each keypoint of a category gets its own colour.
PALETTE = 12


def _template(family: str, rng: np.random.Generator):
  """Canonical points in [-1, 1]^2 and 0-based skeleton edges."""
  if family == 'polygon':
    k = int(rng.integers(3, 9))
    a = np.sort(rng.uniform(0, 2 * np.pi, k)) if rng.random() < 0.5 else np.linspace(0, 2 * np.pi, k, endpoint=False)
    r = rng.uniform(0.6, 1.0, k)
    pts = np.stack([r * np.cos(a), r * np.sin(a)], 1)
    edges = [[i, (i + 1) % k] for i in range(k)]
  elif family == 'star':
    n = int(rng.integers(4, 7))
    a = np.linspace(0, 2 * np.pi, 2 * n, endpoint=False) + rng.uniform(0, np.pi)
    r = np.where(np.arange(2 * n) % 2 == 0, 1.0, rng.uniform(0.3, 0.5))
    pts = np.stack([r * np.cos(a), r * np.sin(a)], 1)
    edges = [[i, (i + 1) % (2 * n)] for i in range(2 * n)]
  elif family == 'stick':
    k = int(rng.integers(6, 13))
    pts = [np.zeros(2)]
    edges = []
    for i in range(1, k):
      parent = int(rng.integers(0, i))
      ang = rng.uniform(0, 2 * np.pi)
      pts.append(pts[parent] + rng.uniform(0.35, 0.6) * np.array([np.cos(ang), np.sin(ang)]))
      edges.append([parent, i])
    pts = np.array(pts)
  elif family == 'chair':
    w, h, d = rng.uniform(0.5, 0.9), rng.uniform(0.5, 0.9), rng.uniform(0.1, 0.3)
    pts = np.array([[-w, 1], [w, 1], [w + d, 0.8], [-w + d, 0.8], [-w, 0], [w, 0], [w + d, -0.2],
                    [-w + d, -0.2], [-w + d, -0.2 - h], [w + d, -0.2 - h]], np.float64)
    edges = [[0, 4], [1, 5], [2, 6], [3, 7], [4, 5], [5, 6], [6, 7], [7, 4], [7, 8], [6, 9], [8, 9]]
  elif family == 'fan':
    k = int(rng.integers(3, 8))
    a = np.linspace(-0.6 * np.pi, -0.4 * np.pi, k) + rng.uniform(-0.2, 0.2, k)
    pts = np.concatenate([[[0.0, 0.8]], np.stack([np.cos(a) * 1.6, 0.8 + np.sin(a) * 1.6], 1)])
    edges = [[0, i] for i in range(1, k + 1)]
  else:  # ladder
    n = int(rng.integers(2, 6))
    ys = np.linspace(-1, 1, n)
    w = rng.uniform(0.3, 0.8)
    pts = np.concatenate([np.stack([np.full(n, -w), ys], 1), np.stack([np.full(n, w), ys], 1)])
    edges = [[i, i + n] for i in range(n)] + [[i, i + 1] for i in range(n - 1)] + \
            [[n + i, n + i + 1] for i in range(n - 1)]
  pts = np.asarray(pts, np.float64)
  pts = pts - pts.mean(0)
  pts = pts / max(1e-6, np.abs(pts).max())
  return pts, [[int(a), int(b)] for a, b in edges]


def make_categories(num: int, rng: np.random.Generator, first_id: int = 1):
  cats = []
  for c in range(num):
    family = FAMILIES[c % len(FAMILIES)]
    pts, edges = _template(family, rng)
    k = len(pts)
    adj = ADJECTIVES[c % len(ADJECTIVES)] + ('' if c < len(ADJECTIVES) else str(c // len(ADJECTIVES)))
    assert k <= PALETTE, (family, k)
    colors = [int(i) for i in rng.permutation(PALETTE)[:k]]
    names = [f'{COLORS[i][0]} point' for i in colors]
    cats.append(dict(id=first_id + c, name=f'{adj}_{family}', supercategory=family, keypoints=names,
                     skeleton=edges, template=pts.tolist(), kpt_colors=colors,
                     color=[int(v) for v in rng.integers(60, 200, 3)]))
  return cats


def _draw_instance(cat, rng, size):
  from PIL import Image, ImageDraw
  bg = rng.integers(0, 90, 3)
  arr = np.clip(rng.normal(0, 12, (size, size, 3)) + bg, 0, 255).astype(np.uint8)
  img = Image.fromarray(arr)
  draw = ImageDraw.Draw(img)
  tpl = np.asarray(cat['template'])
  s = rng.uniform(0.22, 0.4) * size
  ang = rng.uniform(-np.pi, np.pi)
  rot = np.array([[np.cos(ang), -np.sin(ang)], [np.sin(ang), np.cos(ang)]])
  aspect = np.array([rng.uniform(0.8, 1.2), 1.0])
  centre = rng.uniform(0.4, 0.6, 2) * size
  pts = (tpl * aspect + rng.normal(0, 0.04, tpl.shape)) @ rot.T * s + centre
  width = max(2, int(size / 48))
  for a, b in cat['skeleton']:
    draw.line([tuple(pts[a]), tuple(pts[b])], fill=tuple(cat['color']), width=width)
  rad = max(2.5, 0.12 * s)   # discs scale with the object: a few px after the crop
  k = len(pts)
  vis = np.full(k, 2)
  vis[rng.random(k) < 0.08] = 0
  inside = (pts[:, 0] >= 0) & (pts[:, 0] <= size - 1) & (pts[:, 1] >= 0) & (pts[:, 1] <= size - 1)
  vis[~inside] = 0
  if vis.sum() == 0:
    vis[int(np.argmin(np.abs(pts - size / 2).sum(1)))] = 2
  for i in range(k):
    if vis[i] > 0:
      x, y = pts[i]
      draw.ellipse([x - rad, y - rad, x + rad, y + rad], fill=COLORS[cat['kpt_colors'][i]][1])
  kp = []
  for i in range(k):
    kp += [round(float(pts[i, 0]), 2), round(float(pts[i, 1]), 2), int(vis[i])] if vis[i] else [0, 0, 0]
  lab = pts[vis > 0]
  x0, y0 = np.maximum(lab.min(0) - 0.1 * s, 0)
  x1, y1 = np.minimum(lab.max(0) + 0.1 * s, size - 1)
  bbox = [round(float(x0), 2), round(float(y0), 2), round(float(max(x1 - x0, 2)), 2), round(float(max(y1 - y0, 2)), 2)]
  return img, kp, bbox, int((vis > 0).sum())


def generate_synthetic(root: str, categories=(12, 4, 4), instances: int = 30, image_size: int = 128,
                       seed: int = 0, prefix: str = 'synthetic', first_id: int = 1) -> dict:
  """Writes the dataset; returns {split: annotation file path}. Categories are disjoint."""
  rng = np.random.default_rng(seed)
  total = sum(categories)
  cats = make_categories(total, rng, first_id)
  os.makedirs(os.path.join(root, 'annotations'), exist_ok=True)
  out = {}
  start = 0
  for split, n_cat in zip(('train', 'val', 'test'), categories):
    split_cats = cats[start:start + n_cat]
    start += n_cat
    images, anns = [], []
    for cat in split_cats:
      folder = cat['name']
      os.makedirs(os.path.join(root, 'images', folder), exist_ok=True)
      for n in range(instances):
        img, kp, bbox, nk = _draw_instance(cat, rng, image_size)
        iid = cat['id'] * 10 ** 14 + n + 1
        fname = f'{folder}/{n:05d}.jpg'
        img.save(os.path.join(root, 'images', fname), quality=92)
        images.append(dict(id=iid, file_name=fname, width=image_size, height=image_size))
        anns.append(dict(id=iid, image_id=iid, category_id=cat['id'], bbox=bbox, keypoints=kp,
                         num_keypoints=nk, area=round(bbox[2] * bbox[3], 2), iscrowd=0))
    data = dict(info=dict(description='capenext-jax synthetic MP-100-format data', seed=seed),
                images=images, annotations=anns,
                categories=[{k: c[k] for k in ('id', 'name', 'supercategory', 'keypoints', 'skeleton')}
                            for c in split_cats])
    path = os.path.join(root, 'annotations', f'{prefix}_{split}.json')
    with open(path, 'w', encoding='utf-8') as f:
      json.dump(data, f)
    out[split] = path
  return out


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('root')
  p.add_argument('--categories', type=int, nargs=3, default=(12, 4, 4))
  p.add_argument('--instances', type=int, default=30)
  p.add_argument('--image-size', type=int, default=128)
  p.add_argument('--seed', type=int, default=0)
  a = p.parse_args(argv)
  print(json.dumps(generate_synthetic(a.root, a.categories, a.instances, a.image_size, a.seed)))


if __name__ == '__main__':
  main()

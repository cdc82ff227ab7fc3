"""Transforms against independent float64 numpy renderings of the official formulas."""
import math
import os

import numpy as np

from capenext_jax.mp100 import episodes as ep
from capenext_jax.mp100 import geometry
from conftest import MP100_MINI

MINI = str(MP100_MINI)


def ref_affine(c, s, rot, size=256):
  """mmpose get_affine_transform (non-UDP) + cv2.getAffineTransform's 6x6 system, float64."""
  src_w = s[0] * 200.0
  r = math.pi * rot / 180
  sn, cs = math.sin(r), math.cos(r)
  src_dir = np.array([0 * cs - (-0.5 * src_w) * sn, 0 * sn + (-0.5 * src_w) * cs])
  third = lambda a, b: b + np.array([-(a - b)[1], (a - b)[0]])
  src = [np.array(c, float), np.array(c, float) + src_dir]
  src.append(third(*src))
  dst = [np.array([size / 2, size / 2]), np.array([size / 2, size / 2 - size / 2])]
  dst.append(third(*dst))
  a = np.zeros((6, 6))
  b = np.zeros(6)
  for i in range(3):
    a[i, :3] = [src[i][0], src[i][1], 1]
    a[i + 3, 3:] = [src[i][0], src[i][1], 1]
    b[i], b[i + 3] = dst[i]
  return np.linalg.solve(a, b).reshape(2, 3)


def ref_weight_and_heatmap(joints, vis, size=256, hm=64, sigma=1):
  w = np.zeros(len(joints), np.float32)
  target = np.zeros((len(joints), hm, hm), np.float32)
  stride = size / hm
  tmp = sigma * 3
  for j in range(len(joints)):
    w[j] = vis[j]
    mu_x = int(joints[j][0] / stride + 0.5)
    mu_y = int(joints[j][1] / stride + 0.5)
    ul = [int(mu_x - tmp), int(mu_y - tmp)]
    br = [int(mu_x + tmp + 1), int(mu_y + tmp + 1)]
    if ul[0] >= hm or ul[1] >= hm or br[0] < 0 or br[1] < 0:
      w[j] = 0
    if w[j] > 0.5:
      x = np.arange(0, 2 * tmp + 1, 1, np.float64)
      y = x[:, None]
      g = np.exp(-((x - tmp) ** 2 + (y - tmp) ** 2) / (2 * sigma ** 2))
      gx = max(0, -ul[0]), min(br[0], hm) - ul[0]
      gy = max(0, -ul[1]), min(br[1], hm) - ul[1]
      ix = max(0, ul[0]), min(br[0], hm)
      iy = max(0, ul[1]), min(br[1], hm)
      target[j][iy[0]:iy[1], ix[0]:ix[1]] = g[gy[0]:gy[1], gx[0]:gx[1]]
  return w, target


def ref_warp(img, m, size=256):
  """cv2.warpAffine INTER_LINEAR / BORDER_CONSTANT 0 with exact float64 weights."""
  h, w = img.shape[:2]
  full = np.vstack([m, [0, 0, 1]])
  inv = np.linalg.inv(full)[:2]
  ys, xs = np.mgrid[0:size, 0:size].astype(np.float64)
  sx = inv[0, 0] * xs + inv[0, 1] * ys + inv[0, 2]
  sy = inv[1, 0] * xs + inv[1, 1] * ys + inv[1, 2]
  x0, y0 = np.floor(sx).astype(int), np.floor(sy).astype(int)
  fx, fy = sx - x0, sy - y0
  out = np.zeros((size, size, img.shape[2]))
  for dy, wy in ((0, 1 - fy), (1, fy)):
    for dx, wx in ((0, 1 - fx), (1, fx)):
      xi, yi = x0 + dx, y0 + dy
      ok = (xi >= 0) & (xi < w) & (yi >= 0) & (yi < h)
      v = img[np.clip(yi, 0, h - 1), np.clip(xi, 0, w - 1)].astype(np.float64) * ok[..., None]
      out += v * (wx * wy)[..., None]
  return out


def test_affine_matrix_matches_reference():
  rng = np.random.default_rng(0)
  c = rng.uniform(0, 1000, (50, 2))
  s = rng.uniform(0.05, 5, (50, 2))
  r = rng.uniform(-30, 30, 50)
  got = geometry.affine_matrix(c, s, r)
  for i in range(50):
    np.testing.assert_allclose(got[i], ref_affine(c[i], s[i], r[i]), rtol=1e-9, atol=1e-9)


def test_joints_and_weights_match_reference():
  rng = np.random.default_rng(1)
  joints = rng.uniform(-40, 300, (20, 100, 2))
  joints[:, :5] = [[-17.9, 3], [-18.1, 3], [265.9, 10], [266.1, 10], [10, -18.0]]  # boundary cases
  vis = (rng.random((20, 100)) < 0.8).astype(np.float32)
  w = geometry.heatmap_weight(joints, vis)
  for i in range(20):
    np.testing.assert_array_equal(w[i], ref_weight_and_heatmap(joints[i], vis[i])[0])


def test_episode_geometry_matches_reference_on_mini():
  from capenext_jax.mp100.annotations import load_annotations
  d = load_annotations(os.path.join(MINI, 'annotations', 'mini_train.json'), '')
  e = ep.training_episodes(d, 1, seed=0, epoch=0)[:40]
  s, r = ep.augmentation_params(0, 0, len(e), 1)
  g = geometry.episode_geometry(d, e, s, r)
  for i in range(len(e)):
    for j in range(2):
      db = e[i, j]
      m = ref_affine(d.center[db], d.scale[db] * s[i, j], r[i, j])
      joints = d.joints[db].copy()
      vis = d.visible[db]
      for k in range(100):
        if vis[k] > 0:
          joints[k] = m @ [joints[k, 0], joints[k, 1], 1]
      wt, _ = ref_weight_and_heatmap(joints, vis)
      if j == 1:
        np.testing.assert_allclose(g['query_joints'][i], joints, atol=1e-4, rtol=0)
        np.testing.assert_allclose(g['query_matrix'][i], m, atol=1e-9)
        np.testing.assert_array_equal(g['query_weight'][i], wt)
      else:
        np.testing.assert_array_equal(g['support_mask'][i], wt)
    np.testing.assert_array_equal(g['eval_mask'][i], np.logical_and.reduce(d.visible[e[i]] > 0, 0))


def test_jax_warp_matches_reference():
  import jax.numpy as jnp
  from capenext_jax import image_ops
  rng = np.random.default_rng(2)
  imgs = rng.integers(0, 256, (3, 70, 90, 3)).astype(np.uint8)
  mats = np.stack([ref_affine([45, 35], [0.4, 0.4], 20.0, 64),
                   ref_affine([10, 60], [0.3, 0.3], -30.0, 64),
                   ref_affine([80, 5], [0.6, 0.6], 0.0, 64)])
  got = np.asarray(image_ops.warp_affine(jnp.asarray(imgs), jnp.asarray(mats, jnp.float32), 64))
  for i in range(3):
    np.testing.assert_allclose(got[i], ref_warp(imgs[i], mats[i], 64), atol=2e-2)
  norm = np.asarray(image_ops.imagenet_normalize(jnp.asarray(imgs[:1])))
  np.testing.assert_allclose(norm, (imgs[:1] / 255.0 - [0.485, 0.456, 0.406]) / [0.229, 0.224, 0.225],
                             atol=1e-5)


def test_crop_window_covers_every_augmented_view():
  rng = np.random.default_rng(3)
  c = rng.uniform(0, 500, (30, 2))
  s = rng.uniform(0.1, 3, (30, 2))
  wh = np.full((30, 2), 600)
  origin, size, stored = geometry.crop_window(c, s, wh)
  np.testing.assert_array_equal(size, stored)
  for sf in (0.85, 1.15):
    for rot in (-30, -10, 0, 17, 30):
      m = np.stack([ref_affine(c[i], s[i] * sf, rot) for i in range(30)])
      inv = np.linalg.inv(np.concatenate([m, np.tile([[[0, 0, 1]]], (30, 1, 1))], 1))[:, :2]
      corners = np.array([[0, 0], [255, 0], [0, 255], [255, 255]], float)
      src = np.einsum('nij,pj->npi', inv[:, :, :2], corners) + inv[:, None, :, 2]
      lo = np.clip(np.floor(src.min(1)), 0, 600)
      hi = np.clip(np.floor(src.max(1)) + 1, 0, 599)
      assert (lo >= origin).all() and (hi < origin + size).all()


def test_device_heatmaps_match_reference():
  import jax.numpy as jnp
  from capenext_jax import image_ops
  rng = np.random.default_rng(4)
  joints = rng.uniform(-30, 290, (4, 100, 2))
  vis = (rng.random((4, 100)) < 0.8).astype(np.float32)
  hm, wd = image_ops.gaussian_heatmaps(jnp.asarray(joints, jnp.float32), jnp.asarray(vis))
  for i in range(4):
    rw, rh = ref_weight_and_heatmap(joints[i], vis[i])
    np.testing.assert_array_equal(np.asarray(wd[i]), rw)
    np.testing.assert_allclose(np.asarray(hm[i]), rh, atol=1e-6)

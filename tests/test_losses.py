"""capenext_losses and gaussian_heatmaps against tiny_capenext.npz and mmpose's definitions;
gradients of the whole fusion -> head -> loss chain against the fixture's parameter grads."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from capenext_jax.convert.head import (fusion_from_torch, fusion_to_torch, head_from_torch,
                                       head_to_torch)
from capenext_jax.image_ops import gaussian_heatmaps
from capenext_jax.losses import bilinear_matrix, capenext_losses, heatmap_targets
from capenext_jax.models.fusion import FusionConfig, MultiModalFusion
from capenext_jax.models.head import HeadConfig, PoseHead, adjacency_from_skeleton
from conftest import load_fixture

LOSS_KEYS = ('heatmap_loss', 'proposal_loss', 'l1_loss_layer0', 'l1_loss_layer1',
             'l1_loss_layer2', 'acc_pose', 'loss')


@pytest.fixture(scope='module')
def z():
  return load_fixture('tiny_capenext.npz')


def _targets(z):
  joints = np.stack([z[f'meta_b{b}_query_joints_3d'][:, :2] for b in range(3)])
  return joints, z['in_target_weight_q'][..., 0], z['in_target_weight_s'][..., 0]


def _fixture_outputs(z):
  return dict(keypoints=jnp.asarray(z['out_kpts']),
              proposals=jnp.asarray(z['out_initial_proposals']),
              similarity=jnp.asarray(z['out_similarity_map']))


@pytest.mark.parametrize('given_targets', [True, False])
def test_losses_match_official(z, given_targets):
  joints, weight_q, mask_s = _targets(z)
  np.testing.assert_array_equal(joints / 64, z['target_keypoints_norm'])  # / 2**6 is exact
  targets = jnp.asarray(z['in_target_q']) if given_targets else None
  losses = capenext_losses(_fixture_outputs(z), joints, weight_q, mask_s, image_size=64,
                           heatmap_size=16, target_heatmaps=targets)
  for key in LOSS_KEYS:
    ref = float(z[f'loss_{key}'])
    # worst relative error measured 7.2e-8 (float32 sums); 1e-6 leaves ~14x headroom
    assert abs(float(losses[key]) - ref) <= 1e-6 * abs(ref), key


def test_generated_heatmaps_equal_fixture_targets(z):
  joints = np.stack([z[f'meta_b{b}_query_joints_3d'][:, :2] for b in range(3)])
  visible = np.stack([z[f'meta_b{b}_query_joints_3d_visible'][:, 0] for b in range(3)])
  maps, weight = gaussian_heatmaps(jnp.asarray(joints), jnp.asarray(visible), heatmap_size=16,
                                   stride=4, sigma=1)
  np.testing.assert_allclose(np.asarray(maps), z['in_target_q'], atol=1e-7)
  np.testing.assert_array_equal(np.asarray(weight), z['in_target_weight_q'][..., 0])


def _mmpose_msra(joints, visible, heatmap_size, stride, sigma):
  """Straight numpy transcription of the non-UDP MSRA loop (reference for the jax version)."""
  n = len(joints)
  size_w = size_h = heatmap_size
  target = np.zeros((n, size_h, size_w), np.float32)
  weight = visible.astype(np.float32).copy()
  tmp = sigma * 3
  for j in range(n):
    mu_x = int(float(joints[j, 0]) / stride + 0.5)
    mu_y = int(float(joints[j, 1]) / stride + 0.5)
    ul = [int(mu_x - tmp), int(mu_y - tmp)]
    br = [int(mu_x + tmp + 1), int(mu_y + tmp + 1)]
    if ul[0] >= size_w or ul[1] >= size_h or br[0] < 0 or br[1] < 0:
      weight[j] = 0
    if weight[j] > 0.5:
      size = 2 * tmp + 1
      x = np.arange(0, size, 1, np.float32)
      y = x[:, None]
      g = np.exp(-((x - size // 2) ** 2 + (y - size // 2) ** 2) / (2 * sigma ** 2))
      gx = max(0, -ul[0]), min(br[0], size_w) - ul[0]
      gy = max(0, -ul[1]), min(br[1], size_h) - ul[1]
      ix = max(0, ul[0]), min(br[0], size_w)
      iy = max(0, ul[1]), min(br[1], size_h)
      target[j, iy[0]:iy[1], ix[0]:ix[1]] = g[gy[0]:gy[1], gx[0]:gx[1]]
  return target, weight


def test_gaussian_heatmaps_match_mmpose_loop():
  rng = np.random.default_rng(0)
  joints = rng.uniform(-40, 300, (200, 2)).astype(np.float32)
  # Rounding edge cases: x / 4 exactly at k + 0.5 and just below it, negatives near -0.5.
  joints[:6, 0] = [2.0, 2.0 - 1e-5, 254.0, -2.0, -2.0 - 1e-5, -6.0]
  visible = (rng.uniform(size=200) > 0.2).astype(np.float32)
  ref_maps, ref_weight = _mmpose_msra(joints, visible, 64, 4, 1)
  maps, weight = gaussian_heatmaps(jnp.asarray(joints), jnp.asarray(visible))
  np.testing.assert_allclose(np.asarray(maps), ref_maps, atol=1e-7)
  np.testing.assert_array_equal(np.asarray(weight), ref_weight)


@pytest.mark.parametrize('in_size,out_size', [(64, 16), (16, 4), (10, 4), (7, 3)])
def test_bilinear_matrix_matches_torch(in_size, out_size):
  x = np.random.default_rng(1).normal(size=(2, 3, in_size, in_size)).astype(np.float32)
  ref = torch.nn.functional.interpolate(torch.from_numpy(x), size=(out_size, out_size),
                                        mode='bilinear', align_corners=False).numpy()
  m = bilinear_matrix(in_size, out_size)
  np.testing.assert_allclose(np.einsum('yh,bchw,xw->bcyx', m, x, m), ref, atol=1e-6)


def test_sampled_targets_equal_full_path():
  """Generating only the pixels the resize reads equals generate-full-then-resize."""
  rng = np.random.default_rng(2)
  joints = jnp.asarray(rng.uniform(-10, 266, (2, 100, 2)).astype(np.float32))
  weight = jnp.asarray((rng.uniform(size=(2, 100)) > 0.3).astype(np.float32))
  full, _ = gaussian_heatmaps(joints, weight, 64, 4, 1)
  a = heatmap_targets((16, 16), joints, weight, 256, 64)
  b = heatmap_targets((16, 16), joints, weight, 256, 64, target_heatmaps=full)
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert float(a.max()) == pytest.approx(1.0, abs=1e-6)


def test_all_masked_sample_is_finite(z):
  joints, weight_q, mask_s = _targets(z)
  mask_s = mask_s.copy()
  mask_s[1] = 0
  losses = capenext_losses(_fixture_outputs(z), joints, weight_q, mask_s, image_size=64,
                           heatmap_size=16)
  assert all(np.isfinite(float(v)) for v in losses.values())


def test_chain_gradients_match_official(z):
  """d loss / d params through fusion -> head -> losses (eval mode) equals the fixture's
  `grad/*`: checks the head's detach points and the loss weighting end to end."""
  cfg = json.loads(str(z['config_json']))
  sd = {k: z[k] for k in z['state_dict_keys']}
  strip = lambda p: {k[len(p):]: v for k, v in sd.items() if k.startswith(p)}
  fusion = MultiModalFusion(FusionConfig(embed_dim=64), rngs=nnx.Rngs(0))
  head = PoseHead(HeadConfig(d_model=32, nhead=4, dim_feedforward=48, similarity_proj_dim=32,
                             dynamic_proj_dim=16, num_feats=16, img_in_channels=96,
                             text_in_channels=cfg['clip']['embed_dim']), rngs=nnx.Rngs(0))
  for model, params in ((fusion, fusion_from_torch(strip('additional_module.'))),
                        (head, head_from_torch(strip('keypoint_head.')))):
    state = nnx.state(model, nnx.Param)
    nnx.replace_by_pure_dict(state, params)
    nnx.update(model, state)
    model.eval()
  joints, weight_q, mask_s = _targets(z)
  adjacency = jnp.asarray(np.stack(
      [adjacency_from_skeleton(z[f'meta_b{b}_skeleton']) for b in range(3)]))
  gdf, pf, rf = nnx.split(fusion, nnx.Param, ...)
  gdh, ph, rh = nnx.split(head, nnx.Param, ...)

  @jax.jit
  def total(pf, ph):
    text = nnx.merge(gdf, pf, rf)(jnp.asarray(z['mm_in_image_embedding']),
                                  jnp.asarray(z['mm_in_joint_text_embedding']),
                                  jnp.asarray(z['mm_in_category_embedding']))
    out = nnx.merge(gdh, ph, rh)(jnp.asarray(z['backbone_feature'].transpose(0, 2, 3, 1)),
                                 text, mask_s, adjacency)
    return capenext_losses(out, joints, weight_q, mask_s, image_size=64, heatmap_size=16,
                           target_heatmaps=jnp.asarray(z['in_target_q']))['loss']

  loss, (gf, gh) = jax.value_and_grad(total, argnums=(0, 1))(pf, ph)
  assert abs(float(loss) - float(z['loss_loss'])) <= 1e-6 * float(z['loss_loss'])  # measured 0
  # Worst |g - ref| / max|ref| per tensor measured: fusion 4.2e-5 (its gate biases, sums that
  # mostly cancel: max|ref| 1e-3 against 4e-8 of float32 noise), head 2.3e-6; ~10-20x headroom.
  for prefix, grads, rtol in (
      ('additional_module.', fusion_to_torch(nnx.to_pure_dict(gf)), 5e-4),
      ('keypoint_head.', head_to_torch(nnx.to_pure_dict(gh)), 5e-5)):
    for name, g in grads.items():
      ref = z[f'grad/{prefix}{name}']
      assert np.abs(g - ref).max() <= rtol * np.abs(ref).max() + 1e-9, prefix + name

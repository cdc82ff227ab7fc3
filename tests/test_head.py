"""PoseHead against tiny_capenext.npz (head alone), adjacency, masking and init checks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from capenext_jax.convert.head import head_from_torch, head_to_torch
from capenext_jax.models.head import HeadConfig, PoseHead, adjacency_from_skeleton
from conftest import load_fixture

TINY = HeadConfig(d_model=32, nhead=4, dim_feedforward=48, similarity_proj_dim=32,
                  dynamic_proj_dim=16, num_feats=16, img_in_channels=96, text_in_channels=64)
PREFIX = 'keypoint_head.'


def _load(model, params):
  state = nnx.state(model, nnx.Param)
  nnx.replace_by_pure_dict(state, params)
  nnx.update(model, state)


def _inputs(z):
  adjacency = np.stack([adjacency_from_skeleton(z[f'meta_b{b}_skeleton']) for b in range(3)])
  return (jnp.asarray(z['backbone_feature'].transpose(0, 2, 3, 1)),
          jnp.asarray(z['mm_out_text_embeddings']), jnp.asarray(z['in_target_weight_s'][..., 0]),
          jnp.asarray(adjacency))


@pytest.fixture(scope='module')
def tiny():
  z = load_fixture('tiny_capenext.npz')
  sd = {k[len(PREFIX):]: z[k] for k in z['state_dict_keys'] if k.startswith(PREFIX)}
  model = PoseHead(TINY, rngs=nnx.Rngs(0))
  _load(model, head_from_torch(sd))
  model.eval()
  return z, sd, model, model(*_inputs(z))


def test_converter_round_trip_and_structure(tiny):
  _, sd, _, _ = tiny
  params = head_from_torch(sd)
  fresh = nnx.to_pure_dict(nnx.state(PoseHead(TINY, rngs=nnx.Rngs(1)), nnx.Param))
  assert jax.tree_util.tree_structure(params) == jax.tree_util.tree_structure(fresh)
  assert jax.tree_util.tree_all(
      jax.tree_util.tree_map(lambda a, b: a.shape == b.shape, params, fresh))
  back = head_to_torch(params)
  assert set(back) == set(sd)
  for k, v in back.items():
    np.testing.assert_array_equal(v, sd[k])


def test_converter_errors(tiny):
  _, sd, _, _ = tiny
  name = 'transformer.decoder.layers.1.multihead_attn.v_proj_weight'
  with pytest.raises(ValueError, match=name):
    head_from_torch({k: v for k, v in sd.items() if k != name})
  with pytest.raises(ValueError, match='transformer.decoder.foo'):
    head_from_torch({**sd, 'transformer.decoder.foo': np.zeros(2)})
  with pytest.raises(ValueError, match='kernel-1'):
    head_from_torch({**sd, 'input_proj.weight': np.zeros((32, 96, 3, 3), np.float32)})
  params = head_from_torch(sd)
  del params['decoder_norm']['scale']
  with pytest.raises(ValueError, match='decoder_norm/scale'):
    head_to_torch(params)


def _check(name, ours, ref, tol):
  err = np.abs(np.asarray(ours) - ref).max()
  assert err <= tol, f'{name}: max |diff| {err:.3g} > {tol}'


def test_intermediates_match_official(tiny):
  z, _, _, out = tiny
  nchw = lambda a: a.transpose(0, 2, 3, 1)
  seq = lambda a: a.transpose(1, 0, 2)
  _check('input_proj', out['input_proj'], nchw(z['head_input_proj']), 1e-5)
  _check('pos_embed', out['pos_embed'], nchw(z['head_pos_embed']), 1e-5)
  _check('text_proj', out['text_proj'], z['head_text_proj'], 1e-5)
  _check('enc_query_feat', out['enc_query_feat'], seq(z['enc_query_feat']), 1e-5)
  _check('enc_support_feat', out['enc_support_feat'], seq(z['enc_support_feat']), 1e-5)
  _check('similarity', out['similarity'], z['prop_similarity'], 1e-4)
  _check('proposals', out['proposals'], z['prop_for_loss'], 1e-5)
  _check('prop_local', out['prop_local'], z['prop_local'], 1e-5)
  _check('dec_outs', out['dec_outs'], z['dec_outs'].transpose(0, 2, 1, 3), 1e-5)
  _check('dec_out_points', out['dec_out_points'], z['dec_out_points'], 1e-5)
  _check('dec_cross_attn_maps', out['dec_cross_attn_maps'], z['dec_cross_attn_maps'], 1e-5)
  _check('keypoints', out['keypoints'], z['out_kpts'], 1e-5)


def test_masking(tiny):
  """Masked slots (text and skeleton edges) do not change valid outputs; an all-masked
  sample stays finite."""
  z, _, model, out = tiny
  feature, text, mask, adjacency = _inputs(z)
  masked = np.asarray(mask) == 0
  noise = jax.random.normal(jax.random.key(0), text.shape)
  text2 = jnp.where(masked[..., None], text + 5.0 * noise, text)
  adj2 = np.asarray(adjacency).copy()
  adj2[0, 5, :] = adj2[0, :, 5] = 1.0           # slot 5 of sample 0 is masked in the support
  adj2[0, 5, 5] = 0.0
  out2 = model(feature, text2, mask, jnp.asarray(adj2))
  valid = ~masked
  for key in ('keypoints', 'dec_outs'):
    np.testing.assert_allclose(np.asarray(out2[key])[:, valid], np.asarray(out[key])[:, valid],
                               atol=1e-6, err_msg=key)
  np.testing.assert_allclose(np.asarray(out2['similarity'])[valid],
                             np.asarray(out['similarity'])[valid], atol=1e-5)

  empty = mask.at[1].set(0.0)
  out3 = model(feature, text, empty, adjacency)
  for key in ('keypoints', 'proposals', 'similarity', 'dec_outs'):
    assert bool(jnp.isfinite(out3[key]).all()), key
  # Other samples are unaffected by sample 1 losing all its queries.
  np.testing.assert_allclose(np.asarray(out3['keypoints'])[:, 0],
                             np.asarray(out['keypoints'])[:, 0], atol=1e-6)


def test_adjacency_from_skeleton():
  adj = adjacency_from_skeleton([[0, 1], [2, 1]], num_slots=4)
  expected = np.zeros((4, 4), np.float32)
  expected[[0, 1, 1, 2], [1, 0, 2, 1]] = 1
  np.testing.assert_array_equal(adj, expected)
  assert adj.dtype == np.float32
  with pytest.raises(ValueError, match='empty'):
    adjacency_from_skeleton(np.zeros((0, 2), np.int64))
  with pytest.raises(ValueError, match=r'edge 1 = \[3, 100\]'):
    adjacency_from_skeleton([[0, 1], [3, 100]])
  with pytest.raises(ValueError, match=r'edge 0 = \[-1, 2\]'):
    adjacency_from_skeleton([[-1, 2]])


def test_fresh_init():
  """Official init: zero last kpt_branch layer, so every layer outputs its reference points;
  xavier weights and zero biases elsewhere."""
  cfg = HeadConfig(d_model=16, nhead=2, dim_feedforward=24, similarity_proj_dim=16,
                   dynamic_proj_dim=8, num_feats=8, img_in_channels=12, text_in_channels=10,
                   num_slots=6)
  model = PoseHead(cfg, rngs=nnx.Rngs(0))
  model.eval()
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  assert not np.any(params['kpt_branch'][0]['layers'][3]['kernel'])
  out_proj = params['decoder_layers'][0]['cross_attn']['out_proj']
  assert np.abs(out_proj['kernel']).max() <= np.sqrt(6 / 64) and not np.any(out_proj['bias'])
  key = jax.random.split(jax.random.key(0), 2)
  mask = jnp.array([[1, 1, 0, 1, 0, 0], [0, 0, 0, 0, 0, 0]], jnp.float32)
  adjacency = jnp.asarray(np.stack([adjacency_from_skeleton([[0, 1], [1, 2]], 6)] * 2))
  out = model(jax.random.normal(key[0], (2, 4, 4, 12)), jax.random.normal(key[1], (2, 6, 10)),
              mask, adjacency)
  assert out['keypoints'].shape == (3, 2, 6, 2) and out['similarity'].shape == (2, 6, 4, 4)
  for l in range(3):
    np.testing.assert_allclose(np.asarray(out['keypoints'][l]), np.asarray(out['prop_local']),
                               atol=1e-6)
  with pytest.raises(ValueError, match='num_feats'):
    PoseHead(HeadConfig(num_feats=64), rngs=nnx.Rngs(0))

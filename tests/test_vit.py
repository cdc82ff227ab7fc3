"""ViT backbones (timm ViT-B/16, DINOv2 ViT-S/14) and their importers, against fixtures made
from the reference code by tests/fixtures/make_vit_fixtures.py (tiny sizes, random weights)."""
from __future__ import annotations

import dataclasses
import json
import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from flax import nnx

from capenext_jax.convert import vit as vit_convert
from capenext_jax.models import vit
from capenext_jax.models.layers import init_rngs

FIXTURES = pathlib.Path(__file__).resolve().parent / 'fixtures'


def _fixture(name: str) -> dict[str, np.ndarray]:
  with np.load(FIXTURES / name, allow_pickle=False) as z:
    return {k: z[k] for k in z.files}


def _prefixed(arrays: dict, prefix: str) -> dict[str, np.ndarray]:
  return {k[len(prefix):]: v for k, v in arrays.items() if k.startswith(prefix)}


def _loaded(make, params: dict) -> nnx.Module:
  """The module `make()` builds, abstractly (no random init), holding `params`; eval mode."""
  model = nnx.eval_shape(make)
  state = nnx.state(model, nnx.Param)
  state.replace_by_pure_dict(params)
  nnx.update(model, state)
  model.eval()
  return model


def _nhwc(x: np.ndarray) -> jax.Array:
  return jnp.asarray(x.transpose(0, 2, 3, 1))


def _assert_close(ours, ref, what: str, tol: float = 1e-5):
  """|ours - ref| <= tol * max|ref| elementwise."""
  ours, ref = np.asarray(ours), np.asarray(ref)
  assert ours.shape == ref.shape, (what, ours.shape, ref.shape)
  err = np.abs(ours - ref).max() / np.abs(ref).max()
  assert err <= tol, f'{what}: {err:.2e} of max|ref| > {tol}'


def _assert_grad_close(ours, ref, what: str, tol: float = 1e-4):
  """||ours - ref|| <= tol * ||ref|| (or ours exactly 0 where the reference has no gradient)."""
  ours, ref = np.asarray(ours), np.asarray(ref)
  assert ours.shape == ref.shape, (what, ours.shape, ref.shape)
  if not ref.any():
    assert not ours.any(), f'{what}: the reference gradient is 0, ours is not'
    return
  err = np.linalg.norm(ours - ref) / np.linalg.norm(ref)
  assert err <= tol, f'{what}: relative error {err:.2e} > {tol}'


@nnx.jit
def _value_and_grads(model, x, probe):
  """out, d sum(out * probe) / d(x, params)."""
  def loss(params, x):
    m = nnx.merge(graphdef, params, rest)
    out = m(x)
    return jnp.sum(out * probe), out

  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  (_, out), (g_params, g_x) = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(params, x)
  return out, g_x, g_params


def _check_parity(model, z, to_torch, prefix_of):
  """Features, input gradient and every parameter gradient against the fixture `z`."""
  out, g_x, g_params = _value_and_grads(model, _nhwc(z['in_x']), _nhwc(z['probe']))
  _assert_close(np.asarray(out).transpose(0, 3, 1, 2), z['out'], 'features')
  _assert_grad_close(np.asarray(g_x).transpose(0, 3, 1, 2), z['gin_x'], 'input gradient')
  grads = to_torch(jax.tree.map(np.asarray, nnx.to_pure_dict(g_params)))
  expected = {prefix_of(k): v for k, v in _prefixed(z, 'g.').items()
              if not k.startswith('w.head.')}  # timm's classifier head: not part of the model
  assert set(grads) == set(expected)
  for name, grad in grads.items():
    _assert_grad_close(grad, expected[name], f'gradient of {name}')


# ----------------------------------------------------------------------------- timm ViT
@pytest.fixture(scope='module')
def timm_case():
  z = _fixture('vit_timm.npz')
  c = json.loads(str(z['config']))
  config = vit.TimmViTConfig(img_size=c['img_size'], patch_size=c['patch_size'],
                             embed_dim=c['embed_dim'], depth=c['depth'],
                             num_heads=c['num_heads'], adaptor_channels=c['adaptor_channels'])
  sd = {'vit_backbone.' + k: v for k, v in _prefixed(z, 'w.').items()}
  sd.update({'channel_adaptor.' + k: v for k, v in _prefixed(z, 'a.').items()})
  sd = {k: v for k, v in sd.items() if not k.startswith('vit_backbone.head.')}
  params = vit_convert.feature_extractor_from_torch(sd)
  model = _loaded(lambda: vit.ViTFeatureExtractor(config, rngs=nnx.Rngs(0)), params)
  return config, z, model


def test_timm_vit_feature_extractor_parity(timm_case):
  _, z, model = timm_case

  def prefix_of(name):   # fixture gradient names -> official ViTFeatureExtractor names
    return ('vit_backbone.' + name[2:] if name.startswith('w.')
            else 'channel_adaptor.' + name[2:])

  _check_parity(model, z, vit_convert.feature_extractor_to_torch, prefix_of)


def test_timm_vit_layout_round_trip(timm_case):
  _, z, _ = timm_case
  sd = _prefixed(z, 'w.')
  back = vit_convert.vit_to_torch(vit_convert.vit_from_torch(sd, dinov2=False))
  assert set(back) == set(sd) - {'head.weight', 'head.bias'}
  for k, v in back.items():
    assert np.array_equal(v, sd[k]), k


# ----------------------------------------------------------------------------- DINOv2
@pytest.fixture(scope='module')
def dinov2_case():
  z = _fixture('vit_dinov2.npz')
  c = json.loads(str(z['config']))
  config = vit.DinoV2Config(img_size=c['query_size'], input_size=c['input_size'],
                            pos_size=c['img_size'], patch_size=c['patch_size'],
                            embed_dim=c['embed_dim'], depth=c['depth'], num_heads=c['num_heads'],
                            layer_scale=c['init_values'],
                            interpolate_offset=c['interpolate_offset'])
  params = vit_convert.dinov2_from_torch(_prefixed(z, 'w.'))
  model = _loaded(lambda: vit.DinoV2Backbone(config, rngs=nnx.Rngs(0)), params)
  return config, z, model


def test_dinov2_backbone_parity(dinov2_case):
  """Resize 64 -> 56, position embedding resampled 9x9 -> 4x4 with DINOv2's offset, LayerScale;
  the mask token gets no gradient in either."""
  _, z, model = dinov2_case
  _check_parity(model, z, vit_convert.vit_to_torch, lambda name: name[2:])


@pytest.mark.parametrize('pos_grid,grid', [(37, 16), (37, 18), (9, 4)])
def test_dinov2_position_resampling_is_torch_bicubic(pos_grid, grid):
  """At the real sizes (37x37 -> 16x16 for 224 px) too: the matrix form of DINOv2's
  `interpolate(scale_factor=(g + 0.1) / M, mode='bicubic', antialias=False)`."""
  x = np.random.default_rng(0).standard_normal((1, 8, pos_grid, pos_grid)).astype(np.float32)
  scale = (grid + 0.1) / pos_grid
  ref = F.interpolate(torch.from_numpy(x), scale_factor=(scale, scale), mode='bicubic',
                      antialias=False).numpy()[0]
  m = vit.dinov2_position_resample(pos_grid, grid, 0.1)
  _assert_close(np.einsum('hi,cij,wj->chw', m, x[0], m), ref, 'resampled grid')


# ----------------------------------------------------------------------------- importers
@pytest.fixture(scope='module')
def hf():
  return _fixture('vit_hf.npz')


@pytest.mark.parametrize('layout', ['hf_vit.', 'hf_memory_vit.'])
def test_hf_vit_layout_matches_transformers(hf, layout):
  """google/vit-base-patch16-224's layout (ViTForImageClassification: `vit.` prefix, classifier;
  the hub files' names and transformers 5's in-memory ones) imported and run by our model gives
  transformers' last_hidden_state."""
  config = vit.TimmViTConfig(img_size=32, patch_size=8, embed_dim=16, depth=2, num_heads=2)
  params = vit_convert.backbone_from_state_dict(config, _prefixed(hf, layout))
  model = _loaded(lambda: vit.VisionTransformer(config.vit, rngs=nnx.Rngs(0)), params)
  _assert_close(model.tokens(_nhwc(hf['in_vit'])), hf['vit_tokens'], 'ViTModel tokens')


@pytest.mark.parametrize('layout', ['hf_dinov2.', 'hf_memory_dinov2.'])
def test_hf_dinov2_layout_matches_transformers(hf, layout):
  """facebook/dinov2-small's layout (Dinov2Model) at its native grid (transformers resamples the
  position embedding differently from DINOv2, so parity is taken where neither resamples)."""
  config = vit.DinoV2Config(img_size=56, input_size=56, pos_size=56, patch_size=14,
                            embed_dim=16, depth=2, num_heads=2)
  params = vit_convert.backbone_from_state_dict(config, _prefixed(hf, layout))
  model = _loaded(lambda: vit.VisionTransformer(config.vit, rngs=nnx.Rngs(0)), params)
  _assert_close(model.tokens(_nhwc(hf['in_dinov2'])), hf['dinov2_tokens'], 'Dinov2Model tokens')


def _save(sd: dict, path: pathlib.Path) -> pathlib.Path:
  if path.suffix == '.safetensors':
    from safetensors.numpy import save_file
    save_file({k: np.ascontiguousarray(v) for k, v in sd.items()}, str(path))
  else:
    torch.save({k: torch.from_numpy(v) for k, v in sd.items()}, path)
  return path


@pytest.mark.parametrize('suffix', ['.pth', '.safetensors'])
def test_load_backbone_files(tmp_path, timm_case, dinov2_case, hf, suffix):
  """Both layouts, both file types, for both backbones, equal the direct conversion."""
  timm_config, timm_z, _ = timm_case
  dino_config, dino_z, _ = dinov2_case
  cases = [(timm_config, _prefixed(timm_z, 'w.'), False),
           (dino_config, _prefixed(dino_z, 'w.'), True)]
  for config, sd, dinov2 in cases:
    loaded = vit_convert.load_backbone(config, _save(sd, tmp_path / f'ref{dinov2}{suffix}'))
    expected = vit_convert.vit_from_torch(sd, dinov2=dinov2)
    jax.tree.map(np.testing.assert_array_equal, loaded, expected)
  hf_sd = _prefixed(hf, 'hf_vit.')
  config = vit.TimmViTConfig(img_size=32, patch_size=8, embed_dim=16, depth=2, num_heads=2)
  loaded = vit_convert.load_backbone(config, _save(hf_sd, tmp_path / f'hf{suffix}'))
  jax.tree.map(np.testing.assert_array_equal, loaded,
               vit_convert.backbone_from_state_dict(config, hf_sd))


# ----------------------------------------------------------------------------- bad input
def test_bad_files_name_backbone_file_and_key(tmp_path, timm_case, dinov2_case, hf):
  timm_config, timm_z, _ = timm_case
  dino_config, dino_z, _ = dinov2_case
  timm_sd, dino_sd = _prefixed(timm_z, 'w.'), _prefixed(dino_z, 'w.')

  def error(config, sd, name):
    path = _save(sd, tmp_path / name)
    with pytest.raises(ValueError) as e:
      vit_convert.load_backbone(config, path)
    assert str(path) in str(e.value)
    return str(e.value)

  # another architecture: DINOv2 weights for the timm ViT and the other way round
  msg = error(timm_config, dino_sd, 'dino.pth')
  assert msg.startswith('vit_b16: ') and "'mask_token'" in msg and 'unexpected' in msg
  msg = error(dino_config, timm_sd, 'timm.pth')
  assert msg.startswith('dinov2_s14: ') and 'blocks.0.ls1.gamma' in msg and 'missing' in msg
  # another size: tiny weights for the real ViT-B/16 and ViT-S/14
  assert 'cls_token has shape (1, 1, 16), expected (1, 1, 768)' in error(
      vit.TimmViTConfig(), timm_sd, 'small.safetensors')
  assert 'cls_token has shape (1, 1, 16), expected (1, 1, 384)' in error(
      vit.DinoV2Config(), dino_sd, 'small_dino.safetensors')
  # another input size: a ViT laid out for 32 px given to one for 48 px
  assert 'pos_embed has shape (1, 17, 16), expected (1, 37, 16)' in error(
      dataclasses.replace(timm_config, img_size=48), timm_sd, 'size.pth')
  # more blocks than the config has
  assert "unexpected keys ['blocks.1.norm1.weight'" in error(
      vit.TimmViTConfig(img_size=32, patch_size=8, embed_dim=16, depth=1, num_heads=2),
      timm_sd, 'deep.pth')
  # a missing and an extra key
  incomplete = {k: v for k, v in timm_sd.items() if k != 'blocks.1.mlp.fc2.bias'}
  assert "missing keys ['blocks.1.mlp.fc2.bias']" in error(timm_config, incomplete, 'miss.pth')
  assert "'blocks.0.attn.extra'" in error(timm_config, {**timm_sd, 'blocks.0.attn.extra':
                                                        np.zeros(3, np.float32)}, 'extra.pth')
  # a transformers file without one of q / k / v, and one with an unknown layer entry
  hf_sd = _prefixed(hf, 'hf_vit.')
  no_key = {k: v for k, v in hf_sd.items() if 'layer.0.attention.attention.key' not in k}
  assert re.search(r'blocks\.0\.attn\.qkv\.(weight|bias): missing the key part',
                   error(timm_config, no_key, 'q.pth'))
  assert 'vit.encoder.layer.0.odd.weight' in error(
      timm_config, {**hf_sd, 'vit.encoder.layer.0.odd.weight': np.zeros(2, np.float32)}, 'o.pth')
  # a Swin V2 state dict
  assert 'not a ViT state dict' in error(
      timm_config, {'layers.0.blocks.0.norm1.weight': np.zeros(4, np.float32)}, 'swin.pth')


def test_config_rejects_inconsistent_sizes():
  with pytest.raises(ValueError, match='input_size 56 differs from pos_size 64'):
    vit.ViTConfig(pos_size=64, input_size=56, patch_size=8)
  with pytest.raises(ValueError, match='img_size 230 is not a multiple of patch_size 16'):
    vit.TimmViTConfig(img_size=230)
  with pytest.raises(ValueError, match='input_size 220 is not a multiple of patch_size 14'):
    vit.DinoV2Config(input_size=220)


# ----------------------------------------------------------------------------- in CapeNext
def test_presets_and_run_configs():
  """vit_b16 runs at 224 px (the official clip_vit configs), with 64 px targets (stride 3.5);
  dinov2_s14 at 256 px, resized to 224 inside; the head reads their channels."""
  from capenext_jax.models.capenext import CapeNextConfig
  from capenext_jax.mp100.geometry import heatmap_side
  from configs import mp100
  vit_b16, dino = CapeNextConfig.variant('vit_b16'), CapeNextConfig.variant('dinov2_s14')
  assert (vit_b16.image_size, vit_b16.head.img_in_channels) == (224, 768)
  assert vit_b16.backbone.vit == vit.ViTConfig()            # timm vit_base_patch16_224
  assert (dino.image_size, dino.head.img_in_channels, dino.backbone.output_resolution) == (
      256, 384, 16)
  for name, size in (('vit_b16', 224), ('dinov2_s14', 256)):
    c = mp100.get_config(f'backbone={name}')
    model = CapeNextConfig.from_dict(c.model.to_dict())
    assert model.image_size == size and c.data.heatmap_size == 64
    assert heatmap_side(size, c.data.heatmap_size) == 64
    local = mp100.get_config(f'backbone={name},runlocal')
    assert CapeNextConfig.from_dict(local.model.to_dict()).backbone.output_resolution == 4
  assert heatmap_side(64) == 16   # run configs without the field


def _random_weights(model_config, seed: int) -> dict:
  """Our params of a CapeNext of `model_config`, filled with noise (no model init)."""
  from capenext_jax.models.capenext import CapeNext
  model = nnx.eval_shape(lambda: CapeNext(model_config, rngs=init_rngs(0)))
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda s: rng.standard_normal(s.shape).astype(np.float32),
                      nnx.to_pure_dict(nnx.state(model, nnx.Param)))


@pytest.mark.parametrize('backbone,official_keys', [
    ('vit_tiny', {'backbone.vit_backbone.blocks.0.attn.qkv.weight': (96, 32),
                  'backbone.vit_backbone.pos_embed': (1, 17, 32),
                  'backbone.channel_adaptor.weight': (32, 32, 1, 1)}),
    ('dinov2_tiny', {'backbone.mask_token': (1, 32), 'backbone.pos_embed': (1, 82, 32),
                     'backbone.blocks.0.ls2.gamma': (32,)}),
])
def test_official_checkpoint_round_trip(backbone, official_keys):
  """Our params -> the official CapeNext state dict names (as the official model names them:
  `backbone.vit_backbone.*` + `backbone.channel_adaptor.*`, or the DINOv2 hub model's own
  names under `backbone.`) -> ours again, unchanged."""
  from capenext_jax.convert import official
  from capenext_jax.models.capenext import CapeNextConfig
  config = CapeNextConfig.variant(backbone)
  params = _random_weights(config, 0)
  sd = official.capenext_to_official(params)
  for key, shape in official_keys.items():
    assert sd[key].shape == shape, key
  assert not any(k.startswith(('backbone.head', 'backbone.vit_backbone.head')) for k in sd)
  back = official.capenext_from_official(sd)
  jax.tree.map(np.testing.assert_array_equal, back, jax.tree.map(np.asarray, params))
  assert official.official_model_config(sd).backbone == CapeNextConfig.variant(
      {'vit_tiny': 'vit_b16', 'dinov2_tiny': 'dinov2_s14'}[backbone]).backbone


def _episode_batch(rng: np.random.Generator, b: int, e: int, size: int) -> dict:
  from capenext_jax.models.head import adjacency_from_skeleton
  mask = np.zeros((b, 100), np.float32)
  mask[:, :5] = 1
  adjacency = adjacency_from_skeleton([[i, i + 1] for i in range(4)])
  text = rng.normal(size=(b, 100, e)).astype(np.float32)
  category = rng.normal(size=(b, e)).astype(np.float32)
  return dict(query_image=rng.normal(size=(b, size, size, 3)).astype(np.float32),
              support_mask=mask, adjacency=np.broadcast_to(adjacency, (b, 100, 100)).copy(),
              keypoint_text=text / np.linalg.norm(text, axis=-1, keepdims=True),
              category_text=category / np.linalg.norm(category, axis=-1, keepdims=True),
              query_joints=rng.uniform(0, size, (b, 100, 2)).astype(np.float32),
              query_weight=mask.copy())


@pytest.mark.parametrize('backbone,release_part', [('vit_tiny', 'vit_backbone'),
                                                   ('dinov2_tiny', None)])
def test_capenext_trains_with_vit_backbone(tmp_path, backbone, release_part):
  """A tiny CapeX with the backbone, initialised from a public-layout file via
  `init_from_pretrained` (config.init.backbone_path), takes train steps: finite losses, the
  backbone (and channel_adaptor) updated; DINOv2's mask token, never used, stays put."""
  from capenext_jax import losses
  from capenext_jax.loading import init_from_pretrained
  from capenext_jax.models.capenext import CapeNext, CapeNextConfig
  from capenext_jax.training import schedule
  from capenext_jax.device import state as state_lib, step as step_lib
  # Plain CapeX (no fusion): the backbone's path is the same, and the step compiles in half the
  # time without the CLIP image tower.
  config = CapeNextConfig.variant(backbone, fusion=False)
  model = CapeNext(config, rngs=nnx.Rngs(0))
  # A release file in the reference layout (timm / DINOv2 names, plus a classifier head).
  public = vit_convert.vit_to_torch(_random_weights(config, 1)['backbone'][release_part]
                                    if release_part else _random_weights(config, 1)['backbone'])
  public['head.weight'] = np.zeros((5, config.backbone.embed_dim), np.float32)
  path = _save(public, tmp_path / 'release.safetensors')
  adaptor_before = (np.asarray(model.backbone.channel_adaptor.kernel[...])
                    if release_part else None)
  init_from_pretrained(model, backbone_path=str(path))
  loaded = model.backbone if release_part is None else getattr(model.backbone, release_part)
  np.testing.assert_array_equal(np.asarray(loaded.pos_embed[...]), public['pos_embed'])
  if release_part:   # CapeNext's own layer keeps its init
    np.testing.assert_array_equal(model.backbone.channel_adaptor.kernel[...], adaptor_before)

  optim = schedule.default_optim_config()
  optim.update(lr=1e-3, warmup_steps=0)
  tx = schedule.make_optimizer(optim, steps_per_epoch=10)
  graphdef, st = state_lib.init_train_state(model, tx, jax.random.PRNGKey(0))
  before = jax.tree.map(np.asarray, st.trainable['backbone'])
  train_step = step_lib.make_train_step(graphdef, losses.batch_loss_fn(config.image_size), tx)
  batch = {k: jnp.asarray(v) for k, v in _episode_batch(
      np.random.default_rng(2), 2, config.clip.embed_dim, config.image_size).items()}
  for _ in range(2):
    st, metrics = train_step(st, batch)
    assert bool(metrics['finite']), metrics
  after = jax.tree.map(np.asarray, st.trainable['backbone'])
  vit_before = before if release_part is None else before[release_part]
  vit_after = after if release_part is None else after[release_part]
  for path in (('blocks', 0, 'attn', 'qkv', 'kernel'), ('pos_embed',), ('cls_token',)):
    a, b = vit_before, vit_after
    for key in path:
      a, b = a[key], b[key]
    assert not np.array_equal(a, b), path
  if release_part:
    assert not np.array_equal(before['channel_adaptor']['kernel'],
                              after['channel_adaptor']['kernel'])
  else:
    np.testing.assert_array_equal(before['mask_token'], after['mask_token'])


# ----------------------------------------------------------------------------- full size
@pytest.mark.slow
@pytest.mark.parametrize('name', ['vit_b16', 'dinov2_s14'])
def test_full_size_parity(name):
  """The official vit_b16 (timm ViT-B/16 + channel_adaptor, 64 px) and dinov2_s14 (hub ViT-S/14,
  37x37 position grid, 112 px query resized to 98), full width and depth, batch 2, seeded random
  weights, float32 against float64 references (tests/fixtures/make_vit_fixtures.py
  `make_full_size`): features, input gradient, the whole gradient of every tensor up to 20k
  entries and sampled rows of the larger ones. DINOv2's features come within 7e-6 of the
  largest: most of it is the float32 bilinear resize (its sample positions rounded in float32:
  torch's float32 resize is 1.3e-5 from its float64 one, ours 1.5e-7 from torch's float32)."""
  from backbone_weights import random_weights, sampled_rows
  z = _fixture(f'{name}_full.npz')
  c = json.loads(str(z['config']))
  sd = random_weights(json.loads(str(z['shapes_json'])), 0)
  if name == 'vit_b16':
    params = vit_convert.feature_extractor_from_torch(sd)
    model = _loaded(lambda: vit.ViTFeatureExtractor(vit.TimmViTConfig(img_size=c['img_size']),
                                                    rngs=nnx.Rngs(0)), params)
    to_torch = vit_convert.feature_extractor_to_torch
  else:
    params = vit_convert.dinov2_from_torch(sd)
    config = vit.DinoV2Config(img_size=c['img_size'], input_size=c['input_size'])
    model = _loaded(lambda: vit.DinoV2Backbone(config, rngs=nnx.Rngs(0)), params)
    to_torch = vit_convert.vit_to_torch
  out, g_x, g_params = _value_and_grads(model, _nhwc(z['in_x']), _nhwc(z['probe']))
  _assert_close(np.asarray(out).transpose(0, 3, 1, 2), z['out'], 'features')
  _assert_grad_close(np.asarray(g_x).transpose(0, 3, 1, 2), z['gin_x'], 'input gradient')
  grads = to_torch(jax.tree.map(np.asarray, nnx.to_pure_dict(g_params)))
  whole, rows = _prefixed(z, 'g.'), _prefixed(z, 'rows.')
  assert set(grads) == set(whole) | set(rows) and len(rows) > 40
  for key, grad in grads.items():
    if key in whole:
      _assert_grad_close(grad, whole[key], f'gradient of {key}')
    else:
      _assert_grad_close(sampled_rows(grad), rows[key], f'gradient rows of {key}')

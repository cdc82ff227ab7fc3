"""Swin V2 backbone and its weight converter against the official fixtures (CPU, eval mode)."""
from __future__ import annotations

import dataclasses
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from capenext_jax.convert import swin as swin_convert
from capenext_jax.models.layers import init_rngs
from capenext_jax.models.swin_v2 import SwinTransformerV2, SwinV2Config, biased_attention
from conftest import load_fixture


def _config(c: dict) -> SwinV2Config:
  """SwinV2Config from the official constructor arguments stored in a fixture."""
  return SwinV2Config(img_size=c['img_size'], embed_dim=c['embed_dim'], depths=tuple(c['depths']),
                      num_heads=tuple(c['num_heads']), window_size=c['window_size'],
                      drop_path_rate=c['drop_path_rate'])


def _load(model: nnx.Module, params: dict) -> None:
  state = nnx.state(model, nnx.Param)
  state.replace_by_pure_dict(params)
  nnx.update(model, state)


def _model(config: SwinV2Config, sd: dict[str, np.ndarray], *, eval_only: bool = True
           ) -> SwinTransformerV2:
  """`config`'s model holding the official weights `sd`, in eval mode.

  eval_only: skip the random init (eager init compiles one program per weight shape, slow on
    CPU): build the model abstractly with drop path off, which leaves no RNG state to fill, so
    the loaded weights make it concrete. Eval-mode outputs are the same.
  """
  if eval_only:
    config = dataclasses.replace(config, drop_path_rate=0.0)
    model = nnx.eval_shape(lambda: SwinTransformerV2(config, rngs=init_rngs(0)))
  else:
    model = SwinTransformerV2(config, rngs=nnx.Rngs(0))
  _load(model, swin_convert.swin_from_torch(sd))
  model.eval()
  return model


def _abstract_params(config: SwinV2Config) -> dict:
  """Pure-dict param tree of `config` as ShapeDtypeStructs (no compile-heavy random init)."""
  model = nnx.eval_shape(lambda: SwinTransformerV2(config, rngs=init_rngs(0)))
  return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def _nhwc(x: np.ndarray) -> jax.Array:
  return jnp.asarray(x.transpose(0, 2, 3, 1))


_forward = nnx.jit(lambda model, x: model.forward_with_intermediates(x))


@pytest.fixture(scope='module')
def unit():
  z = load_fixture('unit_swinv2_small.npz')
  arrays = {k: z[k] for k in z.files}
  sd = {k[2:]: v for k, v in arrays.items() if k.startswith('w.')}
  return _config(json.loads(str(arrays['config']))), sd, arrays


@pytest.fixture(scope='module')
def unit_model(unit):
  config, sd, _ = unit
  return _model(config, sd)


# ----------------------------------------------------------------------------- parity
def test_unit_fixture_stages_and_output(unit, unit_model):
  z = unit[2]
  out = _forward(unit_model, _nhwc(z['in_x']))
  for i, stage in enumerate(out['stages']):
    np.testing.assert_allclose(np.asarray(stage), z[f'stage{i}'], rtol=0, atol=1e-5)
  assert out['out'].shape == (2, 4, 4, 128)
  np.testing.assert_allclose(np.asarray(out['out']).transpose(0, 3, 1, 2), z['out'],
                             rtol=0, atol=1e-5)


def test_unit_fixture_input_gradient(unit, unit_model):
  z = unit[2]
  probe = _nhwc(z['probe'])

  @nnx.jit
  def input_grad(model, x):
    return jax.grad(lambda x: jnp.sum(model(x) * probe))(x)

  grad = np.asarray(input_grad(unit_model, _nhwc(z['in_x']))).transpose(0, 3, 1, 2)
  ref = z['gin_x']
  # measured 5.7e-7 of max|ref| (float32 noise through 8 blocks); 5e-6 leaves ~9x headroom
  assert np.abs(grad - ref).max() <= 5e-6 * np.abs(ref).max()


def test_tiny_capenext_backbone():
  z = load_fixture('tiny_capenext.npz')
  config = _config(json.loads(str(z['config_json']))['encoder_config'])
  sd = {k[len('backbone.'):]: z[k] for k in z['state_dict_keys'] if k.startswith('backbone.')}
  out = _forward(_model(config, sd), _nhwc(z['in_img_q']))
  np.testing.assert_allclose(np.asarray(out['patch_embed']), z['swin_patch_embed'], atol=1e-5,
                             rtol=0)
  for i, stage in enumerate(out['stages']):
    np.testing.assert_allclose(np.asarray(stage), z[f'swin_stage{i}'], atol=1e-5, rtol=0)
  np.testing.assert_allclose(np.asarray(out['out']).transpose(0, 3, 1, 2), z['backbone_feature'],
                             atol=1e-5, rtol=0)


def test_buffers_match_official(unit):
  """Our constant tables / indices / masks equal the official buffers bit for bit."""
  config, sd, _ = unit
  buffers = swin_convert.swin_buffers(config)
  assert set(buffers) == {k for k in sd if 'relative_' in k or k.endswith('attn_mask')}
  for name, value in buffers.items():
    assert value.dtype == sd[name].dtype and np.array_equal(value, sd[name]), name


# ----------------------------------------------------------------------------- stochastic depth
def test_drop_path_only_in_train_mode(unit):
  config, sd, z = unit
  model, x = _model(config, sd, eval_only=False), _nhwc(z['in_x'])
  call = nnx.jit(lambda model, x: model(x))
  model.train()
  first, second = np.asarray(call(model, x)), np.asarray(call(model, x))
  assert not np.allclose(first, z['out'].transpose(0, 2, 3, 1), atol=1e-3)
  assert not np.allclose(first, second, atol=1e-3)  # a fresh draw per call
  model.eval()
  np.testing.assert_allclose(np.asarray(call(model, x)), z['out'].transpose(0, 2, 3, 1),
                             atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------- conversion
SMALL = SwinV2Config(img_size=32, embed_dim=8, depths=(2, 2, 2), num_heads=(1, 2, 4),
                     window_size=4, pretrained_window_sizes=(0, 6, 0))


def _random_official_sd(config: SwinV2Config) -> dict[str, np.ndarray]:
  """Official parameter names and shapes of `config` filled with noise."""
  template = swin_convert.swin_to_torch(
      jax.tree.map(lambda s: np.zeros(s.shape, np.float32), _abstract_params(config)))
  rng = np.random.default_rng(0)
  return {k: rng.standard_normal(v.shape).astype(np.float32) for k, v in template.items()}


def test_microsoft_layout_round_trip(tmp_path):
  params_sd = _random_official_sd(SMALL)
  extras = {'head.weight': np.ones((10, 32), np.float32), 'head.bias': np.zeros(10, np.float32),
            **swin_convert.swin_buffers(SMALL)}
  assert any(k.endswith('attn_mask') for k in extras)
  path = tmp_path / 'swinv2_random.pth'
  torch.save({'model': {k: torch.from_numpy(v) for k, v in {**params_sd, **extras}.items()}},
             path)

  params = swin_convert.load_microsoft_swinv2(path)
  expected = _abstract_params(SMALL)
  assert jax.tree.structure(params) == jax.tree.structure(expected)
  assert jax.tree.map(np.shape, params) == jax.tree.map(np.shape, expected)

  back = swin_convert.swin_to_torch(params)
  assert back.keys() == params_sd.keys()
  for k, v in params_sd.items():
    assert back[k].dtype == np.float32 and np.array_equal(back[k], v), k

  # Exported files use string indices for the stage / block lists.
  from_strings = swin_convert.swin_to_torch(_stringify(params))
  assert all(np.array_equal(v, back[k]) for k, v in from_strings.items())


def _stringify(tree):
  if isinstance(tree, dict):
    return {str(k): _stringify(v) for k, v in tree.items()}
  return tree


def test_converter_rejects_unknown_and_missing_keys():
  sd = _random_official_sd(SMALL)
  swin_convert.swin_from_torch({**sd, 'head.weight': np.zeros((3, 32), np.float32)})

  with pytest.raises(ValueError, match=r'layers\.0\.blocks\.1\.attn\.k_bias'):
    swin_convert.swin_from_torch({**sd, 'layers.0.blocks.1.attn.k_bias': np.zeros(8)})
  with pytest.raises(ValueError, match=r'layers\.2\.downsample\.reduction\.weight'):
    swin_convert.swin_from_torch({**sd, 'layers.2.downsample.reduction.weight': np.zeros((8, 8))})
  with pytest.raises(ValueError, match=r'backbone\.norm\.weight'):
    swin_convert.swin_from_torch({**sd, 'backbone.norm.weight': np.zeros(32)})
  for missing in ('layers.1.blocks.0.attn.cpb_mlp.2.weight', 'patch_embed.proj.bias', 'norm.bias'):
    with pytest.raises(ValueError, match=missing.replace('.', r'\.')):
      swin_convert.swin_from_torch({k: v for k, v in sd.items() if k != missing})
  with pytest.raises(ValueError, match=r'layers\.1\.blocks'):
    swin_convert.swin_from_torch({k: v for k, v in sd.items() if not k.startswith('layers.1.')})
  with pytest.raises(ValueError, match=r'layers\.0\.blocks\.0\.mlp\.fc1\.weight'):
    swin_convert.swin_from_torch({**sd, 'layers.0.blocks.0.mlp.fc1.weight': np.zeros(32)})


# ----------------------------------------------------------------------------- config and init
def test_headline_sizes():
  config = SwinV2Config()
  model = nnx.eval_shape(lambda: SwinTransformerV2(config, rngs=init_rngs(0)))
  params = nnx.state(model, nnx.Param)
  # 28,347,154 official backbone values minus the 769,000 of the unused classifier head.
  assert sum(math.prod(p.shape) for p in jax.tree.leaves(params)) == 28_347_154 - 769_000
  model.eval()
  graphdef, state = nnx.split(model)
  out = jax.eval_shape(lambda s, x: nnx.merge(graphdef, s)(x), state,
                       jax.ShapeDtypeStruct((1, 256, 256, 3), jnp.float32))
  assert out.shape == (1, 16, 16, 768)
  assert [config.stage_window(s) for s in range(4)] == [(16, 8), (16, 8), (16, 0), (8, 0)]


def test_official_initialisation():
  # The unit fixture's sizes: eager init then reuses the compiled initialisers.
  model = SwinTransformerV2(SwinV2Config(img_size=64, embed_dim=16, depths=(2, 2, 2, 2),
                                         num_heads=(2, 2, 4, 8), window_size=8), rngs=nnx.Rngs(0))
  block = model.layers[0].blocks[1]
  for norm in (block.norm1, block.norm2):  # res-post-norm starts at zero
    assert not np.any(norm.scale.value) and not np.any(norm.bias.value)
  np.testing.assert_allclose(block.attn.logit_scale.value, math.log(10.0))
  assert not np.any(block.attn.q_bias.value) and not np.any(block.mlp.fc1.bias.value)
  # Seed 0 draws std 0.01995 over 65,536 values (sampling sd of the std ~5.5e-5): 5e-4 is ~9 sd
  # and still tells 0.02 from a +-2 sd truncated normal's 0.0176.
  assert abs(float(jnp.std(model.layers[3].blocks[0].mlp.fc1.kernel.value)) - 0.02) < 5e-4
  np.testing.assert_array_equal(model.norm.scale.value, 1.0)


def test_config_validation():
  with pytest.raises(ValueError, match='differ in length'):
    SwinV2Config(depths=(2, 2), num_heads=(3, 6, 12, 24))
  with pytest.raises(ValueError, match='multiple of window_size'):
    SwinV2Config(img_size=192, window_size=10)
  model = nnx.eval_shape(lambda: SwinTransformerV2(SMALL, rngs=init_rngs(0)))
  with pytest.raises(ValueError, match=r'expected images \[B, 32, 32, 3\]'):
    model(jnp.zeros((1, 64, 64, 3)))


@pytest.mark.parametrize('shifted', [False, True])
def test_biased_attention_matches_torch_autograd(shifted):
  """The window attention core has a hand-written backward: value and gradients (q, k, v and
  the position bias shared by all windows) must equal torch autograd of
  softmax(q k^T + bias + mask) v. The mask is a constant and gets no gradient."""
  rng = np.random.default_rng(0)
  b, nw, h, n, d = 2, 3, 2, 5, 4
  q, k, v = (rng.normal(size=(b, nw, h, n, d)).astype(np.float32) for _ in range(3))
  bias = rng.normal(size=(h, n, n)).astype(np.float32)
  mask = np.where(rng.uniform(size=(nw, n, n)) < 0.3, -100.0, 0.0).astype(np.float32)
  probe = rng.normal(size=(b, nw, h, n, d)).astype(np.float32)
  mask_arg = jnp.asarray(mask) if shifted else None

  def loss(q, k, v, bias):
    return jnp.sum(biased_attention(q, k, v, bias, mask_arg) * probe)

  value, grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3)))(q, k, v, bias)
  tq, tk, tv, tb = (torch.tensor(a, requires_grad=True) for a in (q, k, v, bias))
  logits = tq @ tk.transpose(-1, -2) + tb
  if shifted:
    logits = logits + torch.tensor(mask)[:, None]
  theirs = ((logits.softmax(-1) @ tv) * torch.tensor(probe)).sum()
  theirs.backward()
  # measured: value 5.3e-7 relative, gradients 9.2e-7 absolute (|ref| up to 4.7); ~10x headroom
  np.testing.assert_allclose(value, theirs.item(), rtol=5e-6)
  for ours, ref in zip(grads, (tq.grad, tk.grad, tv.grad, tb.grad)):
    np.testing.assert_allclose(ours, ref.numpy(), rtol=1e-5, atol=1e-5)

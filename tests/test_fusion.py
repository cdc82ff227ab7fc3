"""MultiModalFusion (SimpleMultiModalModule) against unit_mm_small.npz, plus ablations."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from capenext_jax.convert.head import fusion_from_torch, fusion_to_torch
from capenext_jax.models import fusion
from capenext_jax.models.fusion import FusionConfig, MultiModalFusion
from conftest import load_fixture



def _pure(model):
  return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def _load(model, params):
  state = nnx.state(model, nnx.Param)
  nnx.replace_by_pure_dict(state, params)
  nnx.update(model, state)


def _rel(a, b):
  return float(np.linalg.norm(np.asarray(a) - b) / max(np.linalg.norm(b), 1e-30))


@pytest.fixture(scope='module')
def unit():
  z = load_fixture('unit_mm_small.npz')
  cfg = json.loads(str(z['config']))
  sd = {k[2:]: z[k] for k in z.files if k.startswith('w.')}
  model = MultiModalFusion(FusionConfig(embed_dim=cfg['embed_dim'], num_heads=cfg['num_heads'],
                                        dropout=cfg['dropout']), rngs=nnx.Rngs(0))
  _load(model, fusion_from_torch(sd))
  model.eval()
  return z, sd, model


def test_converter_round_trip_and_structure(unit):
  z, sd, model = unit
  params = fusion_from_torch(sd)
  fresh = _pure(MultiModalFusion(FusionConfig(embed_dim=64), rngs=nnx.Rngs(1)))
  assert jax.tree_util.tree_structure(params) == jax.tree_util.tree_structure(fresh)
  back = fusion_to_torch(params)
  assert set(back) == {k for k in sd if not k.startswith('non_linear.')}
  for k, v in back.items():
    np.testing.assert_array_equal(v, sd[k])


def test_converter_errors(unit):
  _, sd, _ = unit
  missing = dict(sd)
  del missing['norm3.bias']
  with pytest.raises(ValueError, match='norm3.bias'):
    fusion_from_torch(missing)
  with pytest.raises(ValueError, match='extra.weight'):
    fusion_from_torch({**sd, 'extra.weight': np.zeros(1)})


def test_forward_matches_official(unit):
  z, _, model = unit
  out = model(jnp.asarray(z['in_image_embedding']), jnp.asarray(z['in_joint_text_embedding']),
              jnp.asarray(z['in_category_text_embedding']))
  assert np.abs(np.asarray(out) - z['out_eval']).max() <= 1e-5


def test_gradients_match_official(unit):
  z, _, model = unit
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  probe = jnp.asarray(z['probe'])

  @jax.jit
  def objective(params, image, joint, category):
    out = nnx.merge(graphdef, params, rest)(image, joint, category)
    return jnp.sum(out * probe)

  inputs = [jnp.asarray(z[f'in_{n}']) for n in
            ('image_embedding', 'joint_text_embedding', 'category_text_embedding')]
  grads = jax.grad(objective, argnums=(0, 1, 2, 3))(params, *inputs)
  for g, name in zip(grads[1:], ('image_embedding', 'joint_text_embedding',
                                 'category_text_embedding')):
    assert _rel(g, z[f'gin_{name}']) <= 1e-4, name
  torch_grads = fusion_to_torch(nnx.to_pure_dict(grads[0]))
  for name, g in torch_grads.items():
    assert _rel(g, z[f'g.{name}']) <= 1e-4, name


@pytest.mark.parametrize('module', [fusion.WITHOUT_CATEGORY, fusion.WITHOUT_IMAGE])
def test_ablations(module):
  """Parity with the official classes: test_fusion_variants.py. Here: the missing stream has no
  parameters and no influence."""
  cfg = FusionConfig(embed_dim=16, num_heads=2, module=module)
  use_category, use_image = cfg.uses_category, cfg.uses_image
  model = MultiModalFusion(cfg, rngs=nnx.Rngs(0))
  model.eval()
  params = _pure(model)
  assert ('text_cross_attention_layer' in params) == use_category
  assert ('weight_image' in params) == use_image
  back = fusion_to_torch(params, cfg)
  rebuilt = fusion_from_torch(back, cfg)
  assert jax.tree_util.tree_structure(rebuilt) == jax.tree_util.tree_structure(params)
  key = jax.random.split(jax.random.key(0), 3)
  image, category = jax.random.normal(key[0], (2, 16)), jax.random.normal(key[1], (2, 16))
  joint = jax.random.normal(key[2], (2, 5, 16))
  out = model(image, joint, category)
  assert out.shape == (2, 5, 16) and bool(jnp.isfinite(out).all())
  # The missing stream must not influence the result.
  other = model(image * 3.0, joint, category * 3.0)
  changed = model(image, joint, category * 3.0) if use_image else model(image * 3.0, joint,
                                                                         category)
  np.testing.assert_allclose(np.asarray(changed), np.asarray(out), atol=1e-6)
  assert np.abs(np.asarray(other) - np.asarray(out)).max() > 1e-4
  with pytest.raises(ValueError, match='use build_fusion'):
    MultiModalFusion(FusionConfig(module=fusion.CROSS_ATTENTION_LAYER), rngs=nnx.Rngs(0))


def test_dropout_is_active_in_train_mode():
  model = MultiModalFusion(FusionConfig(embed_dim=16, num_heads=2, dropout=0.5),
                           rngs=nnx.Rngs(0, dropout=1))
  key = jax.random.split(jax.random.key(0), 3)
  args = (jax.random.normal(key[0], (2, 16)), jax.random.normal(key[2], (2, 5, 16)),
          jax.random.normal(key[1], (2, 16)))
  model.train()
  a, b = model(*args), model(*args)
  assert np.abs(np.asarray(a) - np.asarray(b)).max() > 1e-4
  model.eval()
  np.testing.assert_array_equal(np.asarray(model(*args)), np.asarray(model(*args)))

"""The official fusion ablation variants (models/fusion.py) against fixtures of the official
classes (tests/fixtures/fusion, made by tests/fixtures/make_fusion_fixtures.py), their official
state-dict layouts both ways, and each one through training, resume and export.

Training uses the real train step, optimizer and checkpointer on a toy model holding every real
fusion variant side by side (ToyCapeNext's call signature, E = 8): one compiled step trains them
all, where a compile per variant (let alone per whole CapeNext) costs 5-60 s each on a CPU. The
whole model's wiring of every variant is checked by building it from an export (structure) and
by tracing its forward (below).
"""
from __future__ import annotations

import dataclasses
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from capenext_jax import export, loading
from capenext_jax import params as params_lib
from capenext_jax.convert import official
from capenext_jax.convert.head import fusion_from_torch, fusion_module_of, fusion_to_torch
from capenext_jax.models import capenext
from capenext_jax.models import fusion
from capenext_jax.models.fusion import FusionConfig, build_fusion
from capenext_jax.models.layers import init_rngs
from capenext_jax.training import checkpoint, schedule
from capenext_jax.device import partition, state as state_lib
from capenext_jax.device import step as step_lib
from training_toy import E, toy_batch, toy_loss

FIXTURES = pathlib.Path(__file__).parent / 'fixtures' / 'fusion'
INPUTS = ('image_embedding', 'joint_text_embedding', 'category_text_embedding')


def _rel(a, b):
  return float(np.linalg.norm(np.asarray(a) - b) / max(np.linalg.norm(b), 1e-30))


def _load(name):
  z = np.load(FIXTURES / f'{name}.npz', allow_pickle=False)
  cfg = json.loads(str(z['config']))
  config = FusionConfig(embed_dim=cfg['embed_dim'], num_heads=cfg['num_heads'],
                        dropout=cfg['dropout'], module=cfg['cls'])
  return z, config, {k[2:]: z[k] for k in z.files if k.startswith('w.')}


def test_every_variant_has_a_fixture():
  assert sorted(p.stem for p in FIXTURES.glob('*.npz')) == sorted(fusion.MODULES)


@pytest.mark.parametrize('name', fusion.MODULES)
def test_matches_official(name):
  """Outputs within 1e-5, input and parameter gradients within 1e-4 (relative L2 norm)."""
  z, config, sd = _load(name)
  assert fusion_module_of(sd) == name
  model = build_fusion(config, rngs=nnx.Rngs(0))
  params_lib.load_into(model, fusion_from_torch(sd))
  model.eval()
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  probe = jnp.asarray(z['probe'])

  def objective(params, *inputs):
    out = nnx.merge(graphdef, params, rest)(*inputs)
    return jnp.sum(out * probe), out

  inputs = [jnp.asarray(z[f'in_{n}']) for n in INPUTS]
  grads, out = jax.grad(objective, argnums=(0, 1, 2, 3), has_aux=True)(params, *inputs)
  assert np.abs(np.asarray(out) - z['out_eval']).max() <= 1e-5
  for g, n in zip(grads[1:], INPUTS):
    if f'gin_{n}' in z.files:
      assert _rel(g, z[f'gin_{n}']) <= 1e-4, n
    else:   # an input the official class never reads
      assert not np.asarray(g).any(), n
  torch_grads = fusion_to_torch(nnx.to_pure_dict(grads[0]), config)
  expected = {k[2:] for k in z.files if k.startswith('g.')}
  # The triple's encoder_layer3 is written back as a copy of layer 2; it has no gradient.
  assert {k for k in torch_grads if not k.startswith('encoder_layer3.')} == expected
  for k in expected:
    assert _rel(torch_grads[k], z[f'g.{k}']) <= 1e-4, k


@pytest.mark.parametrize('name', fusion.MODULES)
def test_official_layout_both_ways(name):
  """Every official key is consumed (`non_linear`, the triple's unused layer skipped) and the
  params go back to the same official arrays; missing and extra keys are named."""
  z, config, sd = _load(name)
  params = fusion_from_torch(sd, config)
  fresh = nnx.to_pure_dict(nnx.state(build_fusion(config, rngs=nnx.Rngs(1)), nnx.Param))
  params_lib.check_structure(fresh, params)
  back = fusion_to_torch(params, config)
  unused = set(z['grad_none']) - {k for k in back if k.startswith('encoder_layer3.')}
  assert set(back) == set(sd) - unused
  for k, v in back.items():
    source = 'encoder_layer2.' + k[len('encoder_layer3.'):] if k.startswith('encoder_layer3.') else k
    np.testing.assert_array_equal(v, sd[source])
  assert fusion_module_of(back) == name
  some_key = sorted(back)[0]
  with pytest.raises(ValueError, match=some_key.replace('.', r'\.')):
    fusion_from_torch({k: v for k, v in sd.items() if k != some_key}, config)
  with pytest.raises(ValueError, match=r'extra\.weight'):
    fusion_from_torch({**sd, 'extra.weight': np.zeros(1)}, config)


def test_unknown_names_are_refused():
  with pytest.raises(ValueError, match='SimpleTransformerEncoder.*expected one of'):
    FusionConfig(module='SimpleTransformerEncoder')
  with pytest.raises(ValueError, match='match no official fusion module'):
    fusion_module_of(['norm1.weight'])


def test_legacy_ablation_switches_load():
  """Configs written when the ablations were `use_category` / `use_image` switches."""
  d = capenext.CapeNextConfig().to_dict()
  for flags, module in (({'use_category': True, 'use_image': True}, fusion.SIMPLE),
                        ({'use_category': False, 'use_image': True}, fusion.WITHOUT_CATEGORY),
                        ({'use_category': True, 'use_image': False}, fusion.WITHOUT_IMAGE)):
    fused = {k: v for k, v in d['fusion'].items() if k != 'module'}
    got = capenext.CapeNextConfig.from_dict({**d, 'fusion': {**fused, **flags}})
    assert got.fusion.module == module


# ----------------------------------------------------------------------------- training
class AllFusionsToy(nnx.Module):
  """ToyCapeNext's call signature around every real fusion variant side by side (their outputs
  summed), so one compiled train step trains them all: frozen `clip`, trainable rest. No
  dropout: it adds a third to the compile, and the resume of dropout's per-step RNG is covered
  by test_training_checkpoint.py and test_train.py."""

  def __init__(self, *, rngs: nnx.Rngs):
    self.clip = nnx.Linear(3, E, rngs=rngs)
    self.fusions = nnx.Dict({m: build_fusion(FusionConfig(embed_dim=E, num_heads=2, dropout=0.0,
                                                           module=m), rngs=rngs)
                             for m in fusion.MODULES})
    self.out = nnx.Linear(E, 2, rngs=rngs)

  def __call__(self, query_image, support_mask, adjacency, *, keypoint_text, category_text):
    image = self.clip(query_image.mean(axis=(1, 2)))                       # [B, E]
    text = keypoint_text * support_mask[..., None]
    text = sum(f(image, text, category_text) for f in self.fusions.values())
    kpts = jax.nn.sigmoid(self.out(text + jnp.einsum('bkj,bjc->bkc', adjacency, text) * 0.1))
    return {'keypoints': kpts[None], 'proposals': kpts}


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
  """Trainable params after 2 steps; step 2 taken again from the step-1 checkpoint (restored
  into a target of shapes and shardings) equals the uninterrupted step 2, for every variant at
  once."""
  cfg = schedule.default_optim_config()
  cfg.update(lr=1e-2, warmup_steps=0)
  tx = schedule.make_optimizer(cfg, steps_per_epoch=10)
  graphdef, st = state_lib.init_train_state(AllFusionsToy(rngs=nnx.Rngs(0)), tx,
                                            jax.random.PRNGKey(1))
  train_step = step_lib.make_train_step(graphdef, toy_loss, tx)   # the real jitted step
  st, _ = train_step(st, toy_batch(0))
  ckpt = checkpoint.Checkpointer(str(tmp_path_factory.mktemp('fusions') / 'ckpt'))
  ckpt.save(1, st, {'step': 1})
  ckpt.wait()
  mesh = partition.make_mesh({'data': 1, 'fsdp': 1}, jax.devices()[:1])
  # The target holds shapes only, so every restored value comes from the checkpoint. The
  # frozen part is not checkpointed: a real resume rebuilds it by the run's own init, whose
  # values it still has (a copy: the step below donates `st`).
  target = state_lib.abstract_state(st, state_lib.state_shardings(st, tx, mesh))
  restored, position = ckpt.restore(target.replace(frozen=jax.tree.map(jnp.copy, st.frozen)))
  ckpt.close()
  assert position == {'step': 1}
  before = jax.device_get(st.trainable)
  st2, m2 = train_step(st, toy_batch(1))
  res2, r2 = train_step(restored, toy_batch(1))
  after, resumed = jax.device_get((st2.trainable, m2)), jax.device_get((res2.trainable, r2))
  jax.tree.map(np.testing.assert_array_equal, after, resumed)
  return before, after[0]


def _tiny_model_config(module: str | None) -> capenext.CapeNextConfig:
  """The 'tiny' CapeNext with an E-wide CLIP embedding (the fusion width) and a 64-token
  vocabulary (the export writes every param)."""
  tiny = capenext.CapeNextConfig.variant('tiny', image_size=64)
  clip = dataclasses.replace(tiny.clip, embed_dim=E, vocab_size=64)
  fusion_config = FusionConfig(num_heads=2, module=module) if module else None
  return dataclasses.replace(tiny, clip=clip, fusion=fusion_config)


@pytest.fixture(scope='module')
def capex_params():
  """Zero params of the tiny CapeX (no fusion)."""
  abstract = nnx.eval_shape(lambda: capenext.CapeNext(_tiny_model_config(None), rngs=init_rngs(0)))
  return jax.tree.map(lambda a: np.zeros(a.shape, a.dtype),
                      nnx.to_pure_dict(nnx.state(abstract, nnx.Param)))


@pytest.mark.parametrize('module', (*fusion.MODULES, None))
def test_trains_resumes_and_exports(tmp_path, trained, capex_params, module):
  """Every param of the variant moved in training (and resumed exactly: `trained`); its
  trained params go into the tiny CapeNext's export and official layout and back.
  module None: CapeX (no fusion)."""
  config = _tiny_model_config(module)
  params = dict(capex_params)     # zeros outside the fusion; build_model checks the layout
  if module:
    before, after = (p['fusions'][module] for p in trained)
    still = [name for name, a in params_lib.flatten(before).items()
             if np.array_equal(a, params_lib.flatten(after)[name])]
    # Only the query / key projections of attention over a single key stay put: the softmax
    # over one key is 1 whatever they are, so their gradient is exactly 0 (also officially).
    assert still and all(n.split('/')[-2] in ('q_proj', 'k_proj') for n in still), still
    params['fusion'] = after
  export.export_params(params, config, tmp_path / 'export')
  got_config, got = export.read_export(tmp_path / 'export')
  assert got_config == config
  model = export.build_model(got_config, got)
  assert (model.fusion is None) == (module is None)
  state_dict = official.capenext_to_official(got, got_config)
  assert any(k.startswith('additional_module.') for k in state_dict) == bool(module)
  assert official.official_model_config(state_dict).fusion == (
      module and FusionConfig(module=module))
  back = official.capenext_from_official(state_dict)
  jax.tree.map(np.testing.assert_array_equal, back, got)
  # An official file of this variant: eval.py / the loader pick its fusion from the keys.
  np.savez(tmp_path / 'official.npz', **state_dict)
  loaded = loading.load(tmp_path / 'official.npz')
  assert loaded.config.fusion == (module and FusionConfig(module=module))


@pytest.mark.parametrize('module', (fusion.WITHOUT_IMAGE, fusion.CROSS_ATTENTION_LAYER,
                                    'SimpleMultiModalDoubleEncoder'))
def test_capenext_forward_reads_only_what_the_variant_uses(module):
  """The whole (tiny) CapeNext, traced: the category is optional for the variants that do not
  read it, and the CLIP image tower is skipped for the one that does not read the image."""
  config = _tiny_model_config(module)
  model = nnx.eval_shape(lambda: capenext.CapeNext(config, rngs=init_rngs(0)))
  b, n = 1, capenext.NUM_SLOTS
  args = (jnp.zeros((b, 64, 64, 3)), jnp.ones((b, n)), jnp.zeros((b, n, n)))
  category = {} if not config.fusion.uses_category else {'category_text': jnp.ones((b, E))}
  out = nnx.eval_shape(lambda m: m(*args, keypoint_text=jnp.ones((b, n, E)), **category), model)
  assert out['keypoints'].shape[1:] == (b, n, 2)
  assert ('image_embedding' in out) == config.fusion.uses_image
  assert ('category_embedding' in out) == config.fusion.uses_category
  if config.fusion.uses_category:
    with pytest.raises(ValueError, match='category_text / category_tokens'):
      nnx.eval_shape(lambda m: m(*args, keypoint_text=jnp.ones((b, n, E))), model)

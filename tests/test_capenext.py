"""The whole model: jit/grad, cached text == tokens, frozen CLIP, and clear errors on bad input."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import FIXTURES
from flax import nnx

from capenext_jax import loading, losses
from capenext_jax.models.head import adjacency_from_skeleton
from capenext_jax.text.cache import CategoryText, build_text_cache
from capenext_jax.text.tokenizer import tokenize


@pytest.fixture(scope='module')
def tiny():
  """The tiny parity fixture's model (64 px input; loading its weights takes 2 s where an eager
  random init of the same sizes takes 17, and no check here needs a particular init) and a
  batch."""
  model = loading.load_model(str(FIXTURES / 'tiny_capenext.npz'))
  model.eval()
  cats = [CategoryText('dog', ['left eye', 'right eye', 'nose', 'tail']),
          CategoryText('chair_back', ['seat', 'leg'])]
  rng = np.random.default_rng(0)
  mask = np.zeros((2, 100), np.float32)
  mask[0, :4] = [1, 0, 1, 1]
  mask[1, :2] = 1
  adjacency = np.stack([adjacency_from_skeleton([[0, 1], [1, 2], [2, 3]]),
                        adjacency_from_skeleton([[0, 1]])])
  batch = dict(query_image=rng.normal(size=(2, 64, 64, 3)).astype(np.float32),
               support_mask=mask, adjacency=adjacency,
               query_joints=rng.uniform(0, 64, (2, 100, 2)).astype(np.float32),
               query_weight=mask.copy(), category_index=np.array([0, 1], np.int32))
  return model, cats, batch


def jit_model(fn):
  """fn(model), jitted over the model's split state."""
  def run(model):
    graphdef, state = nnx.split(model)
    return jax.jit(lambda state: fn(nnx.merge(graphdef, state)))(state)
  return run


def tokens_for(cats, index):
  kpt = np.zeros((len(index), 100, 77), np.int32)
  for b, c in enumerate(index):
    kpt[b, :len(cats[c].descriptions)] = tokenize(list(cats[c].descriptions))
  prompts = tokenize(['a photo of ' + cats[c].name.replace('_', ' ') for c in index])
  return kpt, prompts


def test_cached_text_equals_tokens(tiny):
  model, cats, batch = tiny
  cache = build_text_cache(model, cats, batch_size=4)
  kpt_text, cat_text = cache.lookup(jnp.asarray(batch['category_index']))
  kpt_tokens, cat_tokens = tokens_for(cats, batch['category_index'])
  args = (batch['query_image'], batch['support_mask'], batch['adjacency'])
  cached = jit_model(lambda m: m(*args, keypoint_text=kpt_text, category_text=cat_text))(model)
  direct = jit_model(lambda m: m(*args, keypoint_tokens=kpt_tokens,
                                 category_tokens=cat_tokens))(model)
  np.testing.assert_allclose(cached['keypoints'], direct['keypoints'], atol=1e-6)
  assert np.isfinite(np.asarray(cached['keypoints'])).all()
  # Padding slots past a category's descriptions stay exactly zero in the cache.
  assert not np.asarray(cache.keypoint[1, 2:]).any()


def test_jit_grad_and_frozen_clip_gets_no_update(tiny):
  model, cats, batch = tiny
  cache = build_text_cache(model, cats, batch_size=4)   # the text program of the test above
  model.train()
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  params, rest = nnx.to_pure_dict(params), nnx.to_pure_dict(rest)

  def loss_fn(params, rest):
    m = nnx.merge(graphdef, params, rest)
    kpt_text, cat_text = cache.lookup(batch['category_index'])
    out = m(batch['query_image'], batch['support_mask'], batch['adjacency'],
            keypoint_text=kpt_text, category_text=cat_text)
    return losses.capenext_losses(out, batch['query_joints'], batch['query_weight'],
                                  batch['support_mask'], image_size=64, heatmap_size=16)['loss']

  loss, grads = jax.jit(jax.value_and_grad(loss_fn))(params, rest)
  model.eval()
  assert np.isfinite(loss)
  norm = lambda tree: float(sum(jnp.sum(jnp.square(g)) for g in jax.tree.leaves(tree)))
  assert norm(grads['clip']) == 0.0
  for part in ('backbone', 'fusion', 'head'):
    assert norm(grads[part]) > 0, part


@pytest.mark.parametrize('field, value, message', [
    ('query_image', np.zeros((2, 3, 64, 64), np.float32), 'channels-first'),
    ('query_image', np.zeros((2, 32, 32, 3), np.float32), r'query_image must be \[B, 64, 64, 3\]'),
    ('support_mask', np.zeros((2, 101), np.float32), 'at most 100 keypoints'),
    ('adjacency', np.zeros((2, 100, 99), np.float32), 'adjacency must be'),
])
def test_bad_model_inputs_are_named(tiny, field, value, message):
  model, cats, batch = tiny
  kwargs = dict(query_image=batch['query_image'], support_mask=batch['support_mask'],
                adjacency=batch['adjacency'])
  kwargs[field] = value
  kpt_tokens, cat_tokens = tokens_for(cats, batch['category_index'])
  with pytest.raises(ValueError, match=message):
    model(**kwargs, keypoint_tokens=kpt_tokens, category_tokens=cat_tokens)


def test_bad_text_inputs_are_named():
  with pytest.raises(ValueError, match='skeleton.*100|out of range'):
    adjacency_from_skeleton([[0, 100]])
  with pytest.raises(ValueError, match='empty'):
    adjacency_from_skeleton([])
  long = ' '.join(['keypoint'] * 80)
  with pytest.raises(ValueError, match='keypoint keypoint'):
    tokenize([long])
  with pytest.raises(ValueError, match='at most 100'):
    from capenext_jax.text.cache import tokenize_categories
    tokenize_categories([CategoryText('centipede', [f'leg {i}' for i in range(101)])])


def test_abstract_model_is_traced_once_per_config_and_copied_per_call(monkeypatch):
  """`abstract_model`: the model `nnx.eval_shape` of its construction gives (graph and shapes),
  traced once per config; each call a copy that its caller may fill and switch to eval mode."""
  from capenext_jax.models import capenext
  from capenext_jax.models.capenext import CapeNext, CapeNextConfig, abstract_model
  from capenext_jax.models.layers import init_rngs
  config = CapeNextConfig.variant('tiny', image_size=64)
  built = []
  init = CapeNext.__init__
  monkeypatch.setattr(CapeNext, '__init__', lambda self, *a, **k: (built.append(1),
                                                                   init(self, *a, **k))[1])
  capenext._traced_abstract_model.cache_clear()
  first, second = abstract_model(config), abstract_model(config)
  assert len(built) == 1 and first is not second
  direct = nnx.eval_shape(lambda: CapeNext(config, rngs=init_rngs(7)))
  assert nnx.graphdef(first) == nnx.graphdef(direct)
  shapes = lambda m: jax.tree.map(lambda x: (x.shape, x.dtype), nnx.state(m))  # noqa: E731
  assert shapes(first) == shapes(direct)
  assert all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(nnx.state(first)))
  # Filling one copy and switching it to eval mode leaves the next copy abstract, in training.
  params = nnx.state(first, nnx.Param)
  nnx.update(first, jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), params))
  first.eval()
  third = abstract_model(config)
  assert all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(nnx.state(third)))
  assert nnx.graphdef(third) == nnx.graphdef(second) != nnx.graphdef(first)
  assert len(built) == 2   # the first copy's trace and `direct`'s

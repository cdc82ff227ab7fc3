"""The accelerator paths that cut a train step's memory traffic (issue 23), each against the
formula it replaces, on CPU. The CPU step itself keeps its own paths (float32 parity and the
CPU training numbers do not move); the accelerator's are lowered for CUDA here and inspected."""
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

from capenext_jax.models import layers

sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..', 'benchmarks'))
import hlo_traffic  # noqa: E402


def _census(f, *args, platform: str) -> dict:
  text = jax.jit(f).trace(*args).lower(lowering_platforms=(platform,)).as_text(debug_info=True)
  return hlo_traffic.census(hlo_traffic.parse_module(text))


def test_bias_gradient_is_a_float32_reduction_off_cpu_and_a_matvec_on_cpu():
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(300, 24)), jnp.float32)
  old = jnp.ones((300,), jnp.float32) @ x
  np.testing.assert_allclose(layers.cpu_kernels.sum_rows_float32(x), old, rtol=1e-5, atol=1e-5)
  xb = x.astype(jnp.bfloat16)
  np.testing.assert_array_equal(layers.cpu_kernels.sum_rows_float32(xb),
                                x.astype(jnp.bfloat16).astype(jnp.float32).sum(0)
                                .astype(jnp.bfloat16))
  np.testing.assert_array_equal(layers.sum_rows(x), old)   # CPU: the old product, exactly

  def bias_grad(x, kernel, bias):
    return jax.grad(lambda b: layers.dense(x, kernel, b).sum())(bias)

  args = (xb, jnp.ones((24, 8), jnp.bfloat16), jnp.zeros((8,), jnp.bfloat16))
  assert _census(bias_grad, *args, platform='cpu')['vector_matmuls'] == 1
  assert _census(bias_grad, *args, platform='cuda')['vector_matmuls'] == 0


def test_patch_embedding_is_a_matmul_off_cpu_equal_to_the_convolution():
  from flax import nnx
  conv = layers.patch_conv(3, 8, 4, rngs=nnx.Rngs(0))
  x = jnp.asarray(np.random.default_rng(1).normal(size=(2, 16, 12, 3)), jnp.float32)

  def loss(f, x, kernel, bias):
    return (f(x, kernel, bias) ** 2).sum()

  old = lambda x, k, b: jax.lax.conv_general_dilated(   # noqa: E731  (nnx.Conv's product)
      x, k, (4, 4), 'VALID', dimension_numbers=('NHWC', 'HWIO', 'NHWC')) + b
  args = (x, conv.kernel[...], conv.bias[...])
  with jax.default_matmul_precision('highest'):
    np.testing.assert_allclose(layers.patch_matmul(*args), old(*args), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(conv(x), nnx.Conv.__call__(conv, x))   # CPU: the conv
    for new_grad, old_grad in zip(jax.grad(loss, argnums=(1, 2, 3))(layers.patch_matmul, *args),
                                  jax.grad(loss, argnums=(1, 2, 3))(old, *args)):
      np.testing.assert_allclose(new_grad, old_grad, rtol=1e-4, atol=1e-4)

  def step(model, x):
    return jax.grad(lambda m: (m(x).astype(jnp.float32) ** 2).sum())(model)

  xb = x.astype(jnp.bfloat16)
  graphdef, params = nnx.split(conv)
  f = lambda p, x: step(nnx.merge(graphdef, p), x)   # noqa: E731
  assert _census(f, params, xb, platform='cpu')['op_counts']['convolution'] > 0
  cuda = _census(f, params, xb, platform='cuda')
  assert 'convolution' not in cuda['op_counts'] and cuda['vector_matmuls'] == 0


def test_shifted_windows_by_one_permutation_equal_roll_then_partition():
  from capenext_jax.models.swin_v2 import token_permutation, window_merge, window_partition
  res, window, shift, c = 8, 4, 2, 3
  grid = jnp.asarray(np.random.default_rng(2).normal(size=(2, res, res, c)), jnp.float32)
  tokens = window_partition(grid, window).reshape(2, -1, c)          # window order

  def old(grid):   # the official path: roll, then partition
    return window_partition(jnp.roll(grid, (-shift, -shift), axis=(1, 2)), window)

  def old_back(windows):   # merge, then roll back
    return jnp.roll(window_merge(windows, window, res, res), (shift, shift), axis=(1, 2))

  shifted = token_permutation(res, window, shift)(tokens)
  np.testing.assert_array_equal(shifted, old(grid).reshape(2, -1, c))
  back = token_permutation(res, window, shift, inverse=True)(shifted)
  np.testing.assert_array_equal(back, tokens)
  np.testing.assert_array_equal(window_merge(back.reshape(2, -1, window * window, c), window,
                                             res, res), old_back(old(grid)))
  cotangent = jnp.asarray(np.random.default_rng(3).normal(size=shifted.shape), jnp.float32)
  new_grad = jax.vjp(token_permutation(res, window, shift), tokens)[1](cotangent)[0]
  old_grad = jax.vjp(old, grid)[1](cotangent.reshape(2, -1, window * window, c))[0]
  np.testing.assert_array_equal(new_grad, window_partition(old_grad, window).reshape(2, -1, c))


def test_stage_position_biases_batched_equal_each_blocks_own():
  from flax import nnx
  from capenext_jax.models.swin_v2 import (WindowAttention, stage_position_biases,
                                           stage_position_biases_batched)
  rngs = nnx.Rngs(0)
  attns = [WindowAttention(8, 2, 4, 0, rngs=rngs) for _ in range(3)]
  for i, a in enumerate(attns):   # distinct non-zero biases (the init zeroes them)
    a.cpb_mlp_0.bias.value = jnp.asarray(np.random.default_rng(i).normal(size=(512,)) * 0.1,
                                         jnp.float32)
  graphdef, params = nnx.split(attns)

  def per_block(params):
    return jnp.stack([a.position_bias() for a in nnx.merge(graphdef, params)])

  def batched(params):
    return stage_position_biases_batched(nnx.merge(graphdef, params))

  with jax.default_matmul_precision('highest'):
    np.testing.assert_allclose(batched(params), per_block(params), rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(stage_position_biases(nnx.merge(graphdef, params)),
                                  per_block(params))   # CPU: block by block, exactly
    cot = jnp.asarray(np.random.default_rng(4).normal(size=(3, 2, 16, 16)), jnp.float32)
    grads = [jax.vjp(f, params)[1](cot)[0] for f in (batched, per_block)]
    for new, old in zip(jax.tree.leaves(grads[0]), jax.tree.leaves(grads[1])):
      np.testing.assert_allclose(new, old, rtol=1e-5, atol=1e-6)
  cuda = _census(lambda p: jax.grad(lambda p: stage_position_biases(
      nnx.merge(graphdef, p)).sum())(p), params, platform='cuda')
  assert cuda['op_counts']['scatter'] == 1 and cuda['op_counts']['gather'] == 1


def test_frozen_image_tower_in_bfloat16_gives_the_same_embedding():
  from flax import nnx
  from capenext_jax.models.capenext import frozen_in_compute_dtype
  from capenext_jax.models.clip import CLIP, CLIPConfig
  config = CLIPConfig(embed_dim=16, image_resolution=32, vision_layers=2, vision_width=64,
                      vision_patch_size=16, transformer_width=32, transformer_heads=2,
                      transformer_layers=1, vocab_size=100)
  clip = CLIP(config, rngs=nnx.Rngs(0))
  graphdef, state = nnx.split(clip)
  rng = np.random.default_rng(6)   # LayerNorms off 1 / 0: bfloat16 could not hold them
  frozen = jax.tree.map(lambda a: a + jnp.asarray(rng.normal(size=a.shape) * 0.05, a.dtype)
                        if jnp.issubdtype(a.dtype, jnp.floating) else a, nnx.to_pure_dict(state))
  held = frozen_in_compute_dtype({'clip': frozen}, jnp.bfloat16)['clip']
  vision = held['vision']
  assert vision['conv1']['kernel'].dtype == jnp.bfloat16
  assert vision['ln_post']['scale'].dtype == jnp.float32
  assert vision['transformer']['resblocks'][0]['ln_1']['bias'].dtype == jnp.float32
  assert held['text']['positional_embedding'].dtype == jnp.float32   # only the image tower
  assert frozen_in_compute_dtype({'clip': frozen}, jnp.float32)['clip'] is frozen
  images = jnp.asarray(np.random.default_rng(5).normal(size=(2, 32, 32, 3)), jnp.bfloat16)

  def embed(pure):
    return nnx.merge(graphdef, pure).encode_image(images)

  np.testing.assert_array_equal(jax.jit(embed)(held), jax.jit(embed)(frozen))


def test_token_contraction_off_cpu_is_one_dot_general_equal_to_the_cpu_form():
  rng = np.random.default_rng(7)
  a = jnp.asarray(rng.normal(size=(3, 40, 8)), jnp.float32)
  b = jnp.asarray(rng.normal(size=(3, 40, 24)), jnp.float32)
  old = jnp.swapaxes(a, -1, -2) @ b
  with jax.default_matmul_precision('highest'):
    np.testing.assert_allclose(jnp.einsum('...tm,...tn->...mn', a, b), old, rtol=1e-5,
                               atol=1e-5)
    np.testing.assert_allclose(layers.contract_tokens(a, b), old, rtol=1e-5, atol=1e-5)
  cuda = _census(layers.contract_tokens, a, b, platform='cuda')['op_counts']
  assert cuda['dot_general'] == 1 and 'transpose' not in cuda


def test_swin_in_window_order_equals_the_official_order():
  from flax import nnx
  from capenext_jax.models.swin_v2 import SwinTransformerV2, SwinV2Config
  config = SwinV2Config(img_size=32, embed_dim=16, depths=(2, 2), num_heads=(1, 2),
                        window_size=4, pretrained_window_sizes=(0, 0), drop_path_rate=0.0)
  model = SwinTransformerV2(config, rngs=nnx.Rngs(0))
  noise = np.random.default_rng(8)   # res-post-norms start at zero: blocks would be identities
  nnx.update(model, jax.tree.map(lambda p: p + 0.05 * noise.normal(size=p.shape),
                                 nnx.state(model, nnx.Param)))
  model.eval()
  x = jnp.asarray(np.random.default_rng(9).normal(size=(2, 32, 32, 3)), jnp.float32)

  def run(order):
    model.set_attributes(token_order=order, raise_if_not_found=False)
    graphdef, state = nnx.split(model)
    f = lambda s: (nnx.merge(graphdef, s)(x) ** 2).sum()   # noqa: E731
    with jax.default_matmul_precision('highest'):
      return jax.jit(jax.value_and_grad(f))(state)

  (grid, grid_grads), (window, window_grads) = run('grid'), run('window')
  np.testing.assert_allclose(window, grid, rtol=1e-5)
  for new, old in zip(jax.tree.leaves(window_grads), jax.tree.leaves(grid_grads)):
    np.testing.assert_allclose(new, old, rtol=1e-4, atol=1e-4)   # sums in another order


def test_eval_state_holds_the_frozen_image_tower_in_the_compute_dtype():
  """Evaluation steps with the tower as training does (no per-batch cast in bfloat16); a
  float32 model's state is untouched."""
  import dataclasses
  from capenext_jax import loading
  from capenext_jax.device import partition
  from conftest import FIXTURES
  ckpt = loading.load(str(FIXTURES / 'tiny_capenext.npz'))
  mesh = partition.make_mesh({'data': 1, 'fsdp': 1})
  for dtype, vision_dtypes in (('float32', {'float32'}), ('bfloat16', {'bfloat16', 'float32'})):
    _, state = loading.eval_state(
        dataclasses.replace(ckpt, config=dataclasses.replace(ckpt.config, dtype=dtype)), mesh)
    clip = state.frozen['clip']
    assert {str(a.dtype) for a in jax.tree.leaves(clip['vision'])} == vision_dtypes, dtype
    assert {str(a.dtype) for a in jax.tree.leaves(clip['text'])} == {'float32'}

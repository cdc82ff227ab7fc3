"""The paths that cut a train step's memory traffic (issue 23), each against the formula it
replaces, on CPU. Most are the accelerators' alone (the CPU step keeps its own paths), lowered
for CUDA here and inspected; the hand-written backward passes at the end run on every backend
(the same forward values, gradients equal to autodiff's up to rounding)."""
import math
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

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


# ----------------------------------------------------------------------------- hand-written
# backward passes: the same forward values, autodiff's gradients (round-off apart), and fewer
# or smaller saved tensors. Reference gradients come from autodiff of the replaced formula.
def _saved(f, *args) -> list:
  """The arrays a vjp of f at args keeps for its backward (the leaves of jax.vjp's closure)."""
  return jax.tree.leaves(jax.vjp(f, *args)[1])


def _flax_layer_norm(x, scale, bias):   # the replaced forward: nnx.LayerNorm in float32 (+)
  from flax import nnx
  ln = nnx.LayerNorm(x.shape[-1], epsilon=1e-5, rngs=nnx.Rngs(0))
  ln.scale.value, ln.bias.value = scale, bias
  return nnx.LayerNorm.__call__(ln, x.astype(layers.at_least_float32(x.dtype))).astype(x.dtype)


def _old_gelu(x):
  return 0.5 * x * (1.0 + jax.lax.erf(x * (1.0 / math.sqrt(2.0))))


def _old_l2_normalize(x, scale):
  x = x.astype(layers.at_least_float32(x.dtype))
  return (x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12) * scale)


def _grads(f, args, weights):
  loss = lambda *a: (f(*a).astype(jnp.float64 if weights.dtype == jnp.float64 else jnp.float32)
                     * weights).sum()
  return jax.grad(loss, argnums=tuple(range(len(args))))(*args)


def test_hand_written_norm_and_gelu_backwards_equal_autodiff():
  rng = np.random.default_rng(7)
  x = rng.normal(size=(3, 5, 24)) * 2 + 0.3
  w = rng.normal(size=x.shape)
  scale, bias = rng.normal(size=(24,)) + 1, rng.normal(size=(24,))
  head_scale = rng.normal(size=(5, 1)) + 2
  ln = lambda x, s, b: layers.normalize_last_axis(x, s, b, 1e-5)   # noqa: E731
  cases = [(ln, _flax_layer_norm, (x, scale, bias)),
           (layers.gelu, _old_gelu, (x,)),
           (layers.l2_normalize, _old_l2_normalize, (x, head_scale))]
  with jax.enable_x64(True):
    for new, old, args in cases:
      for dtype in (jnp.float64, jnp.float32):
        a = tuple(jnp.asarray(t, dtype) for t in args)
        # Forward: the replaced formula's values, exactly.
        np.testing.assert_array_equal(new(*a), old(*a))
        # float64: the gradients agree to float64 round-off (the formulas are exact); float32:
        # a different order of the same sums, within a few float32 ulps of each gradient.
        tol = 1e-12 if dtype == jnp.float64 else 2e-6
        for g_new, g_old in zip(_grads(new, a, jnp.asarray(w, dtype)),
                                _grads(old, a, jnp.asarray(w, dtype))):
          np.testing.assert_allclose(g_new, g_old, rtol=tol, atol=tol * np.abs(g_old).max())


def test_hand_written_backwards_keep_bfloat16_inputs_not_float32_copies():
  rng = np.random.default_rng(8)
  x = jnp.asarray(rng.normal(size=(4, 6, 128)), jnp.bfloat16)   # rows of Swin-T's widths
  scale, bias = jnp.ones((128,), jnp.float32), jnp.zeros((128,), jnp.float32)
  big = lambda leaves: [(a.shape, a.dtype) for a in leaves if a.size >= x.size]  # noqa: E731
  nbytes = lambda leaves: sum(a.nbytes for a in leaves)   # noqa: E731
  ln = lambda x: layers.normalize_last_axis(x, scale, bias, 1e-5)   # noqa: E731
  # Each keeps x itself (bfloat16) and only per-row float32 statistics beside it; autodiff of
  # the old formulas kept float32 copies of the rows (GELU: several bfloat16 intermediates).
  for new, old in ((ln, lambda x: _flax_layer_norm(x, scale, bias)),
                   (layers.gelu, _old_gelu),
                   (layers.l2_normalize, lambda x: _old_l2_normalize(x, 1.0).astype(x.dtype))):
    assert big(_saved(new, x)) == [(x.shape, jnp.bfloat16)]
    assert nbytes(_saved(new, x)) < 1.2 * x.nbytes < 2 * x.nbytes <= nbytes(_saved(old, x))


def test_gelu_and_l2_normalize_gradients_in_bfloat16_are_closer_to_exact():
  # GELU's backward computes in float32 from the bfloat16 input and rounds once, where autodiff
  # ran in bfloat16; the exact values are float64 autodiff on the same inputs (x and the
  # cotangent both bfloat16 numbers). Compared by rms error over 3,072 values.
  rng = np.random.default_rng(9)
  x = jnp.asarray(rng.normal(size=(64, 48)) * 2, jnp.bfloat16)
  w = jnp.asarray(rng.normal(size=x.shape), jnp.bfloat16).astype(jnp.float32)
  with jax.enable_x64(True):
    exact = np.asarray(_grads(_old_gelu, (x.astype(jnp.float64),), w.astype(jnp.float64))[0])
  err = lambda g: float(np.sqrt(np.mean((np.asarray(g, np.float64) - exact) ** 2)))  # noqa: E731
  assert err(_grads(layers.gelu, (x,), w)[0]) < err(_grads(_old_gelu, (x,), w)[0])
  # A zero row: F.normalize's gradient there is dy / 1e-12 (autodiff of the norm gave NaN).
  g = jax.grad(lambda x: layers.l2_normalize(x).sum())(jnp.zeros((2, 4), jnp.float32))
  np.testing.assert_array_equal(g, np.full((2, 4), 1e12, np.float32))
  with pytest.raises(ValueError, match='constant along the last axis'):
    layers.l2_normalize(x, jnp.ones((48,), jnp.float32))   # a per-channel scale


def _attention_case(dtype, seed=10):
  rng = np.random.default_rng(seed)
  b, h, lq, lk, d = 2, 3, 5, 7, 8
  qkv = tuple(jnp.asarray(rng.normal(size=(b, h, n, d)), dtype) for n in (lq, lk, lk))
  padding = jnp.asarray(rng.random((b, lk)) < 0.3).at[:, 0].set(False)
  keep = jnp.asarray(rng.random((b, h, lq, lk)) < 0.9)
  weights = (jnp.asarray(rng.normal(size=(b, h, lq, d)), jnp.float32),
             jnp.asarray(rng.normal(size=(b, lq, lk)), jnp.float32))
  return qkv, padding, keep, weights


def _attention_grads(f, qkv, weights, use_mean, attn_mask=None, argnums=(0, 1, 2)):
  def loss(q, k, v, attn_mask):
    out, mean = f(q, k, v, attn_mask)
    return ((out.astype(jnp.float32) * weights[0]).sum()
            + use_mean * (mean.astype(jnp.float32) * weights[1]).sum())
  return jax.grad(loss, argnums=argnums)(*qkv, attn_mask)


def test_softmax_attention_backward_equals_autodiff_of_its_forward():
  from capenext_jax.models.layers.attention import _attention_forward
  qkv, padding, keep, weights = _attention_case(jnp.float32)
  lq, lk = qkv[0].shape[2], qkv[1].shape[2]
  causal = jnp.triu(jnp.ones((lq, lk), bool), 1)
  additive = jnp.asarray(np.random.default_rng(12).normal(size=(lq, lk)), jnp.float32)
  for drop, attn_mask in ((None, None), (keep, None), (keep, causal), (keep, additive)):
    new = lambda q, k, v, m: layers.softmax_attention(   # noqa: E731
        q, k, v, padding, drop, 0.1, attn_mask=m)
    old = lambda q, k, v, m: _attention_forward(q, k, v, padding, m, drop, 0.1)[0]  # noqa: E731
    for a, b in zip(new(*qkv, attn_mask), old(*qkv, attn_mask)):
      np.testing.assert_array_equal(a, b)
    # The additive mask's gradient too (the sum of the logit gradient over batch and heads).
    argnums = (0, 1, 2, 3) if attn_mask is additive else (0, 1, 2)
    for use_mean in (0.0, 1.0):   # the head-mean output unused (a symbolic zero) and used
      # float32: the same sums in another order (and 1/(1-rate) applied after the product),
      # a few ulps of the largest gradient.
      for g_new, g_old in zip(_attention_grads(new, qkv, weights, use_mean, attn_mask, argnums),
                              _attention_grads(old, qkv, weights, use_mean, attn_mask, argnums)):
        np.testing.assert_allclose(g_new, g_old, rtol=0, atol=4e-6 * np.abs(g_old).max())


def test_softmax_attention_backward_in_bfloat16_multiplies_bfloat16_and_stays_accurate():
  from capenext_jax.models.layers.attention import _attention_forward
  qkv, padding, keep, weights = _attention_case(jnp.bfloat16)
  new = lambda q, k, v, m: layers.softmax_attention(q, k, v, padding, keep, 0.1)  # noqa: E731
  old = lambda q, k, v, m: _attention_forward(q, k, v, padding, None, keep, 0.1)[0]  # noqa: E731
  grad_new = lambda *a: _attention_grads(new, a, weights, 1.0)   # noqa: E731
  grad_old = lambda *a: _attention_grads(old, a, weights, 1.0)   # noqa: E731
  assert not any('f32 x f32' in k for k in _census(grad_new, *qkv, platform='cuda')['matmuls'])
  assert any('f32 x f32' in k for k in _census(grad_old, *qkv, platform='cuda')['matmuls'])
  # Accuracy against float32 autodiff on the same bfloat16 inputs, over several draws: the
  # bfloat16 logit gradient costs some (measured 1.08x autodiff's relative rms error); a
  # bound of 1.25x leaves room for rounding on any CPU and fails a float32 -> bfloat16
  # probability residual (1.34x) or row sums from rowsum(dO * O) (2.5x).
  errors = {'new': [], 'old': []}
  for seed in range(12):
    qkv, padding, keep, weights = _attention_case(jnp.bfloat16, seed)
    old = lambda q, k, v, m: _attention_forward(   # noqa: E731
        q, k, v, padding, None, keep, 0.1)[0]
    new = lambda q, k, v, m: layers.softmax_attention(   # noqa: E731
        q, k, v, padding, keep, 0.1)
    truth = _attention_grads(old, tuple(t.astype(jnp.float32) for t in qkv), weights, 1.0)
    for name, f in (('new', new), ('old', old)):
      errors[name].append([float(jnp.linalg.norm(g.astype(jnp.float32) - t) / jnp.linalg.norm(t))
                           for g, t in zip(_attention_grads(f, qkv, weights, 1.0), truth)])
  new_err, old_err = np.mean(errors['new'], 0), np.mean(errors['old'], 0)
  assert np.all(new_err <= 1.25 * old_err), (new_err, old_err)


def test_multi_head_attention_in_training_is_its_projections_around_softmax_attention():
  # Dropout on, key padding and a causal mask: the projections, the scaled heads and the
  # dropout decisions of the module's own stream (a twin at the same count draws them), around
  # `_attention_forward` (what autodiff would differentiate); the mask zeroes the future.
  import math

  from flax import nnx

  from capenext_jax.models.layers.attention import _attention_forward
  mha = layers.MultiHeadAttention(16, 4, dropout=0.3, rngs=nnx.Rngs(0, dropout=1))
  rng = np.random.default_rng(11)
  x = jnp.asarray(rng.normal(size=(2, 6, 16)), jnp.float32)
  padding = jnp.asarray(rng.random((2, 6)) < 0.3).at[:, 0].set(False)
  causal = jnp.triu(jnp.ones((6, 6), bool), 1)
  twin = nnx.clone(mha)
  out, mean = mha(x, x, x, key_padding_mask=padding, attn_mask=causal)
  heads = lambda t: t.reshape(2, 6, 4, 4).transpose(0, 2, 1, 3)   # noqa: E731
  keep = twin.attn_dropout.keep_mask((2, 4, 6, 6))
  assert not bool(keep.all())
  want, want_mean = _attention_forward(heads(twin.q_proj(x)) * (1.0 / math.sqrt(4)),
                                       heads(twin.k_proj(x)), heads(twin.v_proj(x)), padding,
                                       causal, keep, 0.3)[0]
  np.testing.assert_array_equal(out, twin.out_proj(want.transpose(0, 2, 1, 3).reshape(2, 6, 16)))
  np.testing.assert_array_equal(mean, want_mean)
  # Key 0 is never padded and every query may see it.
  assert not np.any(np.asarray(mean)[:, causal]) and np.all(np.asarray(mean)[:, :, 0] > 0)

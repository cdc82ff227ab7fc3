"""Shared layers against PyTorch: attention (packed, kdim/vdim, single key), dropout, drop path."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from capenext_jax.models import layers


def load_torch_mha(ours: layers.MultiHeadAttention, theirs: torch.nn.MultiheadAttention):
  sd = {k: v.detach().numpy() for k, v in theirs.state_dict().items()}
  if 'in_proj_weight' in sd:
    weights = np.split(sd['in_proj_weight'], 3)
  else:
    weights = [sd[f'{n}_proj_weight'] for n in 'qkv']
  for lin, w, b in zip((ours.q_proj, ours.k_proj, ours.v_proj), weights,
                       np.split(sd['in_proj_bias'], 3)):
    lin.kernel.value, lin.bias.value = jnp.asarray(w.T), jnp.asarray(b)
  ours.out_proj.kernel.value = jnp.asarray(sd['out_proj.weight'].T)
  ours.out_proj.bias.value = jnp.asarray(sd['out_proj.bias'])


@pytest.mark.parametrize('kdim, vdim, lk', [(None, None, 7), (16, 8, 7), (None, None, 1)])
def test_attention_matches_torch(kdim, vdim, lk):
  torch.manual_seed(0)
  e, h = 16, 4
  theirs = torch.nn.MultiheadAttention(e, h, kdim=kdim, vdim=vdim).eval()
  with torch.no_grad():  # torch starts the biases at zero; make them count
    theirs.in_proj_bias.normal_()
    theirs.out_proj.bias.normal_()
  ours = layers.MultiHeadAttention(e, h, kdim=kdim, vdim=vdim, dropout=0.1, rngs=nnx.Rngs(0))
  ours.eval()
  load_torch_mha(ours, theirs)
  rng = np.random.default_rng(0)
  q = rng.normal(size=(2, 5, e)).astype(np.float32)
  k = rng.normal(size=(2, lk, kdim or e)).astype(np.float32)
  v = rng.normal(size=(2, lk, vdim or e)).astype(np.float32)
  mask = np.zeros((2, lk), bool)
  mask[0, 3:] = True
  mask_arg = mask if lk > 1 else None
  t = lambda x: torch.from_numpy(x).transpose(0, 1)
  ref, ref_w = theirs(t(q), t(k), t(v), key_padding_mask=None if mask_arg is None
                      else torch.from_numpy(mask))
  out, w = ours(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), key_padding_mask=mask_arg)
  np.testing.assert_allclose(out, ref.transpose(0, 1).detach().numpy(), atol=2e-6)
  np.testing.assert_allclose(w, ref_w.detach().numpy(), atol=1e-7)


def test_dropout_keeps_the_right_fraction_and_scales():
  drop = layers.Dropout(0.1, rngs=nnx.Rngs(dropout=0))
  y = np.asarray(drop(jnp.ones((1000, 1000))))
  kept = y != 0
  assert abs(kept.mean() - 0.9) < 2e-3
  np.testing.assert_allclose(y[kept], 1 / 0.9, rtol=1e-6)
  assert not np.array_equal(np.asarray(drop(jnp.ones((8, 8)))), np.asarray(drop(jnp.ones((8, 8)))))
  drop.eval()
  np.testing.assert_array_equal(drop(jnp.arange(4.0)), jnp.arange(4.0))


def test_drop_path_drops_whole_samples():
  dp = layers.DropPath(0.5, rngs=nnx.Rngs(dropout=0))
  y = np.asarray(dp(jnp.ones((64, 3, 5))))
  per_sample = y.reshape(64, -1)
  assert set(np.unique(per_sample.std(axis=1))) == {0.0}  # all or nothing per sample
  assert set(np.unique(y)) == {0.0, 2.0}
  dp.eval()
  np.testing.assert_array_equal(dp(jnp.ones((2, 3))), jnp.ones((2, 3)))


def test_hash_bits_look_uniform_and_depend_on_the_key():
  a = np.asarray(layers.hash_bits(jax.random.key(0), (1 << 20,)), np.float64) / 2**32
  b = np.asarray(layers.hash_bits(jax.random.key(1), (1 << 20,)), np.float64) / 2**32
  for u in (a, b):
    hist = np.histogram(u, bins=64, range=(0, 1))[0]
    chi2 = ((hist - hist.mean()) ** 2 / hist.mean()).sum()
    assert chi2 < 120                                            # 63 dof: p < 1e-5 if uniform
    assert abs(np.corrcoef(u[:-1], u[1:])[0, 1]) < 5e-3          # neighbours unrelated
  assert abs(np.corrcoef(a, b)[0, 1]) < 5e-3                      # keys unrelated
  assert (a != b).mean() > 0.999


def test_gelu_is_torchs_exact_gelu():
  x = np.random.default_rng(0).normal(size=100_000).astype(np.float32) * 4
  ref = torch.nn.functional.gelu(torch.from_numpy(x)).numpy()
  np.testing.assert_allclose(jax.jit(layers.gelu)(x), ref, atol=2e-6)
  ref_grad = torch.func.grad(lambda t: torch.nn.functional.gelu(t).sum())(torch.from_numpy(x))
  np.testing.assert_allclose(jax.grad(lambda v: layers.gelu(v).sum())(x), ref_grad.numpy(),
                             atol=2e-6)


@pytest.mark.parametrize('in_dim, out_dim, use_bias', [(6, 20, True), (20, 6, True), (8, 8, False)])
def test_dense_gradients_match_torch(in_dim, out_dim, use_bias):
  """`dense` has a hand-written backward (either operand may be the one transposed): its
  value and every gradient must be torch's `F.linear` autograd ones."""
  rng = np.random.default_rng(0)
  x = rng.normal(size=(3, 5, in_dim)).astype(np.float32)
  kernel = rng.normal(size=(in_dim, out_dim)).astype(np.float32)
  bias = rng.normal(size=(out_dim,)).astype(np.float32) if use_bias else None
  probe = rng.normal(size=(3, 5, out_dim)).astype(np.float32)

  def loss(x, kernel, bias):
    return jnp.sum(layers.dense(x, kernel, bias) * probe)

  ours = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))(x, kernel, bias)
  tx, tk = torch.tensor(x, requires_grad=True), torch.tensor(kernel.T.copy(), requires_grad=True)
  tb = torch.tensor(bias, requires_grad=True) if use_bias else None
  theirs = (torch.nn.functional.linear(tx, tk, tb) * torch.tensor(probe)).sum()
  theirs.backward()
  np.testing.assert_allclose(ours[0], theirs.item(), rtol=1e-5)
  d_x, d_kernel, d_bias = ours[1]
  np.testing.assert_allclose(d_x, tx.grad.numpy(), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(d_kernel, tk.grad.numpy().T, rtol=1e-5, atol=1e-5)
  if use_bias:
    np.testing.assert_allclose(d_bias, tb.grad.numpy(), rtol=1e-5, atol=1e-5)
  else:
    assert d_bias is None


def test_linear_is_nnx_linear():
  """Same parameters and the same forward as `nnx.Linear`, so checkpoints are unchanged."""
  ours = layers.linear(6, 4, rngs=nnx.Rngs(0))
  theirs = nnx.Linear(6, 4, rngs=nnx.Rngs(0))
  theirs.kernel.value, theirs.bias.value = ours.kernel.value, ours.bias.value
  assert isinstance(ours, nnx.Linear)
  assert jax.tree.structure(nnx.to_pure_dict(nnx.state(ours))) == \
      jax.tree.structure(nnx.to_pure_dict(nnx.state(theirs)))
  x = np.random.default_rng(1).normal(size=(2, 3, 6)).astype(np.float32)
  np.testing.assert_array_equal(ours(x), theirs(x))


@pytest.mark.parametrize('m, n', [(3, 7), (7, 3)])
def test_contract_tokens_is_transposed_product(m, n):
  """Both CPU arrangements (either operand the smaller) give swapaxes(a) @ b, batched too."""
  rng = np.random.default_rng(0)
  a = rng.normal(size=(2, 11, m)).astype(np.float32)
  b = rng.normal(size=(2, 11, n)).astype(np.float32)
  ours = jax.jit(layers.contract_tokens)(a, b)
  np.testing.assert_allclose(ours, np.einsum('stm,stn->smn', a, b), rtol=1e-5, atol=1e-5)


def test_hash_bits_below_2_32_elements_are_unchanged():
  """The masks of every tensor under 2^32 elements are pinned (exact resume and the parity
  runs depend on them): these values come from the flat-index hash before outer indices."""
  for key, head, tail, total in (
      (jax.random.key(0), [2856213345, 2435891543, 1917312890, 843944311],
       [1448939334, 2508270441], 231837142813),
      (jax.random.PRNGKey(7), [1220097424, 1167518321, 1248536807, 653066895],
       [1905319647, 19262550], 226122211548)):
    bits = np.asarray(layers.hash_bits(key, (3, 5, 7))).reshape(-1)
    assert bits[:4].tolist() == head and bits[-2:].tolist() == tail
    assert int(bits.astype(np.uint64).sum()) == total


# A global batch of 4,300 through 16-head attention over 256 tokens: 4.5e9 > 2^32 weights.
HUGE = (4300, 16, 256, 256)


def test_dropout_builds_past_2_32_elements():
  """Attention dropout of a batch over the old limit traces (abstractly: nothing allocated)."""
  assert math.prod(HUGE) > 2**32
  mha = layers.MultiHeadAttention(32, 16, dropout=0.1, rngs=nnx.Rngs(0))
  x = jax.ShapeDtypeStruct((HUGE[0], HUGE[2], 32), jnp.float32)
  out, weights = nnx.eval_shape(lambda m, q: m(q, q, q), mha, x)
  assert out.shape == x.shape and weights.shape == (HUGE[0],) + HUGE[2:]


def test_dropout_mask_past_2_32_elements_is_bernoulli():
  """Rows of a dropout mask over 2^32 elements, computed alone (XLA slices the mask: nothing
  of the full size is built): each keeps ~90%, independently of the other rows, and unlike a
  wrapped uint32 index (flat index - 2^32) would."""
  drop = layers.Dropout(0.1, rngs=nnx.Rngs(dropout=0))
  graphdef, state = nnx.split(drop)
  rows = jnp.asarray([0, 1, 104, 4095, 4096, 4200, 4299])

  @jax.jit
  def kept_rows(state):
    return nnx.merge(graphdef, state)(jnp.ones(HUGE, jnp.float32))[rows] != 0

  assert kept_rows.lower(state).compile().memory_analysis().temp_size_in_bytes < 2**30
  kept = np.asarray(kept_rows(state)).reshape(len(rows), -1)    # [7, 2^20]
  sigma = math.sqrt(0.9 * 0.1 / kept.shape[1])
  np.testing.assert_allclose(kept.mean(axis=1), 0.9, atol=5 * sigma)
  both = (kept[:, None] & kept[None]).mean(axis=-1)[np.triu_indices(len(rows), 1)]
  np.testing.assert_allclose(both, 0.81, atol=5 * math.sqrt(0.81 * 0.19 / kept.shape[1]))
  # Row 4200 starts at flat index 4200 * 2^20 = 2^32 + 104 * 2^20: a wrapped uint32 index
  # would repeat the flat-index bits of 104 * 2^20 + j there; the folded outer index does not.
  key = jax.random.key(3)
  row = jax.jit(lambda k: layers.hash_bits(k, HUGE)[4200])(key).reshape(-1)
  words = jax.random.key_data(key).reshape(-1).astype(jnp.uint32)
  flat = jnp.uint32(104 << 20) + jax.lax.iota(jnp.uint32, 1 << 20)
  wrapped = layers.hash_block(words, jnp.uint32(0), flat)
  np.testing.assert_array_equal(layers.hash_block(words, jnp.uint32(4200), flat - (104 << 20)),
                                row)
  assert (np.asarray(row) == np.asarray(wrapped)).mean() < 1e-3


def test_norms_keep_float64_and_compute_bfloat16_in_float32():
  """Normalisation statistics in at least float32: a float64 run (the backbone parity tests'
  training mode) stays float64. Over a 2x2 map with a small variance float32 loses ~3e-5."""
  x = np.random.default_rng(0).standard_normal((2, 2, 2, 4)) * 1e-3 + 1.0
  mean, var = x.mean((0, 1, 2)), x.var((0, 1, 2))
  bn_ref = (x - mean) / np.sqrt(var + layers.BN_EPS)
  ln_ref = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-6)
  with jax.enable_x64(True):
    bn = layers.BatchNorm(4)
    ln = layers.LayerNorm(4, epsilon=1e-6, rngs=nnx.Rngs(0))
    for norm, ref in ((bn, bn_ref), (ln, ln_ref)):
      y = norm(jnp.asarray(x))
      assert y.dtype == jnp.float64
      np.testing.assert_allclose(np.asarray(y), ref, rtol=0, atol=1e-9)
  bn = layers.BatchNorm(4)
  assert bn(jnp.asarray(x, jnp.bfloat16)).dtype == jnp.bfloat16 and bn.mean.dtype == jnp.float32


def test_init_rngs_draws_nnx_rngs_keys_without_tracing_counters():
  """A model built with `init_rngs` under jit has the params and dropout keys of one built with
  `nnx.Rngs` (eagerly too), and its trace holds no counter increments (the uint32 adds that made
  tracing a model's construction quadratic) and no key draws (each a threefry loop for XLA to
  compile): only the draws of the weights. The dropout stream the model keeps is a plain one."""
  class Net(nnx.Module):
    def __init__(self, rngs):
      self.a = layers.linear(8, 16, rngs=rngs)
      self.b = layers.linear(16, 4, rngs=rngs)
      self.drop = layers.Dropout(0.5, rngs=rngs)

  def params(make_rngs):
    def build():
      net = Net(make_rngs(3))
      return nnx.state(net, nnx.Param), jax.random.key_data(net.drop.rngs.key.get_value())
    return build

  want = params(nnx.Rngs)()
  for got in (jax.jit(params(layers.init_rngs))(), params(layers.init_rngs)()):
    jax.tree.map(np.testing.assert_array_equal, want, got)
  assert len(jax.tree.leaves(want)) == 5
  assert type(Net(layers.init_rngs(3)).drop.rngs) is nnx.RngStream

  def counts(make_rngs):
    jaxpr = jax.make_jaxpr(params(make_rngs))().jaxpr
    return (sum(e.primitive.name == 'add' and e.outvars[0].aval.dtype == jnp.uint32
                for e in jaxpr.eqns),
            sum(e.primitive.name in ('random_seed', 'random_fold_in', 'random_split')
                for e in jaxpr.eqns))

  assert min(counts(nnx.Rngs)) >= 5 and counts(layers.init_rngs) == (0, 0)


def test_threefry_fold_in_in_python_integers_is_jax_fold_in():
  # The build stream hashes its keys in Python integers; jax.random.fold_in is the truth, over
  # seeds whose words are small, large and 64-bit, and counts at the uint32 extremes.
  from capenext_jax.models.layers.initializers import threefry_fold_in
  words = lambda key: tuple(int(w) for w in np.asarray(jax.random.key_data(key)))  # noqa: E731
  for seed in (0, 3, 2**31 - 1, 2**32 + 5, 2**63 - 1):
    key = jax.random.key(seed)
    for data in (0, 1, 2, 137, 2**31, 2**32 - 1):
      assert threefry_fold_in(words(key), data) == words(jax.random.fold_in(key, data)), (
          seed, data)


def test_next_key_is_the_streams_call():
  """Dropout's `next_key(stream)` draws the keys `stream()` would, and moves its counter the same,
  eagerly and under jit."""
  def keys(draw):
    stream = nnx.Rngs(dropout=5).dropout
    out = [jax.random.key_data(draw(stream)) for _ in range(3)]
    return jnp.stack(out), stream.count[...]

  want = keys(lambda s: s())
  for got in (keys(layers.next_key), jax.jit(lambda: keys(layers.next_key))()):
    jax.tree.map(np.testing.assert_array_equal, want, got)
  assert int(want[1]) == 3 and len(set(map(tuple, np.asarray(want[0])))) == 3


def test_hash_bits_past_2_32_elements_are_pinned_and_rows_are_unrelated():
  """Whole rows of a mask over 2^32 elements, through `hash_bits` itself (not `hash_block`, which
  shares the outer-index fold with it): values at outer indices 1 and 4200 are pinned (exact
  resume of a run with such a mask depends on them), and no two rows hold the same multiset of
  bits. A fold that xor-ed the outer index into the inner index (with the key kept) would make
  every row a permutation of row 0 while each still looked Bernoulli and independent."""
  rows = jnp.asarray([0, 1, 4200])
  bits = jax.jit(lambda k: layers.hash_bits(k, HUGE)[rows])(jax.random.key(3))
  bits = np.asarray(bits).reshape(len(rows), -1)                        # [3, 2^20]
  assert bits[1, :4].tolist() == [963376642, 1896463385, 3997236664, 4180341971]
  assert bits[2, :4].tolist() == [2373389990, 972974995, 2741851682, 550173063]
  assert bits[1, -2:].tolist() == [2834722434, 2227175753]
  assert bits[2, -2:].tolist() == [1741992282, 3363054035]
  assert bits.astype(np.uint64).sum(axis=1).tolist() == [
      2252538918609651, 2253012911572870, 2250995689152295]
  # Two independent sets of 2^20 uniform uint32 share ~2^40 / 2^32 = 256 values (sd 16); a
  # permutation shares all 2^20.
  for i, j in ((0, 1), (0, 2), (1, 2)):
    assert np.intersect1d(bits[i], bits[j]).size < 512, (i, j)

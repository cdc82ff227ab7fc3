"""The bf16 train step as a CUDA GPU would run it, checked on a CPU: lowered for CUDA
(`lower(lowering_platforms=('cuda',))`) with attention 'auto' decided for CUDA
(`layers.target_platform`), the Swin window attentions must reach cuDNN's fused attention
(forward and backward custom calls, one pair per block) and leave no float32 attention logits
`[.., N, N]` in the step."""
import collections
import dataclasses
import os
import re
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from capenext_jax.models import layers
from capenext_jax.models.capenext import CapeNextConfig

sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..', 'benchmarks'))
from lowering import lower_train_step  # noqa: E402 - benchmarks/lowering.py, the one lowering

BATCH = 3   # no per-window bias array [nW, h, N, N] has as many elements as a logits tensor
FWD, BWD = '__cudnn$fmhaScaleBiasSoftmax', '__cudnn$fmhaScaleBiasSoftmaxBackward'


def tiny_config() -> CapeNextConfig:
  """The Swin test size with two blocks in the first two stages (so shifted windows, with
  their masked bias, are in the step too) and embed_dim 24, so that no feature map
  [B, 16, 16, C] looks like a [.., 16, 16] window-attention logits tensor."""
  config = CapeNextConfig.variant('tiny', image_size=64, dtype='bfloat16')
  backbone = dataclasses.replace(config.backbone, embed_dim=24, depths=(2, 2, 1, 1))
  return dataclasses.replace(config, backbone=backbone)


def swin_logits_elements(config: CapeNextConfig, batch_size: int) -> dict[int, int]:
  """{window tokens N: element counts B * windows * heads * N * N of that stage's logits}."""
  swin = config.backbone
  out = collections.defaultdict(set)
  for stage in range(len(swin.depths)):
    window = swin.stage_window(stage)[0]
    n, windows = window * window, (swin.stage_resolution(stage) // window) ** 2
    out[n].add(batch_size * windows * swin.num_heads[stage] * n * n)
  return out


@pytest.fixture(scope='module')
def cuda_step_text():
  # Lowered for CUDA with kernels chosen for it; jax's one trace-time query of the CUDA plugin
  # (cuDNN's version) is answered by `lowering.assumed_cudnn_version` on this GPU-less machine.
  return lower_train_step(tiny_config(), BATCH)


def test_every_swin_block_runs_cudnn_attention_forward_and_backward(cuda_step_text):
  calls = collections.Counter(re.findall(r'custom_call @(__cudnn\$fmha\w+)', cuda_step_text))
  blocks = sum(tiny_config().backbone.depths)
  assert calls[FWD] >= blocks and calls[BWD] >= blocks, calls
  # The frozen CLIP image tower (no bias) runs cuDNN's forward too.
  assert calls['__cudnn$fmhaSoftmax'] >= 1, calls


def test_no_float32_window_attention_logits(cuda_step_text):
  config = tiny_config()
  expected = swin_logits_elements(config, BATCH)
  found = []
  for dims in re.findall(r'tensor<((?:\d+x)+)f32>', cuda_step_text):
    shape = [int(d) for d in dims.rstrip('x').split('x')]
    if len(shape) >= 3 and shape[-1] == shape[-2] and shape[-1] in expected:
      elements = 1
      for d in shape:
        elements *= d
      if elements in expected[shape[-1]]:
        found.append(shape)
  assert not found, f'float32 window-attention logits in the CUDA step: {found[:5]}'


# ----------------------------------------------------------------------------- the head's path
def test_multi_head_attention_without_dropout_lowers_to_cudnn_with_key_padding():
  """Evaluation: the head's key-padded attention reaches cuDNN (padding mask); in training,
  with dropout on the probabilities, it keeps the explicit softmax."""
  from jax._src.cudnn import fused_attention_stablehlo
  mha = layers.MultiHeadAttention(32, 4, dropout=0.1, rngs=nnx.Rngs(0))
  x = jax.ShapeDtypeStruct((2, 10, 32), jnp.bfloat16)
  padding = jax.ShapeDtypeStruct((2, 10), jnp.bool_)
  graphdef, params = nnx.split(mha)

  def lowered(train: bool) -> str:
    def f(params, x, padding):
      module = nnx.merge(graphdef, params)
      module.eval() if not train else module.train()
      return module(x, x, x, key_padding_mask=padding)[0]
    with pytest.MonkeyPatch.context() as patch, layers.target_platform('cuda'):
      patch.setattr(fused_attention_stablehlo, 'check_cudnn_version', lambda: 90800)
      return jax.jit(f).trace(params, x, padding).lower(lowering_platforms=('cuda',)).as_text()

  evaluation = lowered(train=False)
  assert '__cudnn$fmhaSoftmax' in evaluation and 'PADDING' in evaluation
  assert '__cudnn$fmha' not in lowered(train=True)


def test_valid_keys_first_with_lengths_equals_the_key_padding_mask():
  """The exact rewrite the cuDNN path makes of a key padding mask that is not a prefix:
  valid keys moved first, then sequence lengths. float32 XLA against the masked softmax."""
  rng = np.random.default_rng(0)
  q, k, v = (jnp.asarray(rng.normal(size=(3, 6, 2, 8)), jnp.float32) for _ in range(3))
  padding = jnp.asarray([[False, True, False, True, True, False],
                         [True, False, False, False, False, False],
                         [False] * 6])
  lengths, k2, v2 = layers.valid_keys_first(padding, k, v)
  np.testing.assert_array_equal(lengths, [3, 5, 6])
  out = layers.dot_product_attention(q, k2, v2, kv_lengths=lengths, implementation='xla',
                                     site='test', scale=0.5)
  logits = jnp.einsum('btnh,bsnh->bnts', q, k) * 0.5
  weights = jax.nn.softmax(jnp.where(padding[:, None, None], -jnp.inf, logits), axis=-1)
  np.testing.assert_allclose(out, jnp.einsum('bnts,bsnh->btnh', weights, v), rtol=1e-6,
                             atol=1e-6)


def test_cudnn_refusals_fall_back_to_xla_with_one_log_line(caplog):
  """float32 is refused (cuDNN takes bf16 / fp16): the call runs XLA's attention and says so
  once per call site and reason, however often it is traced."""
  from jax._src.cudnn import fused_attention_stablehlo
  q = jnp.ones((1, 4, 2, 8), jnp.float32)
  with pytest.MonkeyPatch.context() as patch, caplog.at_level('WARNING'):
    patch.setattr(fused_attention_stablehlo, 'check_cudnn_version', lambda: 90800)
    assert layers.cudnn_refusal(q, q, q).startswith('dtype float32')
    assert layers.cudnn_refusal(q.astype(jnp.bfloat16), q.astype(jnp.bfloat16),
                                q.astype(jnp.bfloat16)) is None
    for _ in range(2):
      out = layers.dot_product_attention(q, q, q, implementation='cudnn', site='test site')
  np.testing.assert_allclose(out, q)
  lines = [r.getMessage() for r in caplog.records if 'test site' in r.getMessage()]
  assert len(lines) == 1 and 'dtype float32' in lines[0], lines

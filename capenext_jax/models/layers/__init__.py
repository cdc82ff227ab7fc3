"""Building blocks shared by every CapeNext sub-model, with PyTorch semantics.

All modules are batch-first. Mixed precision: every layer computes in the dtype of its input
(its float32 parameters are cast at use, so their gradients come back float32), except where
float32 is needed for accuracy: LayerNorm / BatchNorm statistics and softmax run in float32
(float64 stays float64: `at_least_float32`) and hand back the input dtype. A model therefore
runs in bfloat16 when its inputs are bfloat16 (`CapeNext` casts them to `CapeNextConfig.dtype`).

One module per role; the names below are the package's interface (`layers.linear(...)`):
  initializers.py   init_rngs (building under a trace), torch / timm weight inits
  cpu_kernels.py    dense (every Linear's product, backward arranged for XLA:CPU), sum_rows,
                    contract_tokens
  linear.py         Linear, linear, trunc_normal_linear, conv2d, patch_conv (PatchConv:
                    a matmul off CPU, patch_matmul), to_input_dtype
  norm.py           LayerNorm, layer_norm, normalize_last_axis, l2_normalize (hand-written
                    backwards), BatchNorm, at_least_float32
  mlp.py            gelu, quick_gelu, Mlp (Swin V2 / ViT blocks)
  attention.py      attention kernel choice (ATTENTIONS, target_platform), the fused call with
                    its cuDNN checks and logged XLA fallback, MultiHeadAttention (torch's),
                    softmax_attention (its explicit path, hand-written backward),
                    attention_probabilities (the float32 softmax both paths share)
  dropout.py        Dropout, DropPath (hash masks: hash_bits, hash_block), next_key
  remat.py          run_block under `nnx.remat` (CapeNextConfig.remat)
"""
from capenext_jax.models.layers.attention import (ATTENTION_AUTO, ATTENTION_REFERENCE, ATTENTIONS,
                                                  MultiHeadAttention, attention_implementation,
                                                  attention_probabilities,
                                                  cudnn_refusal, cudnn_version, current_platform,
                                                  dot_product_attention, log_fallback,
                                                  softmax_attention, target_platform,
                                                  valid_keys_first)
from capenext_jax.models.layers.cpu_kernels import contract_tokens, dense, sum_rows
from capenext_jax.models.layers.dropout import (DropPath, Dropout, hash_bits, hash_block,
                                                next_key)
from capenext_jax.models.layers.initializers import (init_rngs, kaiming_normal_fan_out,
                                                     trunc_normal, uniform, xavier_uniform)
from capenext_jax.models.layers.linear import (Linear, PatchConv, conv2d, linear, patch_conv,
                                               patch_matmul,
                                               to_input_dtype, trunc_normal_linear)
from capenext_jax.models.layers.mlp import Mlp, gelu, quick_gelu
from capenext_jax.models.layers.norm import (BN_EPS, BN_MOMENTUM, LN_EPS, BatchNorm, LayerNorm,
                                             at_least_float32, l2_normalize, layer_norm,
                                             normalize_last_axis)
from capenext_jax.models.layers.remat import (REMAT_BLOCKS, REMAT_NONE, check_remat,
                                              remat_policy, run_block)

__all__ = [
    'ATTENTION_AUTO',
    'ATTENTION_REFERENCE',
    'ATTENTIONS',
    'MultiHeadAttention',
    'attention_implementation',
    'attention_probabilities',
    'cudnn_refusal',
    'cudnn_version',
    'current_platform',
    'dot_product_attention',
    'log_fallback',
    'softmax_attention',
    'target_platform',
    'valid_keys_first',
    'contract_tokens',
    'dense',
    'sum_rows',
    'DropPath',
    'Dropout',
    'hash_bits',
    'hash_block',
    'next_key',
    'init_rngs',
    'kaiming_normal_fan_out',
    'trunc_normal',
    'uniform',
    'xavier_uniform',
    'Linear',
    'conv2d',
    'linear',
    'PatchConv',
    'patch_conv',
    'patch_matmul',
    'to_input_dtype',
    'trunc_normal_linear',
    'Mlp',
    'gelu',
    'quick_gelu',
    'BN_EPS',
    'BN_MOMENTUM',
    'LN_EPS',
    'BatchNorm',
    'LayerNorm',
    'at_least_float32',
    'l2_normalize',
    'layer_norm',
    'normalize_last_axis',
    'REMAT_BLOCKS',
    'REMAT_NONE',
    'check_remat',
    'remat_policy',
    'run_block',
]

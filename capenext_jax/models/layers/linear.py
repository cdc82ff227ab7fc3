"""Linear layers and convolutions with PyTorch's semantics and inits: an official weight
`W [out, in]` converts as `kernel = W.T`, a conv weight `[out, in, kh, kw]` as `.transpose(2, 3, 1, 0)`."""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from capenext_jax.models.layers.cpu_kernels import dense
from capenext_jax.models.layers.initializers import trunc_normal, uniform, xavier_uniform


def linear(in_features: int, out_features: int, *, rngs: nnx.Rngs, use_bias: bool = True,
           init: str = 'torch', fan_out_for_xavier: int | None = None) -> Linear:
  """A `Linear` initialised as PyTorch would.

  init: 'torch' (nn.Linear default), 'xavier' (xavier-uniform weight, zero bias) or 'zeros'.
  fan_out_for_xavier: the fan-out xavier sees when the torch weight is a slice of a packed
    matrix (e.g. MHA `in_proj_weight [3E, E]` has fan_out 3E).
  """
  if init == 'torch':
    k_init = b_init = uniform(1.0 / math.sqrt(in_features))
  elif init == 'xavier':
    k_init = xavier_uniform(in_features, fan_out_for_xavier or out_features)
    b_init = jax.nn.initializers.zeros
  elif init == 'zeros':
    k_init = b_init = jax.nn.initializers.zeros
  else:
    raise ValueError(f'unknown init {init!r}')
  return Linear(in_features, out_features, use_bias=use_bias, kernel_init=k_init,
                bias_init=b_init, rngs=rngs)




def trunc_normal_linear(in_features: int, out_features: int, *, rngs: nnx.Rngs,
                        use_bias: bool = True) -> Linear:
  """A `Linear` with timm's init (Swin V2's `_init_weights`, ViT's `init_weights_vit_timm`,
  DINOv2's): trunc-normal(0.02) weight, zero bias. The kernel is drawn after the zero init's
  draws, as the models always did, so seeded weights are unchanged."""
  lin = linear(in_features, out_features, rngs=rngs, use_bias=use_bias, init='zeros')
  lin.kernel.value = trunc_normal(rngs.params(), tuple(lin.kernel.value.shape))
  return lin


class Linear(nnx.Linear):
  """`nnx.Linear` (same parameters, same forward) computed by `dense`, whose backward pass is
  written for speed, in the dtype of its input (the parameters are cast to it). nnx.Linear's
  dtype / dot_general options are not used by CapeNext and are ignored here."""

  def __call__(self, x: jax.Array) -> jax.Array:
    return dense(x, self.kernel[...].astype(x.dtype),
                 None if self.bias is None else self.bias[...].astype(x.dtype))


def to_input_dtype(args, *, dtype=None, inexact=True):
  """A `promote_dtype` for nnx layers (Conv): cast the parameters to the input's dtype
  (args[0]) instead of promoting the input to float32."""
  del dtype, inexact
  return tuple(None if a is None else jnp.asarray(a, args[0].dtype) for a in args)


def patch_conv(in_channels: int, out_channels: int, patch: int, *, rngs: nnx.Rngs) -> nnx.Conv:
  """Non-overlapping patch conv (kernel = stride = patch) with PyTorch's Conv2d default init
  (Swin V2's and the ViTs' references leave their patch conv at it)."""
  bound = 1.0 / math.sqrt(in_channels * patch * patch)
  init = lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -bound, bound)
  return nnx.Conv(in_channels, out_channels, kernel_size=(patch, patch), strides=(patch, patch),
                  padding='VALID', kernel_init=init, bias_init=init,
                  promote_dtype=to_input_dtype, rngs=rngs)


def conv2d(in_channels: int, out_channels: int, kernel_size: int, *, rngs: nnx.Rngs,
           stride: int = 1, padding: int | None = None, use_bias: bool = False,
           kernel_init=None) -> nnx.Conv:
  """`torch.nn.Conv2d` on NHWC maps: symmetric zero padding (default (k - 1) // 2), kernel
  `[kh, kw, in, out]` (a torch weight `[out, in, kh, kw]` converts as `.transpose(2, 3, 1, 0)`).

  kernel_init: default torch's (uniform +-1/sqrt(fan_in)), which the bias always uses.
  """
  pad = (kernel_size - 1) // 2 if padding is None else padding
  bound = uniform(1.0 / math.sqrt(in_channels * kernel_size * kernel_size))
  return nnx.Conv(in_channels, out_channels, kernel_size=(kernel_size, kernel_size),
                  strides=(stride, stride), padding=((pad, pad), (pad, pad)), use_bias=use_bias,
                  kernel_init=kernel_init or bound, bias_init=bound,
                  promote_dtype=to_input_dtype, rngs=rngs)

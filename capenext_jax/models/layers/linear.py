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


def patch_conv(in_channels: int, out_channels: int, patch: int, *, rngs: nnx.Rngs) -> PatchConv:
  """Non-overlapping patch conv (kernel = stride = patch) with PyTorch's Conv2d default init
  (Swin V2's and the ViTs' references leave their patch conv at it)."""
  bound = 1.0 / math.sqrt(in_channels * patch * patch)
  init = lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -bound, bound)
  return PatchConv(in_channels, out_channels, kernel_size=(patch, patch), strides=(patch, patch),
                   padding='VALID', kernel_init=init, bias_init=init,
                   promote_dtype=to_input_dtype, rngs=rngs)


class PatchConv(nnx.Conv):
  """`nnx.Conv` with kernel = stride and VALID padding (a patch embedding; same parameters),
  computed off CPU as `patch_matmul`: a convolution over 3 input channels makes a poor GPU
  kernel (and its weight gradient a poorer one), while the patches are one reshape away from
  an ordinary matmul. CPU keeps the convolution (its numbers stay as they were)."""

  def __call__(self, x: jax.Array) -> jax.Array:
    if (tuple(self.kernel_size) != tuple(self.strides) or self.padding != 'VALID'
        or self.feature_group_count != 1 or x.ndim != 4):
      return super().__call__(x)
    kernel = self.kernel[...].astype(x.dtype)
    bias = None if self.bias is None else self.bias[...].astype(x.dtype)
    conv = lambda x: nnx.Conv.__call__(self, x)   # noqa: E731
    return jax.lax.platform_dependent(x, cpu=conv,
                                      default=lambda x: patch_matmul(x, kernel, bias))


def patch_matmul(x: jax.Array, kernel: jax.Array, bias: jax.Array | None) -> jax.Array:
  """The VALID convolution of x [B, H, W, Cin] with kernel [p, p, Cin, Cout] at stride p (and
  bias [Cout]) as one matmul: the p x p x Cin patches, flattened in the kernel's (row, column,
  channel) order, times kernel [p*p*Cin, Cout] -> [B, H/p, W/p, Cout]."""
  b, h, w, c = x.shape
  p = kernel.shape[0]
  patches = x.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
  return dense(patches.reshape(b, h // p, w // p, p * p * c), kernel.reshape(-1, kernel.shape[-1]),
               bias)


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

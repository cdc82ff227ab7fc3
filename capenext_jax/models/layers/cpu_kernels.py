"""Linear algebra with backward passes arranged for XLA:CPU (docs/DESIGN.md, "Hand-written
backward passes"): the product every `Linear` computes, and the reductions of its gradients.
Where a CPU form is a poor accelerator kernel, the accelerators get their own
(`jax.lax.platform_dependent`)."""
from __future__ import annotations

import jax
import jax.numpy as jnp


@jax.custom_vjp
def dense(x: jax.Array, kernel: jax.Array, bias: jax.Array | None) -> jax.Array:
  """x [..., in] @ kernel [in, out] (+ bias [out]) -> [..., out].

  Gradients equal autodiff's; the kernel gradient goes through `contract_tokens` and the bias
  gradient through `sum_rows` (XLA:CPU runs both far faster than autodiff's forms: a Swin-T
  training step got ~10% faster).
  """
  return _dense_fwd(x, kernel, bias)[0]


def _dense_fwd(x, kernel, bias):
  y = x @ kernel
  return (y if bias is None else y + bias), (x, kernel, bias)


def _dense_bwd(residuals, dy):
  x, kernel, bias = residuals
  x2, dy2 = x.reshape(-1, x.shape[-1]), dy.reshape(-1, dy.shape[-1])
  d_bias = None if bias is None else sum_rows(dy2)
  return dy @ kernel.T, contract_tokens(x2, dy2), d_bias


dense.defvjp(_dense_fwd, _dense_bwd)


def sum_rows(x: jax.Array) -> jax.Array:
  """x [R, C] summed over rows -> [C] in x's dtype.

  On CPU a ones-vector matrix product: the reduction that autodiff emits for a broadcast add
  ran at a fraction of memory speed on XLA:CPU. Elsewhere `sum_rows_float32`: a one-row
  matmul is a poor GPU/TPU kernel (a launch and a pass of its own, where a reduction fuses
  with the op that produces x)."""
  return jax.lax.platform_dependent(x, cpu=lambda x: jnp.ones((x.shape[0],), x.dtype) @ x,
                                    default=sum_rows_float32)


def sum_rows_float32(x: jax.Array) -> jax.Array:
  """x [R, C] summed over rows in float32 (at least), returned in x's dtype: the accumulation
  a bfloat16 matmul does too."""
  acc = jnp.promote_types(x.dtype, jnp.float32)
  return jnp.sum(x, axis=0, dtype=acc).astype(x.dtype)


def contract_tokens(a: jax.Array, b: jax.Array) -> jax.Array:
  """sum_t a[..., t, m] b[..., t, n] -> [..., m, n]: `swapaxes(a) @ b`, the backward-pass
  product that contracts over tokens (kernel gradients, attention's dV and dK).

  The contracted axis is the major one of both operands, so one of them has to be transposed.
  XLA:CPU transposed the larger one or handed the product to a slow generic matmul; on CPU the
  smaller operand (and then the small result) is transposed explicitly, behind barriers so
  XLA cannot fold the transposes back, and the product is an ordinary one. Other backends,
  whose matmuls read transposed operands natively, get one dot_general contracting the token
  axes (no transpose op for XLA to fold or, failing that, to run as a pass of its own).
  """
  def on_cpu(a, b):
    barrier, swap = jax.lax.optimization_barrier, lambda t: jnp.swapaxes(t, -1, -2)
    if a.shape[-1] <= b.shape[-1]:
      return barrier(swap(a)) @ b
    return swap(barrier(barrier(swap(b)) @ a))

  return jax.lax.platform_dependent(
      a, b, cpu=on_cpu, default=lambda a, b: jnp.einsum('...tm,...tn->...mn', a, b))

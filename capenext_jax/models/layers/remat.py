"""Rematerialisation of blocks (`CapeNextConfig.remat`)."""
from __future__ import annotations

import jax
from flax import nnx

REMAT_NONE, REMAT_BLOCKS = 'none', 'blocks'


def remat_policy(remat: str):
  """The `jax.checkpoint` policy of a `CapeNextConfig.remat` value: 'blocks' saves nothing
  inside a block (only its inputs), any other name is a `jax.checkpoint_policies` member."""
  if remat == REMAT_BLOCKS:
    return jax.checkpoint_policies.nothing_saveable
  policy = getattr(jax.checkpoint_policies, remat, None)
  if remat.startswith('_') or not callable(policy):
    raise ValueError(f"remat {remat!r}: expected 'none', 'blocks' or a "
                     f'jax.checkpoint_policies name (e.g. dots_saveable)')
  return policy


def check_remat(remat: str) -> None:
  if remat != REMAT_NONE:
    remat_policy(remat)


def run_block(block: nnx.Module, *args, remat: str = REMAT_NONE):
  """`block(*args)`; under `nnx.remat` with `remat`'s policy unless it is 'none', so the
  backward pass recomputes the block's activations instead of keeping them."""
  if remat == REMAT_NONE:
    return block(*args)
  return nnx.remat(lambda m, *a: m(*a), policy=remat_policy(remat))(block, *args)

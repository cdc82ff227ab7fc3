"""Torch state dicts of convolution + BatchNorm networks (ResNet, HRNet) <-> our weights.

Our module trees mirror the torch names, so a weight's torch name is its '/'-joined path with
'.' separators (list indices included), the module prefix rewritten by an architecture's
`rename`, and the leaf renamed: conv `kernel [kh, kw, in, out]` <-> `weight [out, in, kh, kw]`,
BatchNorm `scale` / `bias` / `mean` / `var` <-> `weight` / `bias` / `running_mean` /
`running_var`. `num_batches_tracked` (unused with a fixed momentum) is skipped on import and
not recreated on export (torch fills it in when it is missing).
"""
from __future__ import annotations

import re
from collections.abc import Callable, Mapping

import numpy as np
from flax import nnx

from capenext_jax import params as params_lib

_LEAF = {'kernel': 'weight', 'scale': 'weight', 'bias': 'bias', 'mean': 'running_mean',
         'var': 'running_var'}
NUM_BATCHES_TRACKED = re.compile(r'.*\.num_batches_tracked')


def expected_weights(module_fn: Callable[[], nnx.Module]) -> dict[str, tuple[int, ...]]:
  """Flat '/'-joined names -> shapes of a module's weights, traced without computing them."""
  state = nnx.state(nnx.eval_shape(module_fn), params_lib.WEIGHTS)
  return {name: tuple(leaf.shape) for name, leaf in _flat_shapes(nnx.to_pure_dict(state)).items()}


def _flat_shapes(tree: Mapping, prefix: str = '') -> dict:
  out = {}
  for k, v in tree.items():
    if isinstance(v, Mapping):
      out.update(_flat_shapes(v, f'{prefix}{k}/'))
    else:
      out[f'{prefix}{k}'] = v
  return out


def torch_name(ours: str, rename: Callable[[str], str]) -> str:
  """'layers/2/0/bn1/mean' -> rename('layers.2.0.bn1') + '.running_mean'."""
  module, _, leaf = ours.rpartition('/')
  return f'{rename(module.replace("/", "."))}.{_LEAF[leaf]}'


def from_torch(sd: Mapping[str, np.ndarray], expected: Mapping[str, tuple[int, ...]],
               rename: Callable[[str], str], *, what: str,
               skipped: Callable[[str], bool] = lambda name: False) -> dict:
  """A torch state dict -> our nested weights pure dict of the `expected` structure.

  Every expected weight must be present with the expected shape; every other key must be
  `num_batches_tracked` or `skipped`. Raises ValueError naming `what` and the keys.
  """
  names = {ours: torch_name(ours, rename) for ours in expected}
  known = set(names.values())
  unexpected = sorted(k for k in sd if k not in known and not NUM_BATCHES_TRACKED.fullmatch(k)
                      and not skipped(k))
  missing = sorted(t for t in names.values() if t not in sd)
  if unexpected or missing:
    raise ValueError(f'{what}: missing keys {missing[:8]}{" ..." if len(missing) > 8 else ""}'
                     f', unexpected keys {unexpected[:8]}'
                     f'{" ..." if len(unexpected) > 8 else ""}')
  flat = {}
  for ours, name in names.items():
    value = np.asarray(sd[name], np.float32)
    if ours.endswith('/kernel'):
      if value.ndim != 4:
        raise ValueError(f'{what}: {name} has shape {value.shape}, expected a conv weight '
                         f'[out, in, kh, kw]')
      value = value.transpose(2, 3, 1, 0)
    if value.shape != expected[ours]:
      raise ValueError(f'{what}: {name} has shape {np.shape(sd[name])}, the model needs '
                       f'{_torch_shape(ours, expected[ours])}')
    flat[ours] = np.ascontiguousarray(value)
  return params_lib.unflatten(flat)


def _torch_shape(ours: str, shape: tuple[int, ...]) -> tuple[int, ...]:
  return (shape[3], shape[2], shape[0], shape[1]) if ours.endswith('/kernel') else shape


def to_torch(weights: Mapping, rename: Callable[[str], str]) -> dict[str, np.ndarray]:
  """Inverse of `from_torch`: torch names and layouts, float32."""
  out = {}
  for ours, value in params_lib.flatten(weights).items():
    value = np.asarray(value, np.float32)
    if ours.endswith('/kernel'):
      value = value.transpose(3, 2, 0, 1)
    out[torch_name(ours, rename)] = np.ascontiguousarray(value)
  return out


def count_indexed(sd: Mapping, pattern: str) -> int:
  """How many distinct indices `(\\d+)` fill `pattern` (a regex with one group) in the keys."""
  rx = re.compile(pattern)
  return len({m.group(1) for k in sd if (m := rx.match(k))})

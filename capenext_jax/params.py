"""Params pure dicts: flat '/'-joined names, and checked writes into a module.

A model's weights are its params and its BatchNorm statistics (`WEIGHTS`): what converters,
exports and pretrained files carry. A pure dict is `nnx.to_pure_dict(nnx.state(model,
WEIGHTS))` (for a model without BatchNorm, exactly its `nnx.Param`s): nested dicts whose list
indices (Swin stages and blocks, CLIP residual blocks, head layers) are int keys. Flat names
join the path with '/', indices as decimal strings; no other path segment is all digits, so
the mapping is invertible. Only numpy and flax are imported (no TensorFlow, torch, orbax).
"""
from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from flax import nnx

WEIGHTS = (nnx.Param, nnx.BatchStat)   # what a weights file holds: params + BatchNorm statistics


def flatten(tree: Mapping, prefix: str = '', *, sep: str = '/', leaf=np.asarray) -> dict:
  """Nested pure dict -> {'a/0/b': leaf(array)} (`sep` joins the keys)."""
  flat = {}
  for k, v in tree.items():
    name = f'{prefix}{k}'
    if isinstance(v, Mapping):
      flat.update(flatten(v, name + sep, sep=sep, leaf=leaf))
    else:
      flat[name] = leaf(v)
  return flat


def unflatten(flat: Mapping[str, np.ndarray]) -> dict:
  """Inverse of `flatten`: digit segments become int keys, as `nnx.to_pure_dict` has."""
  nested: dict = {}
  for name, value in flat.items():
    *parents, leaf = [int(p) if p.isdigit() else p for p in name.split('/')]
    node = nested
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = value
  return nested


def check_structure(expected: Mapping, given: Mapping, path: str = '') -> None:
  """ValueError naming the first missing, unexpected or mis-shaped entry of `given`.

  Keys are compared as strings, so int and string list indices are both accepted.
  """
  if not isinstance(given, Mapping):
    raise ValueError(f'params{path}: expected a dict, got {type(given).__name__}')
  exp_keys, got_keys = {str(k) for k in expected}, {str(k) for k in given}
  if exp_keys != got_keys:
    raise ValueError(f'params{path}: missing {sorted(exp_keys - got_keys)}, '
                     f'unexpected {sorted(got_keys - exp_keys)}')
  by_str = {str(k): v for k, v in given.items()}
  for k, v in expected.items():
    if isinstance(v, Mapping):
      check_structure(v, by_str[str(k)], f'{path}/{k}')
    elif tuple(np.shape(v)) != np.shape(by_str[str(k)]):
      raise ValueError(f'params{path}/{k}: shape {np.shape(by_str[str(k)])} != model '
                       f'{tuple(np.shape(v))}')


def check_finite(params: Mapping, path: str = '') -> None:
  """ValueError naming the first parameter holding NaN or inf (e.g. a diverged run's export):
  such weights would turn every prediction into NaN."""
  for k, v in params.items():
    if isinstance(v, Mapping):
      check_finite(v, f'{path}/{k}')
    elif np.issubdtype(np.asarray(v).dtype, np.floating) or np.asarray(v).dtype.name == 'bfloat16':
      bad = int(np.size(v) - np.count_nonzero(np.isfinite(np.asarray(v, np.float32))))
      if bad:
        raise ValueError(f'params{path}/{k}: {bad} of {np.size(v)} values are NaN or inf; '
                         f'these weights are not usable (a diverged training?)')


def load_into(model: nnx.Module, params: Mapping) -> None:
  """Write a weights pure dict (`WEIGHTS`) into `model`; structure and shapes must match
  exactly."""
  state = nnx.state(model, WEIGHTS)
  check_structure(nnx.to_pure_dict(state), params)
  state.replace_by_pure_dict(params)
  nnx.update(model, state)

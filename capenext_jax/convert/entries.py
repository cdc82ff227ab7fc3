"""Entry tables: the (reference name, path in our pure dict, kind) lists that the Swin V2 and
ViT converters build from a state dict's structure, and the two directions over them.

kind says how a tensor changes layout: 'linear' (torch [out, in] <-> our kernel [in, out]),
'conv' (torch [O, I, kh, kw] <-> our [kh, kw, I, O]) or 'copy'.
"""
from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence

import numpy as np

Entry = tuple[str, tuple, str]   # (reference name, path in our pure dict, kind)

_TO_OURS = {'linear': lambda w: w.T, 'conv': lambda w: w.transpose(2, 3, 1, 0),
            'copy': lambda w: w}
_TO_TORCH = {'linear': lambda w: w.T, 'conv': lambda w: w.transpose(3, 2, 0, 1),
             'copy': lambda w: w}
_NDIM = {'linear': 2, 'conv': 4}


def params_from_entries(sd: Mapping[str, np.ndarray], entries: Sequence[Entry],
                        skipped: Iterable[re.Pattern] = (), what: str = '') -> dict:
  """State dict -> nested pure dict (float32 numpy) of exactly `entries`.

  Raises ValueError naming the keys that are neither an entry nor `skipped`, the missing
  entries, or a tensor of the wrong rank. what: prefixed to the key lists ('Swin V2 ').
  """
  expected = {name for name, _, _ in entries}
  skipped = tuple(skipped)
  unknown = [k for k in sd if k not in expected and not any(p.fullmatch(k) for p in skipped)]
  if unknown:
    raise ValueError(f'unexpected {what}keys {listed(unknown)}')
  missing = [name for name, _, _ in entries if name not in sd]
  if missing:
    raise ValueError(f'missing {what}keys {listed(missing)}')
  params: dict = {}
  for name, path, kind in entries:
    value = np.asarray(sd[name], dtype=np.float32)
    if kind in _NDIM and value.ndim != _NDIM[kind]:
      raise ValueError(f'{name}: expected a {_NDIM[kind]}-d tensor, got shape {value.shape}')
    node = params
    for key in path[:-1]:
      node = node.setdefault(key, {})
    node[path[-1]] = np.ascontiguousarray(_TO_OURS[kind](value))
  return params


def entries_to_torch(params: Mapping, entries: Sequence[Entry]) -> dict[str, np.ndarray]:
  """Inverse of `params_from_entries`: reference names and layouts, float32. Int path keys
  (block / stage indices) also find their strings (our exported files)."""
  out = {}
  for name, path, kind in entries:
    node = params
    for key in path:
      node = by_index(node)[key] if isinstance(key, int) else node[key]
    out[name] = np.ascontiguousarray(_TO_TORCH[kind](np.asarray(node, dtype=np.float32)))
  return out


def by_index(node: Mapping) -> dict:
  """A list-of-modules node keyed by int, whether its keys are ints or their strings."""
  return {int(k): v for k, v in node.items()}


def listed(keys: list[str], limit: int = 8) -> str:
  """The first `limit` keys, and how many more."""
  more = f' and {len(keys) - limit} more' if len(keys) > limit else ''
  return f'{keys[:limit]}{more}'

"""CapeNext in JAX / Flax NNX.

`load_pretrained(path)` rebuilds an exported model (see docs/EXPORT.md). It is resolved lazily
so that `import capenext_jax` stays free of jax, flax and every optional dependency.
"""
from __future__ import annotations

__all__ = ['load_pretrained']


def __getattr__(name: str):
  if name == 'load_pretrained':
    from capenext_jax.loading import load_pretrained
    return load_pretrained
  raise AttributeError(f'module {__name__!r} has no attribute {name!r}')

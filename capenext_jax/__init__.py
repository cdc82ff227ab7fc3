"""CapeNext in JAX / Flax NNX.

`load_pretrained(path)` rebuilds an exported model (see docs/EXPORT.md) with jax, flax, numpy
and safetensors alone. It is resolved on first use (PEP 562), so that `import capenext_jax`
and its light modules (runtime, cli, extras, errors) import no jax: eval.py, train.py and the
console commands (capenext_jax/commands.py) re-execute for their allocator
(runtime.tune_allocator) before the program's imports, which the re-exec would otherwise
repeat.
"""
from __future__ import annotations

__all__ = ['load_pretrained']


def __getattr__(name: str):
  if name == 'load_pretrained':
    from capenext_jax.loading import load_pretrained
    return load_pretrained
  raise AttributeError(f'module {__name__!r} has no attribute {name!r}')

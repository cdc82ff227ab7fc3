"""CapeNext in JAX / Flax NNX.

`load_pretrained(path)` rebuilds an exported model (see docs/EXPORT.md) with jax, flax, numpy
and safetensors alone: `loading` imports orbax and ml_collections only for a train workdir,
and never TensorFlow, PyTorch or any other optional dependency (tests/test_export.py).
"""
from __future__ import annotations

from capenext_jax.loading import load_pretrained

__all__ = ['load_pretrained']

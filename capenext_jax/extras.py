"""Optional dependencies, imported by name with an error that says which extra brings them.

The core install (`pip install capenext-jax`) loads, converts and predicts with exports and
train.py workdirs and scores predictions. The rest comes in extras (pyproject.toml):

  [torch]  reading / writing PyTorch `.pth` files (official checkpoints)
  [data]   the tf.data pipeline and the TFDS builder (TensorFlow)
  [train]  training: [data] plus clu's metric writers and TensorBoard
  [hf]     Hugging Face transformers (reading HF CLIP configs)
  [demo]   the Gradio web demo (`capenext-demo`)
"""
from __future__ import annotations

import importlib
from types import ModuleType

PACKAGE = 'capenext-jax'


class MissingExtra(ImportError):
  """An optional dependency is not installed; the message names the extra that brings it."""


def require(module: str, extra: str, purpose: str) -> ModuleType:
  """`importlib.import_module(module)`, or MissingExtra naming `extra` when the top-level
  package of `module` is absent (an import error from inside an installed package is not
  masked)."""
  try:
    return importlib.import_module(module)
  except ModuleNotFoundError as e:
    top = module.split('.')[0]
    if e.name is not None and e.name.split('.')[0] != top:
      raise
    raise MissingExtra(f'{purpose} needs the Python package {top!r}, which is not installed '
                       f'(pip install "{PACKAGE}[{extra}]")') from e

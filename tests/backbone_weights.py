"""Deterministic random weights for the backbone parity fixtures, by torch name (numpy only).

The fixture script (tests/make_backbone_fixtures.py) loads them into the PyTorch references and
the tests rebuild the same arrays from the names and shapes stored in the fixture, so the
committed files need not hold the weights. Each array comes from its own generator seeded
by (seed, crc32(name)): independent of which other names exist and of their order.
"""
import zlib

import numpy as np


def random_weights(shapes: dict, seed: int) -> dict:
  """{torch name: shape} -> {torch name: float32 array}: He-scaled conv weights, BatchNorm
  weights and running variances in [0.5, 1.5], biases and running means ~ N(0, 0.1^2)."""
  out = {}
  for name, shape in shapes.items():
    rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
    shape = tuple(shape)
    if len(shape) == 4:
      value = rng.standard_normal(shape) * np.sqrt(2.0 / np.prod(shape[1:]))
    elif name.endswith(('running_var', '.weight')):
      value = rng.uniform(0.5, 1.5, shape)
    else:
      value = 0.1 * rng.standard_normal(shape)
    out[name] = value.astype(np.float32)
  return out

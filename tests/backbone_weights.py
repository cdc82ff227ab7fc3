"""Deterministic random weights for the backbone parity fixtures, by torch name (numpy only).

The fixture scripts (tests/make_backbone_fixtures.py, tests/fixtures/make_vit_fixtures.py) load
them into the PyTorch references and the tests rebuild the same arrays from the names and
shapes stored in the fixture, so the committed files need not hold the weights. Each array
comes from its own generator seeded by (seed, crc32(name)): independent of which other names
exist and of their order.
"""
import zlib

import numpy as np


def random_weights(shapes: dict, seed: int) -> dict:
  """{torch name: shape} -> {torch name: float32 array}: He-scaled conv weights, Linear weights
  ~ N(0, 1/fan_in) (attention logits of order 1: neither uniform nor saturated), BatchNorm /
  LayerNorm weights, running variances and LayerScale gammas in [0.5, 1.5], position
  embeddings and class tokens ~ N(0, 1), biases, running means and the rest ~ N(0, 0.1^2)."""
  out = {}
  for name, shape in shapes.items():
    rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
    shape = tuple(shape)
    if len(shape) == 4:
      value = rng.standard_normal(shape) * np.sqrt(2.0 / np.prod(shape[1:]))
    elif len(shape) == 2 and name.endswith('.weight'):
      value = rng.standard_normal(shape) / np.sqrt(shape[1])
    elif name.endswith(('running_var', '.weight', 'gamma')):
      value = rng.uniform(0.5, 1.5, shape)
    elif name.endswith(('pos_embed', 'cls_token')):
      value = rng.standard_normal(shape)
    else:
      value = 0.1 * rng.standard_normal(shape)
    out[name] = value.astype(np.float32)
  return out


def sampled_rows(grad: np.ndarray, rows: int = 4) -> np.ndarray:
  """What the full-size fixtures keep of a large gradient: `rows` evenly spaced rows (first to
  last) of its leading non-singleton axis (output channels; the positions of a position
  embedding [1, N, D]), each row flattened."""
  grad = np.asarray(grad)
  while grad.ndim > 1 and grad.shape[0] == 1:
    grad = grad[0]
  grad = grad.reshape(grad.shape[0], -1)
  return grad[np.linspace(0, grad.shape[0] - 1, rows).round().astype(int)]

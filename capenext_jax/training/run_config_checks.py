"""The run config's numbers, checked before a training starts (one line naming the field).

A value out of range fails late and obscurely otherwise (`batch_size=0`: ZeroDivisionError;
`log_every_steps=0`: modulo by zero after the first step's compile), or not at all: a negative
learning rate trains uphill, `total_steps=-5` runs no step, `keep_checkpoints=0` keeps no
checkpoint to resume from. Fields a config does not have (run configs written before they
existed) are not checked. Only the standard library is imported.
"""
from __future__ import annotations

import math
import numbers
from collections.abc import Callable

# dotted field -> (test, what it must be). Counts are ints; rates and factors are finite floats.
_INT = lambda v: isinstance(v, numbers.Integral) and not isinstance(v, bool)  # noqa: E731
_REAL = lambda v: (isinstance(v, numbers.Real) and not isinstance(v, bool)  # noqa: E731
                   and math.isfinite(v))


def _at_least(n: int) -> Callable:
  return lambda v: _INT(v) and v >= n


def _positive(v) -> bool:
  return _REAL(v) and v > 0


RULES: dict[str, tuple[Callable, str]] = {
    'batch_size': (_at_least(1), 'an integer >= 1'),
    'eval_batch_size': (_at_least(1), 'an integer >= 1'),
    'total_steps': (_at_least(0), 'an integer >= 0 (0: num_epochs decides)'),
    'num_epochs': (_at_least(0), 'an integer >= 0'),
    'log_every_steps': (_at_least(1), 'an integer >= 1'),
    'eval_every_steps': (_at_least(0), 'an integer >= 0 (0: eval_every_epochs decides)'),
    'eval_every_epochs': (_at_least(0), 'an integer >= 0'),
    'checkpoint_every_steps': (_at_least(0),
                               'an integer >= 0 (0: checkpoint_every_epochs decides)'),
    'checkpoint_every_epochs': (_at_least(0), 'an integer >= 0'),
    'keep_checkpoints': (_at_least(1), 'an integer >= 1 (a killed run resumes from one)'),
    'tensorboard_overlays': (_at_least(0), 'an integer >= 0'),
    'optim.lr': (_positive, 'a number > 0'),
    'optim.base_batch_size': (_at_least(1), 'an integer >= 1'),
    'optim.warmup_steps': (_at_least(0), 'an integer >= 0'),
    'optim.warmup_ratio': (lambda v: _REAL(v) and 0 <= v <= 1, 'a number in [0, 1]'),
    'optim.gamma': (_positive, 'a number > 0'),
    'optim.b1': (lambda v: _REAL(v) and 0 <= v < 1, 'a number in [0, 1)'),
    'optim.b2': (lambda v: _REAL(v) and 0 <= v < 1, 'a number in [0, 1)'),
    'optim.eps': (_positive, 'a number > 0'),
    'data.shots': (_at_least(1), 'an integer >= 1'),
    'data.num_queries': (_at_least(1), 'an integer >= 1'),
    'data.val_episodes': (_at_least(1), 'an integer >= 1'),
    'data.test_episodes': (_at_least(1), 'an integer >= 1'),
    'data.heatmap_size': (_at_least(0), 'an integer >= 0 (0: a quarter of the input side)'),
}
_MISSING = object()


def _get(config, dotted: str):
  node = config
  for name in dotted.split('.'):
    if not hasattr(node, 'get'):
      return _MISSING
    node = node.get(name, _MISSING)
    if node is _MISSING:
      return _MISSING
  return node


def check_run_config(config) -> None:
  """ValueError naming the first field of `config` (an ml_collections ConfigDict) whose value
  is out of range, as `--config.<field>=<value>: must be ...`."""
  for dotted, (ok, must) in RULES.items():
    value = _get(config, dotted)
    if value is not _MISSING and not ok(value):
      raise ValueError(f'--config.{dotted}={value!r}: must be {must}')
  if _get(config, 'total_steps') == 0 and _get(config, 'num_epochs') == 0:
    raise ValueError('--config.total_steps=0 and --config.num_epochs=0: the run has no step; '
                     'give either one > 0')

"""Progress lines for long loops (eval, batch predict): done / total, rate and ETA.

    progress = Progress(len(items), 'predict', unit='images')
    for batch in batches:
      ...
      progress.update(len(batch))     # prints at most every `every_s` seconds, and at the end

The rate and ETA count from the first `update`, so a first batch that compiles the function
does not make the ETA of the rest look longer than it is. Lines go to stderr (stdout stays the
program's results) and only on process 0.
"""
from __future__ import annotations

import sys
import time


def format_duration(seconds: float) -> str:
  m, s = divmod(int(round(seconds)), 60)
  h, m = divmod(m, 60)
  return f'{h}:{m:02d}:{s:02d}'


class Progress:
  """Counts work done and prints "label: done/total unit (rate/s, ETA h:mm:ss)" lines."""

  def __init__(self, total: int, label: str, *, unit: str = 'items', every_s: float = 10.0,
               stream=None, enabled: bool | None = None):
    self.total, self.label, self.unit, self.every_s = total, label, unit, every_s
    self.stream = stream or sys.stderr
    if enabled is None:
      import jax
      enabled = jax.process_index() == 0
    self.enabled = enabled
    self.done = 0
    self._t_first = self._t_start = time.perf_counter()
    self._done_first = 0
    self._printed = -float('inf')

  def update(self, n: int) -> None:
    """`n` more items done (the first call closes the warm-up: compile, first batch)."""
    now = time.perf_counter()
    if self.done == 0:
      self._t_first, self._done_first = now, n
    self.done += n
    if self.done >= self.total or now - self._printed >= self.every_s:
      self._printed = now
      self._print(now)

  def _print(self, now: float) -> None:
    if not self.enabled:
      return
    line = f'{self.label}: {self.done}/{self.total} {self.unit}'
    timed = self.done - self._done_first
    if self.done >= self.total:
      line += f' in {format_duration(now - self._t_start)}'
    elif timed > 0 and now > self._t_first:
      rate = timed / (now - self._t_first)
      line += f' ({rate:.1f}/s, ETA {format_duration((self.total - self.done) / rate)})'
    print(line, file=self.stream, flush=True)

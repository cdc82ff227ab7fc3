"""training/prefetch.py: batches placed ahead in order, a bounded look-ahead, producer errors
raised in the consumer, and a clean stop that does not wait for the source's teardown."""
import itertools
import threading
import time

import jax
import numpy as np
import pytest

from capenext_jax.device import partition
from capenext_jax.training.prefetch import DevicePrefetch


def test_batches_come_placed_and_in_order():
  mesh = partition.make_mesh({'data': -1, 'fsdp': 1}, jax.devices()[:1])
  host = ({'x': np.full((2, 3), i, np.float32)} for i in range(5))
  with DevicePrefetch(host, lambda b: partition.shard_batch(b, mesh)) as batches:
    got = list(batches)
  assert [int(b['x'][0, 0]) for b in got] == [0, 1, 2, 3, 4]
  assert all(isinstance(b['x'], jax.Array) and b['x'].sharding == partition.batch_sharding(mesh)
             for b in got)
  with pytest.raises(StopIteration):   # exhausted stays exhausted
    next(batches)


def test_reads_ahead_two_batches_and_no_more():
  read = []
  endless = (read.append(i) or i for i in itertools.count())
  batches = DevicePrefetch(endless, lambda b: b, size=2)
  assert next(batches) == 0
  deadline = time.monotonic() + 10
  while len(read) < 3 and time.monotonic() < deadline:   # placed ahead while the step runs
    time.sleep(0.01)
  time.sleep(0.2)
  # Batches 1 and 2 queued, 3 read and waiting for room: never more than size + 1 ahead.
  assert len(read) == 4
  assert [next(batches) for _ in range(3)] == [1, 2, 3]
  batches.close()
  assert left(batches)   # a blocked producer leaves on close


@pytest.mark.parametrize('where', ['read', 'place'])
def test_producer_errors_are_raised_in_the_consumer(where):
  def host():
    yield from range(3)
    if where == 'read':
      raise OSError('image 7.jpg: truncated')

  def place(b):
    if where == 'place' and b == 2:
      raise ValueError('batch 2 has the wrong shape')
    return b

  batches = DevicePrefetch(host(), place)
  assert next(batches) == 0 and next(batches) == 1
  expected = (OSError, 'truncated') if where == 'read' else (ValueError, 'wrong shape')
  if where == 'read':
    assert next(batches) == 2
  for _ in range(2):          # raised as itself, and again (not a hang) if asked again
    with pytest.raises(expected[0], match=expected[1]):
      next(batches)
  batches.close()
  assert left(batches)


def test_an_error_in_the_loop_stops_the_producer():
  started = threading.Event()

  def endless():
    for i in itertools.count():
      started.set()
      yield i

  with pytest.raises(FloatingPointError):
    with DevicePrefetch(endless(), lambda b: b) as batches:
      started.wait(10)
      next(batches)
      raise FloatingPointError('loss is nan')
  assert left(batches)


def test_close_does_not_wait_for_the_source_to_be_released():
  """A tf.data iterator's teardown can take seconds; the producer thread does it after
  close() has returned (here the source's teardown blocks until the test releases it)."""
  release, released = threading.Event(), threading.Event()

  def endless():
    try:
      yield from itertools.count()
    finally:
      release.wait(60)
      released.set()

  batches = DevicePrefetch(endless(), lambda b: b)
  assert next(batches) == 0
  t = time.monotonic()
  batches.close(timeout=60)
  assert time.monotonic() - t < 30, 'close() waited for the source to be released'
  assert batches._stopped.is_set() and not released.is_set()
  release.set()
  assert left(batches) and released.is_set()


def left(batches: DevicePrefetch) -> bool:
  """The producer thread ended (it may still be releasing its source just after close())."""
  batches._thread.join(10)
  return not batches._thread.is_alive()

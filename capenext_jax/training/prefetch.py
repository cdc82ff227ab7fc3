"""Batches read and placed on the devices by a background thread, a few steps ahead.

    with DevicePrefetch(host_batches, lambda b: device_batch(b, mesh)) as batches:
      for batch in batches:     # already global arrays with the batch sharding
        state, metrics = train_step(state, batch, ...)

The train step is dispatched asynchronously, so without this the main thread would wait,
between two steps, for the host pipeline's next batch (tf.data's `.numpy()`) and then for its
host-to-device copy; here both happen while the device computes. Order is kept (one
producer), so a resumed run still sees exactly its batches.

An exception in the producer (a bad image, a pipeline error) is raised again, as itself, by the
`next()` that would have returned that batch. `close()` (or leaving the `with`) stops the
producer; the thread is a daemon, so a run that exits any other way is not held up by it.
"""
from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator
from typing import Any

_BATCH, _END, _ERROR = 'batch', 'end', 'error'


class DevicePrefetch:
  """Iterator over `place(batch)` for the batches of `batches`, computed `size` ahead."""

  def __init__(self, batches: Iterator[Any], place: Callable[[Any], Any], size: int = 2):
    if size < 1:
      raise ValueError(f'prefetch size must be >= 1, got {size}')
    self._queue: queue.Queue = queue.Queue(maxsize=size)
    self._stop = threading.Event()
    self._last = None    # the end or error item, once the consumer has met it
    self._stopped = threading.Event()   # the producer has left its loop
    self._thread = threading.Thread(target=self._produce, args=(batches, place),
                                    name='device-prefetch', daemon=True)
    self._thread.start()

  def _produce(self, batches: Iterator[Any], place: Callable[[Any], Any]) -> None:
    try:
      for batch in batches:
        if not self._put((_BATCH, place(batch))):
          return
      self._put((_END, None))
    except BaseException as e:   # noqa: BLE001 -- handed to the consumer, which raises it
      self._put((_ERROR, e))
    finally:
      # The thread then drops `batches`. A tf.data iterator's teardown can wait seconds for
      # its autotuning thread; it does so here, after close() has returned.
      self._stopped.set()

  def _put(self, item) -> bool:
    """Queue `item`, waiting for room; False once `close()` asked the producer to stop."""
    while not self._stop.is_set():
      try:
        self._queue.put(item, timeout=0.05)
        return True
      except queue.Full:
        pass
    return False

  def __iter__(self) -> DevicePrefetch:
    return self

  def __next__(self) -> Any:
    kind, value = self._last or self._queue.get()
    if kind == _BATCH:
      return value
    self._last = (kind, value)
    if kind == _END:
      raise StopIteration
    raise value

  def close(self, timeout: float = 10.0) -> None:
    """Stop the producer and wait (up to `timeout` s) for it to leave its loop; the source
    iterator is released in the background. Idempotent."""
    self._stop.set()
    while True:   # free a producer blocked on a full queue
      try:
        self._queue.get_nowait()
      except queue.Empty:
        break
    self._stopped.wait(timeout)

  def __enter__(self) -> DevicePrefetch:
    return self

  def __exit__(self, *exc) -> None:
    self.close()

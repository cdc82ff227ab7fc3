"""Checkpoints of the train state and the data position, and preemption (SIGTERM) handling.

A checkpoint step directory holds two items:
  state: `TrainState` fields in `state.CHECKPOINTED` (trainable, opt_state, step, rng)
  data:  JSON data position, e.g. {'epoch': 3, 'step_in_epoch': 120}, so that a resumed run
         re-enters its input pipeline where it stopped.
Kept: the last `keep_last` checkpoints plus the best one by `best_metric` (checkpoints saved
without metrics only count as "last"). Saving is asynchronous: `save` returns once the arrays
are copied off the device; call `wait()` before exiting.
"""
from __future__ import annotations

import signal
from typing import Any, Mapping

import jax
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils
from orbax.checkpoint import checkpoint_managers as policies

from capenext_jax.training.state import CHECKPOINTED, TrainState


class Checkpointer:
  """An orbax CheckpointManager over (TrainState, data position)."""

  def __init__(self, directory: str, *, keep_last: int = 3, best_metric: str = 'pck',
               best_mode: str = 'max', async_save: bool = True):
    if best_mode not in ('max', 'min'):
      raise ValueError(f"best_mode must be 'max' or 'min', got {best_mode!r}")
    keep = policies.AnyPreservationPolicy([
        policies.LatestN(n=keep_last),
        # BestN sorts ascending and keeps the tail, so 'min' reverses the order.
        policies.BestN(get_metric_fn=lambda m: m[best_metric], reverse=best_mode == 'min',
                       n=1, keep_checkpoints_without_metrics=False),
    ])
    options = ocp.CheckpointManagerOptions(preservation_policy=keep,
                                           enable_async_checkpointing=async_save)
    self.manager = ocp.CheckpointManager(directory, options=options)

  def save(self, step: int, state: TrainState, data_position: Mapping[str, Any],
           metrics: Mapping[str, float] | None = None, *, force: bool = False) -> bool:
    """Start saving `state` at `step` (a host int); metrics rank it for 'best'. True if saved."""
    items = {k: getattr(state, k) for k in CHECKPOINTED}
    args = ocp.args.Composite(state=ocp.args.StandardSave(items),
                              data=ocp.args.JsonSave(dict(data_position)))
    metrics = None if metrics is None else {k: float(v) for k, v in metrics.items()}
    return self.manager.save(step, args=args, metrics=metrics, force=force)

  def restore(self, target: TrainState, step: int | None = None
              ) -> tuple[TrainState, dict[str, Any]]:
    """Restore the latest (or `step`) checkpoint into `target`'s shapes and shardings.

    target: a TrainState whose checkpointed fields are arrays or ShapeDtypeStructs with
      shardings (see `state.abstract_state`); its `frozen` is kept as is.
    Returns (state, data_position).
    """
    step = self.manager.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f'no checkpoint in {self.manager.directory}')
    abstract = {k: jax.tree.map(_as_abstract, getattr(target, k)) for k in CHECKPOINTED}
    args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract),
                              data=ocp.args.JsonRestore())
    restored = self.manager.restore(step, args=args)
    return target.replace(**restored.state), dict(restored.data)

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self.manager.all_steps())

  def wait(self) -> None:
    """Block until pending asynchronous saves are on disk."""
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.close()


def _as_abstract(x):
  if isinstance(x, jax.ShapeDtypeStruct):
    return x
  return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)


class StopSignal:
  """Turns SIGTERM (preemption) into a flag the train loop polls between steps.

  Single process: a handler sets the flag (the loop then saves, waits and returns).
  Several processes: hosts must agree on the step to stop at, so `should_stop` uses jax's
  preemption sync point (the coordination service started by `jax.distributed.initialize`
  catches SIGTERM itself); no Python handler is installed, which would displace it.
  Install from the main thread (a Python signal-module restriction).
  """

  def __init__(self, signals: tuple[int, ...] = (signal.SIGTERM,)):
    self.requested = False
    self._previous = {}
    if jax.process_count() == 1:
      self._previous = {s: signal.signal(s, self._handle) for s in signals}

  def _handle(self, signum, frame):
    del frame
    self.requested = True

  def should_stop(self, step: int) -> bool:
    """Poll once per step, on every host, with the same `step`."""
    if jax.process_count() > 1:
      return multihost_utils.reached_preemption_sync_point(step)
    return self.requested

  def uninstall(self) -> None:
    for s, handler in self._previous.items():
      signal.signal(s, handler)
    self._previous = {}

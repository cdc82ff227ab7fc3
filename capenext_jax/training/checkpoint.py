"""Checkpoints of the train state and the data position, and preemption (SIGTERM / Ctrl-C)
handling.

A checkpoint step directory holds two items:
  state: `TrainState` fields in `state.CHECKPOINTED` (trainable, batch_stats, opt_state, step,
         rng); the optimizer state per leaf (optax's own tree: `0/mu/<param path>`, ...)
         whatever the layout it has in memory (device/flat.py's buffers are split on save
         and laid out for the run's mesh on restore), so a checkpoint does not depend on the
         mesh, and those written before the buffers existed resume as they are
  data:  JSON data position {'step': next global step}, so that a resumed run re-enters its
         input pipeline where it stopped (its episodes are a function of the step).
The frozen part of the state (CLIP, RNG streams) does not change during a run: it is written
once, beside the checkpoints (`save_frozen`: `<workdir>/frozen`), so that a workdir evaluates
and converts without the pretrained files its config names (`restore_weights` +
`restore_frozen`: no optimizer state, no pretrained file read).
Kept: the last `keep_last` checkpoints plus the best one by `best_metric` (checkpoints saved
without metrics only count as "last"); each step's metrics are written with it, so the best
step is known after a restart (`best_step`). Saving is asynchronous: `save` returns once the arrays
are copied off the device; call `wait()` before exiting.

Faults: a save that fails (disk full, a write error) raises `CheckpointError` at the next
`save`, `check` or `wait`, naming the step and the directory; orbax writes each step into a
temporary directory and renames it only when complete, so the previous checkpoint stays whole
and the run resumes from it. `restore_latest` skips a latest checkpoint that does not restore
(a truncated file), moving it aside into `<directory>.corrupt/` and saying so.
"""
from __future__ import annotations

import datetime
import logging
import shutil
import signal
import sys
from pathlib import Path
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils
from orbax.checkpoint import checkpoint_managers as policies

from capenext_jax.device import flat
from capenext_jax.device.state import CHECKPOINTED, TrainState
from capenext_jax.errors import first_line

FROZEN_DIR = 'frozen'   # <workdir>/frozen: the run's frozen weights (orbax, written once)
WEIGHTS = ('trainable', 'batch_stats', 'step')   # what evaluating a checkpoint reads of it


class CheckpointError(OSError):
  """A checkpoint could not be written or read."""


class _OneLineOrbaxErrors(logging.Filter):
  """Orbax logs a failed save from several threads, each with its traceback (TensorStore's
  messages alone can run to pages). The run reports the failure itself, as a CheckpointError,
  so while a Checkpointer is open those records keep one line."""

  def filter(self, record: logging.LogRecord) -> bool:
    if record.levelno >= logging.ERROR and 'orbax' in record.pathname:
      first = next((ln for ln in record.getMessage().splitlines() if ln.strip()), '')
      record.msg, record.args, record.exc_info, record.exc_text = first[:300], (), None, None
    return True


class _PeriodicSaveFilter(logging.Filter):
  """Drops orbax's warning for a save without metrics: periodic (non-validation) checkpoints
  have none by design, and the warning would repeat at every one of them."""

  def filter(self, record: logging.LogRecord) -> bool:
    return 'did not provide metrics' not in record.getMessage()


logging.getLogger('absl').addFilter(_PeriodicSaveFilter())


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
    # best_fn makes orbax write each step's metrics to disk, so that the best step is still
    # known to a resumed run or to `capenext-convert --best` (the policy alone keeps them in
    # memory only).
    options = ocp.CheckpointManagerOptions(preservation_policy=keep,
                                           best_fn=lambda m: m[best_metric], best_mode=best_mode,
                                           enable_async_checkpointing=async_save)
    self.manager = ocp.CheckpointManager(directory, options=options)
    self._failed = False
    self._log_filter = _OneLineOrbaxErrors()
    logging.getLogger('absl').addFilter(self._log_filter)

  def save(self, step: int, state: TrainState, data_position: Mapping[str, Any],
           metrics: Mapping[str, float] | None = None, *, force: bool = False) -> bool:
    """Start saving `state` at `step` (a host int); metrics rank it for 'best'. True if saved."""
    self.check()
    items = {k: getattr(state, k) for k in CHECKPOINTED}
    if flat.layout_of(state.opt_state) is not None:   # stored per leaf (module docstring)
      items['opt_state'] = _opt_state_to_leaves(state.opt_state)
    args = ocp.args.Composite(state=ocp.args.StandardSave(items),
                              data=ocp.args.JsonSave(dict(data_position)))
    metrics = None if metrics is None else {k: float(v) for k, v in metrics.items()}
    try:
      return self.manager.save(step, args=args, metrics=metrics, force=force)
    except Exception as e:  # noqa: BLE001 - any failure to write is reported the same way
      raise self._error(f'could not save step {step}', e) from e

  def check(self) -> None:
    """Raise CheckpointError if a background save has failed (cheap: call it every step)."""
    try:
      self.manager.check_for_errors()
      # A failure while finalising surfaces only through wait_until_finished, which returns
      # at once when no save is running.
      if not self.manager.is_saving_in_progress():
        self.manager.wait_until_finished()
    except Exception as e:  # noqa: BLE001
      raise self._error('a checkpoint save failed', e) from e

  def _error(self, what: str, error: BaseException) -> CheckpointError:
    self._failed = True
    kept = [s for s in self.all_steps() if (Path(self.manager.directory) / str(s)).is_dir()]
    latest = (f'the latest complete checkpoint is step {max(kept)}' if kept
              else 'no complete checkpoint yet')
    return CheckpointError(f'{what} in {self.manager.directory} ({first_line(error)}); {latest}, '
                           f'and a restart resumes from it')

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
    flat_target = abstract['opt_state']
    layout = flat.layout_of(flat_target)
    if layout is not None:   # on disk per leaf, each moment sharded as its param
      abstract['opt_state'] = flat.per_leaf_target(flat_target, abstract['trainable'])
    args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract),
                              data=ocp.args.JsonRestore())
    restored = self.manager.restore(step, args=args)
    state = dict(restored.state)
    if layout is not None:   # into the target's buffers, on the device
      state['opt_state'] = flat.put(state['opt_state'],
                                    jax.tree.map(lambda x: x.sharding, flat_target))
    return target.replace(**state), dict(restored.data)

  def restore_latest(self, target: TrainState) -> tuple[TrainState, dict[str, Any]] | None:
    """`restore` of the newest checkpoint that restores, or None when there is none.

    A checkpoint that fails to restore is moved into `<directory>.corrupt/` (nothing is
    deleted) with a warning naming it and the reason, and the next older one is tried. One
    whose parameters have other names or shapes than `target`'s is not damaged but saved by
    another model config: ValueError (`check_fits`), and nothing is moved.
    """
    for step in sorted(self.all_steps(), reverse=True):
      self.check_fits(target, step)   # another config is not damage: refuse, move nothing
      try:
        return self.restore(target, step)
      except Exception as e:  # noqa: BLE001 - any unreadable checkpoint is skipped alike
        moved = self._move_aside(step)
        print(f'warning: checkpoint step {step} in {self.manager.directory} does not restore '
              f'({first_line(e)}); moved to {moved}, trying the previous one', file=sys.stderr,
              flush=True)
    return None

  def check_fits(self, target: TrainState, step: int) -> None:
    """ValueError when checkpoint `step` holds other parameter names or shapes than `target`
    (trainable params and BatchNorm statistics), read from its metadata without restoring.
    A checkpoint whose metadata does not read is left to `restore` (that is damage)."""
    # The handler reads the step's tree metadata directly: a manager opened on an existing
    # directory has no handler registered for 'state' until its first save or restore.
    try:
      saved = _shapes(ocp.StandardCheckpointHandler().metadata(
          Path(self.manager.directory) / str(step) / 'state'))
    except Exception:  # noqa: BLE001 - unreadable metadata: a damaged checkpoint
      return
    if not any(k.startswith('trainable/') for k in saved):
      return   # not a layout this check knows: restore decides
    for part in ('trainable', 'batch_stats'):
      want = {k: v for k, v in _shapes({part: getattr(target, part)}).items()}
      got = {k: v for k, v in saved.items() if k.split('/')[0] == part}
      if want == got:
        continue
      diff = (sorted(set(want) ^ set(got)) or
              [f'{k} {got[k]} != {want[k]}' for k in sorted(want) if got[k] != want[k]])
      raise ValueError(
          f'{self.manager.directory}: checkpoint step {step} does not fit this run\'s model '
          f'config ({len(diff)} parameter(s) differ, first: {diff[0]}); it was saved by '
          f'another config (was the workdir\'s config.json lost or replaced?). Train with '
          f'that config, or into another --workdir; no checkpoint was moved')

  def restore_weights(self, target: Mapping[str, Any], step: int | None = None
                      ) -> tuple[dict[str, Any], int]:
    """The model weights of checkpoint `step` (default: the newest that restores), without
    the optimizer state: (`{'trainable', 'batch_stats', 'step'}` restored into `target`'s
    abstract shapes and shardings, the step restored). Nothing is moved or written.

    Raises ValueError naming the directory and the step when none (or `step`) restores.
    """
    directory = self.manager.directory
    steps = self.all_steps()
    if step is not None and step not in steps:
      raise ValueError(f'{directory}: no checkpoint step {step} (there are {steps})')
    abstract = {k: jax.tree.map(_as_abstract, target[k]) for k in WEIGHTS}
    args = ocp.args.Composite(state=ocp.args.PyTreeRestore(
        abstract, restore_args=ocp.checkpoint_utils.construct_restore_args(abstract),
        partial_restore=True))
    errors = []
    for s in [step] if step is not None else sorted(steps, reverse=True):
      try:
        return dict(self.manager.restore(s, args=args).state), s
      except Exception as e:  # noqa: BLE001 - a damaged step: name it, try the one before
        errors.append(f'step {s}: {first_line(e)}')
        if step is None:
          print(f'warning: checkpoint step {s} in {directory} does not restore '
                f'({first_line(e)}); trying the previous one', file=sys.stderr, flush=True)
    raise ValueError(f'{directory}: no checkpoint that restores'
                     + (f' ({"; ".join(errors)})' if errors else ''))

  def _move_aside(self, step: int) -> Path:
    directory = Path(self.manager.directory)
    stamp = datetime.datetime.now().strftime('%Y%m%d-%H%M%S')
    dest = directory.parent / f'{directory.name}.corrupt' / f'{step}-{stamp}'
    if jax.process_index() == 0:
      dest.parent.mkdir(parents=True, exist_ok=True)
      shutil.move(str(directory / str(step)), dest)
    multihost_utils.sync_global_devices(f'capenext checkpoint {step} moved aside')
    self.manager.reload()
    return dest

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self.manager.all_steps())

  def metrics(self, step: int) -> dict[str, float]:
    """The metrics saved with `step` ({} when it was saved without any)."""
    return dict(self.manager.metrics(step) or {})

  def best_step(self) -> int | None:
    """The kept step with the best `best_metric` (None when no step has metrics)."""
    return self.manager.best_step()

  def wait(self) -> None:
    """Block until pending asynchronous saves are on disk; CheckpointError if one failed."""
    if self._failed:   # reported already; what was saved before it is on disk
      return
    self.check()
    try:
      self.manager.wait_until_finished()
    except Exception as e:  # noqa: BLE001
      raise self._error('a checkpoint save failed', e) from e

  def close(self) -> None:
    """Finish pending saves and release the manager; a save failure already raised by
    `check` / `wait` / `save` is not raised a second time."""
    try:
      self.manager.close()
    except Exception as e:  # noqa: BLE001
      if not self._failed:
        raise self._error('a checkpoint save failed', e) from e
    finally:
      logging.getLogger('absl').removeFilter(self._log_filter)


def _shapes(tree) -> dict[str, tuple[int, ...]]:
  """{'part/a/0/b': shape} of a tree of arrays, ShapeDtypeStructs or orbax ArrayMetadata
  (int and str list indices alike)."""
  def name(key) -> str:
    for attr in ('key', 'idx', 'name'):
      if hasattr(key, attr):
        return str(getattr(key, attr))
    return str(key)
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {'/'.join(name(k) for k in path): tuple(leaf.shape) for path, leaf in leaves}


def save_frozen(workdir: str | Path, frozen: Any) -> bool:
  """Write the run's frozen weights to `<workdir>/frozen` unless they are there; True if
  written. Orbax writes into a temporary folder and renames it when complete, so the folder
  is whole or absent. Typed PRNG keys (the RNG streams) are stored as their raw key data."""
  path = Path(workdir).absolute() / FROZEN_DIR
  if path.exists():
    return False
  try:
    with ocp.StandardCheckpointer() as checkpointer:
      checkpointer.save(path, jax.tree.map(_key_data, frozen))
      checkpointer.wait_until_finished()
  except Exception as e:  # noqa: BLE001 - any failure to write is reported the same way
    raise CheckpointError(f'could not save the frozen weights to {path} ({first_line(e)}); '
                          f'a restart writes them again') from e
  return True


def restore_frozen(workdir: str | Path, target: Any) -> Any | None:
  """The frozen weights `save_frozen` wrote, restored into `target`'s (abstract) shapes and
  shardings; None for a workdir written before they were stored."""
  path = Path(workdir).absolute() / FROZEN_DIR
  if not path.is_dir():
    return None
  abstract = jax.tree.map(lambda x: _key_data(_as_abstract(x)), target)
  with ocp.StandardCheckpointer() as checkpointer:
    try:
      raw = checkpointer.restore(path, abstract)
    except Exception as e:  # noqa: BLE001 - damaged or from another model: name the folder
      raise ValueError(f'{path}: the frozen weights do not restore ({first_line(e)})') from None
  return jax.tree.map(_wrap_key_data, raw, target)


def _is_key(x) -> bool:
  return jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def _key_data(x):
  """Typed PRNG keys -> their uint32 key data (abstract too); other leaves unchanged."""
  if not _is_key(x):
    return x
  if isinstance(x, jax.ShapeDtypeStruct):
    sharding = x.sharding
    if isinstance(sharding, jax.sharding.NamedSharding):   # the key-data axis: replicated
      sharding = jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec())
    return jax.ShapeDtypeStruct(jax.eval_shape(jax.random.key_data, x).shape, jnp.uint32,
                                sharding=sharding)
  return jax.random.key_data(x)


def _wrap_key_data(raw, like):
  return jax.random.wrap_key_data(raw, impl=like.dtype._impl) if _is_key(like) else raw


# Flat optimizer buffers -> optax's per-leaf state, on the device (one executable per layout).
_opt_state_to_leaves = jax.jit(flat.to_leaves)


def _as_abstract(x):
  if isinstance(x, jax.ShapeDtypeStruct):
    return x
  return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)


class StopSignal:
  """Turns SIGTERM (preemption) and SIGINT (Ctrl-C) into a flag the train loop polls between
  steps, so both save, then end the run with exit status 0.

  Single process: a handler sets the flag (the loop then saves, waits and returns). SIGINT's
  default handler raises KeyboardInterrupt wherever Python happens to be, and inside a
  callback (jax's `_xla_gc_callback`, a prefetch thread) it is printed and swallowed, so the
  first Ctrl-C was sometimes lost and otherwise killed the run without a save; the flag makes
  every Ctrl-C count, and count the same. `received` names the signal.
  Several processes: hosts must agree on the step to stop at, so `should_stop` uses jax's
  preemption sync point (the coordination service started by `jax.distributed.initialize`
  catches SIGTERM itself); no Python handler is installed, which would displace it.
  Install from the main thread (a Python signal-module restriction).
  """

  def __init__(self, signals: tuple[int, ...] = (signal.SIGTERM, signal.SIGINT)):
    self.requested = False
    self.received: str | None = None
    self._previous = {}
    if jax.process_count() == 1:
      self._previous = {s: signal.signal(s, self._handle) for s in signals}

  def _handle(self, signum, frame):
    del frame
    self.requested = True
    self.received = signal.Signals(signum).name

  def should_stop(self, step: int) -> bool:
    """Poll once per step, on every host, with the same `step`."""
    if jax.process_count() > 1:
      return multihost_utils.reached_preemption_sync_point(step)
    return self.requested

  def uninstall(self) -> None:
    for s, handler in self._previous.items():
      signal.signal(s, handler)
    self._previous = {}

"""The training loop: `train_and_evaluate(config, workdir, data)` (train.py builds `data` with
`data_pipeline.splits.run_splits` and is otherwise a thin flag wrapper).

One readable loop (big_vision style). Per step: the host pipeline's batch for global step i,
read and placed on the mesh two steps ahead by a background thread (prefetch.py), goes through
the jitted step (state donated), which applies one Adam update and returns metrics as device
arrays. Every `log_every_steps` the accumulated metrics are fetched in one transfer, checked
for non-finite values (naming the step and the term) and written (TensorBoard + log) with a
progress line (steps/s, ETA). Validation PCK@0.2 and checkpoints follow their cadences.

Resume: the checkpoint holds the train state and {'step': next global step}; the pipeline
restarts at that step (its episodes and augmentations are a function of the step), and the
dropout / drop-path keys are fold_in(rng, step), so a resumed run continues exactly.
Preemption (SIGTERM): the loop saves at the current step, waits for the write, and returns.

Nothing lost: process 0 locks the workdir for the run (`workdir.WorkdirLock`), a restart with
a changed config is refused (`workdir.check_resume_config`), a failed save stops the run at
once (`checkpoint.CheckpointError`, the previous checkpoint kept), and a latest checkpoint
that does not restore is moved aside for the one before it (`Checkpointer.restore_latest`).
"""
from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Iterator
from typing import Protocol

import jax
import ml_collections

from capenext_jax import params as params_lib
from capenext_jax.device import forward as forward_lib
from capenext_jax.device import partition
from capenext_jax.device import state as state_lib
from capenext_jax.device import step as step_lib
from capenext_jax.evaluation.evaluator import EvalData, Evaluator, pck_at
from capenext_jax.evaluation.pairs import EvalProtocol
from capenext_jax.evaluation.predict_fn import predict_fn
from capenext_jax.evaluation.visualize import overlay_grid
from capenext_jax.extras import require
from capenext_jax.models.capenext import CapeNextConfig, frozen_in_compute_dtype
from capenext_jax.mp100 import episodes as ep
from capenext_jax.progress import Progress, format_duration
from capenext_jax.text.cache import replicated_text_cache
from capenext_jax.training import checkpoint, init, prefetch, run_config_checks, schedule
from capenext_jax.training import workdir as workdir_lib

metric_writers = require('clu.metric_writers', 'train', 'training (metric writers)')
periodic_actions = require('clu.periodic_actions', 'train', 'training (progress reports)')


def log(msg: str) -> None:
  if jax.process_index() == 0:
    print(msg, flush=True)


def _every(steps: int, epochs: int, steps_per_epoch: int) -> int:
  return steps if steps > 0 else max(1, epochs * steps_per_epoch)


def _count(tree) -> int:
  return sum(int(x.size) for x in jax.tree.leaves(tree))


def _millions(n: int) -> str:
  return f'{n / 1e6:.2f}M'


def start_banner(config, workdir: str, mesh, state, data: 'RunData', steps_per_epoch: int,
                 total: int, source: str, optim: ml_collections.ConfigDict) -> list[str]:
  """What the run is about to do, in a few lines: devices and mesh, parameter counts, data
  sizes, length, learning rate (as scaled to the batch), config source and workdir."""
  devices = jax.devices()
  mesh_text = ' x '.join(f'{name}={size}' for name, size in mesh.shape.items())
  lines = [f'devices: {len(devices)} x {devices[0].platform} ({devices[0].device_kind}) in '
           f'{jax.process_count()} process(es); mesh {mesh_text}',
           f'params: {_millions(_count(state.trainable))} trainable, '
           f'{_millions(_count(state.frozen))} frozen (CLIP)']
  for name, split in (('train', data.train), ('val', data.val), ('test', data.test)):
    if split is not None:
      d = split.dataset
      lines.append(f'data {name}: {len(d.ann_id)} instances of {len(d.category_ids)} '
                   f'categories ({d.ann_file})')
  lines.append(f'run: {total} steps of batch {config.batch_size} ({steps_per_epoch} steps/epoch)'
               f', workdir {os.path.abspath(workdir)}')
  lines.append(f'lr {optim.lr:.3g}, warmup {optim.warmup_steps} steps (optim.lr_scaling='
               f'{optim.get("lr_scaling", "none")!r}, base batch '
               f'{optim.get("base_batch_size", config.batch_size)})')
  if source:
    lines.append(f'config: {source}')
  return lines


def hparams(config: ml_collections.ConfigDict) -> dict:
  """The config as TensorBoard hparams: flat dotted names, scalars (anything else as text)."""
  scalar = lambda v: v if isinstance(v, (bool, int, float, str)) else str(v)  # noqa: E731
  return params_lib.flatten(config.to_dict(), sep='.', leaf=scalar)


class TrainData(EvalData, Protocol):
  """What the loop reads of the training split (`data_pipeline.splits.Split` is one)."""

  def train_batches(self, global_batch_size: int, *, start_step: int = 0) -> Iterator[dict]:
    """Endless batches from global step `start_step` (this host's rows of each)."""


class RunData(Protocol):
  """The splits of a run (`data_pipeline.splits.RunData`); val / test None when not used."""
  train: TrainData
  val: EvalData | None
  test: EvalData | None


def eval_progress(evaluator: Evaluator, label: str) -> Progress:
  return Progress(len(evaluator.pairs), label, unit='pairs', stream=sys.stdout)


def _read_results(workdir: str) -> dict | None:
  """The results.json of a finished session of the run in `workdir`, or None."""
  path = os.path.join(workdir, 'results.json')
  if not os.path.isfile(path):
    return None
  with open(path) as f:
    results = json.load(f)
  return results if 'test_pck_end' in results or 'val_pck' in results else None


def held_out_lines(results: dict) -> list[str]:
  """The final test line and the before -> after line of a run's results (what it has)."""
  lines = []
  if 'test_pck_end' in results:
    lines.append(f'test PCK@0.2 after training (step {results.get("step")}): '
                 f'{100 * results["test_pck_end"]:.2f}')
  if 'test_pck_start' in results and 'test_pck_end' in results:
    lines.append(f'held-out test PCK@0.2: untrained {100 * results["test_pck_start"]:.2f} -> '
                 f'trained {100 * results["test_pck_end"]:.2f}')
  return lines


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, data: RunData, *,
                       source: str = '', model_config: CapeNextConfig | None = None) -> dict:
  """Train (or resume) in `workdir`; returns {'step', 'val_pck', 'test_pck_start', ...}.

  source: where the config came from (file and overrides), for the start banner.
  model_config: `config.model` as the program parsed it (parsed here when not given).
  """
  run_config_checks.check_run_config(config)
  if model_config is None:
    model_config = CapeNextConfig.from_dict(config.model.to_dict())
  # Scoped, not jax.config.update: the library leaves the caller's global settings alone.
  with workdir_lib.WorkdirLock(workdir, enabled=jax.process_index() == 0), \
      jax.default_matmul_precision(
          step_lib.matmul_precision(config.precision, model_config.dtype)):
    return _train_and_evaluate(config, model_config, workdir, data, source)


def _finished_run(workdir: str, start: int, total: int) -> dict | None:
  """The results of a run that is already complete (said again), or None to go on."""
  if start < total:
    return None
  previous = _read_results(workdir)
  log(f'the run in {os.path.abspath(workdir)} is already complete (step {start} of {total})'
      + ('' if previous else '; testing it again'))
  for line in held_out_lines(previous or {}):
    log(line)
  return previous


def _test_at_end(test: Evaluator, state, total: int, results: dict, writer, workdir: str, *,
                 resumed: bool) -> dict:
  """`results` with the test scores after training, logged with the before -> after line
  (whose 'before' a resumed run reads from the session that measured it)."""
  results['test_end'] = test.run(state, eval_progress(test, 'test (after training)'))
  results['test_pck_end'] = pck_at(results['test_end'])
  log(f'test PCK@0.2 after training (step {total}): {100 * results["test_pck_end"]:.2f}')
  writer.write_scalars(total, {'test/pck': results['test_pck_end']})
  if resumed:
    results = {**{k: v for k, v in (_read_results(workdir) or {}).items()
                  if k.startswith('test_') and k.endswith('start')}, **results}
  for line in held_out_lines(results)[1:]:
    log(line)
  return results


def _initial_state(config: ml_collections.ConfigDict, model_config: CapeNextConfig, tx, mesh,
                   ckpt: checkpoint.Checkpointer, workdir: str):
  """(graphdef, state, shardings, start step) of a run: its init, or where its latest
  checkpoint left it. The frozen weights (CLIP) are stored in the workdir once, so that it
  evaluates without the pretrained files; a resumed run keeps the ones it started with."""
  graphdef, state, shardings = init.init_state(config, tx, mesh, model_config=model_config)
  frozen = checkpoint.restore_frozen(workdir, state_lib.abstract_state(state.frozen,
                                                                       shardings.frozen))
  if frozen is None:
    checkpoint.save_frozen(workdir, state.frozen)
  else:
    state = state.replace(frozen=frozen)
  target = state_lib.abstract_state(state, shardings).replace(frozen=state.frozen)
  restored = ckpt.restore_latest(target) if ckpt.latest_step() is not None else None
  if restored is None:
    return graphdef, state, shardings, 0
  state, position = restored
  log(f'resumed from step {int(position["step"])}')
  return graphdef, state, shardings, int(position['step'])


def _train_and_evaluate(config: ml_collections.ConfigDict, model_config: CapeNextConfig,
                        workdir: str, data: RunData, source: str) -> dict:
  workdir_lib.check_resume_config(config, workdir)
  init.check_pretrained(config)
  steps_per_epoch = ep.epoch_length(data.train.dataset) // config.batch_size
  total = config.total_steps or config.num_epochs * steps_per_epoch
  eval_every = _every(config.eval_every_steps, config.eval_every_epochs, steps_per_epoch)
  ckpt_every = _every(config.checkpoint_every_steps, config.checkpoint_every_epochs,
                      steps_per_epoch)
  optim = schedule.for_batch_size(config.optim, config.batch_size)
  tx = schedule.make_optimizer(optim, steps_per_epoch)
  lr_at = schedule.make_schedule(optim, steps_per_epoch)
  mesh = partition.make_mesh(config.mesh_shape)
  partition.check_batch_size('batch_size', config.batch_size, mesh)
  partition.check_batch_size('eval_batch_size', config.eval_batch_size, mesh)
  results: dict = {}

  with jax.set_mesh(mesh):
    ckpt = checkpoint.Checkpointer(os.path.join(os.path.abspath(workdir), 'checkpoints'),
                                   keep_last=config.keep_checkpoints, best_metric='pck',
                                   async_save=config.async_checkpoints)
    graphdef, state, shardings, start = _initial_state(config, model_config, tx, mesh, ckpt,
                                                       workdir)
    previous = _finished_run(workdir, start, total)
    if previous is not None:   # its results are on disk: said again, nothing computed
      ckpt.close()
      return previous
    # Steps and evaluations read the frozen CLIP image tower as held, in the compute dtype
    # (no per-step cast); the workdir's stored frozen weights and checkpoints stay float32.
    state = state.replace(frozen=frozen_in_compute_dtype(state.frozen, model_config.dtype))
    if jax.process_index() == 0:
      with open(os.path.join(workdir, 'config.json'), 'w') as f:
        f.write(config.to_json(indent=1))
    writer = metric_writers.create_default_writer(workdir,
                                                  just_logging=jax.process_index() > 0)
    for line in start_banner(config, workdir, mesh, state, data, steps_per_epoch, total, source,
                             optim):
      log(line)
    if start == 0:
      writer.write_hparams(hparams(config))
    # clu's progress report: steps/s and uptime to TensorBoard. Its first call (after the
    # first step, which compiles) is its time origin, so rates and ETA exclude compilation.
    report = periodic_actions.ReportProgress(num_train_steps=total, writer=writer,
                                             every_steps=config.log_every_steps, every_secs=None)

    size = model_config.image_size
    cache = replicated_text_cache(graphdef, state, data.train.dataset, mesh)
    train_step = init.build_train_step(config, size, graphdef, tx, shardings)
    predict_step = step_lib.make_predict_step(graphdef, size)   # one executable for both
    val, test = (None if split is None else Evaluator(
        predict_fn(predict_step, graphdef, split.dataset, mesh), split,
        EvalProtocol.from_config(config, name), mesh, image_size=size)
        for name, split in (('val', data.val), ('test', data.test)))

    if test is not None and config.test_at_start and start == 0:
      results['test_start'] = test.run(state, eval_progress(test, 'test (before training)'))
      results['test_pck_start'] = pck_at(results['test_start'])
      log(f'test PCK@0.2 before training (step 0): {100 * results["test_pck_start"]:.2f}')
      writer.write_scalars(0, {'test/pck': results['test_pck_start']})

    # Read and placed on the mesh two steps ahead, by a background thread (prefetch.py).
    batches = prefetch.DevicePrefetch(
        data.train.train_batches(config.batch_size, start_step=start),
        lambda batch: forward_lib.device_batch(batch, mesh), size=2)
    stop = checkpoint.StopSignal()
    history, t_log = [], time.perf_counter()
    step = start
    try:
      for step in range(start, total):
        if stop.should_stop(step):
          ckpt.wait()
          if step not in ckpt.all_steps():   # a periodic save may have just written it
            ckpt.save(step, state, {'step': step}, force=True)
            ckpt.wait()
          log(f'stopped by {stop.received or "SIGTERM"} at step {step}; checkpoint saved')
          results.update(step=step, preempted=True)
          return results
        ckpt.check()   # a failed background save stops the run now, not at the next save
        if step == start:
          log('compiling train step ...')
          t_compile = time.perf_counter()
        state, metrics = train_step(state, next(batches), cache)
        history.append((step, metrics))
        done = step + 1
        if step == start:   # steps/s and ETA count from here: compilation is not training
          jax.block_until_ready(metrics)
          t_log, timed = time.perf_counter(), 0
          log(f'compiled train step in {t_log - t_compile:.1f} s (with its first step)')
        else:
          timed += 1
        report(done)
        if done % config.log_every_steps == 0 or done == total:
          fetched = jax.device_get(history)
          step_lib.check_finite(fetched)
          now = time.perf_counter()
          timing = 'first step'
          if timed:
            rate = timed / (now - t_log)
            timing = f'{rate:.2f} steps/s ETA {format_duration((total - done) / rate)}'
          t_log, timed, history = now, 0, []
          means = {k: float(sum(m[k] for _, m in fetched) / len(fetched))
                   for k in fetched[0][1] if k != 'finite'}
          means['lr'] = float(lr_at(step))
          writer.write_scalars(done, {f'train/{k}': v for k, v in means.items()})
          log(f'step {done}/{total} loss {means["loss"]:.4f} acc_pose {means["acc_pose"]:.3f} '
              f'lr {means["lr"]:.2e} | {timing}')
        if val is not None and (done % eval_every == 0 or done == total):
          pred = val.predict(state, eval_progress(val, f'val at step {done}'))
          pck = pck_at(val.pairs.score(pred))
          results['val_pck'] = pck
          writer.write_scalars(done, {'val/pck': pck})
          if jax.process_index() == 0 and config.tensorboard_overlays:
            writer.write_images(done, {'val/overlays': overlay_grid(
                pred, val.pairs, val.data.dataset, config.tensorboard_overlays)})
          log(f'step {done}: val PCK@0.2 {100 * pck:.2f}')
          ckpt.save(done, state, {'step': done}, metrics={'pck': pck})
          t_log, timed = time.perf_counter(), 0   # steps/s counts training only
        elif done % ckpt_every == 0 or done == total:
          ckpt.save(done, state, {'step': done})
      step = total
      if test is not None and config.test_at_end:
        results = _test_at_end(test, state, total, results, writer, workdir, resumed=start > 0)
    finally:
      batches.close()
      ckpt.wait()
      ckpt.close()
      stop.uninstall()
      writer.flush()
    results['step'] = step
    if jax.process_index() == 0:   # scalars, and the full test scores (per category too)
      with open(os.path.join(workdir, 'results.json'), 'w') as f:
        json.dump(results, f, indent=1)
    return results

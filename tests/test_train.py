"""train.py's loop on a tiny model: configs, resume == uninterrupted, 2 devices == 1 device,
2 processes == 1 process (training and evaluation), the loop's own validation / best checkpoint /
test / SIGTERM branches. Subprocesses set device counts / distributed init before jax loads."""
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO, xla_flags

from configs import mp100, synthetic


# The CPU test size of every backbone architecture (models/backbones.py), Swin V2 first.
BACKBONES = ('tiny', 'resnet_tiny', 'hrnet_tiny', 'vit_tiny', 'dinov2_tiny')
BATCH_NORM = ('resnet_tiny', 'hrnet_tiny')


# Adam's eps of every test run (so their programs are shared), for the checks that compare
# layouts (2 devices, 2 processes). Another layout sums the gradients in another order, so each
# element differs by round-off. With the recipe's eps (1e-8) Adam divides that noise by its own
# size wherever the exact gradient is ~0 (attention key biases, whose gradient softmax's shift
# invariance makes 0), so such elements took random steps of ~lr: the key biases needed an
# exemption, and HRNet's check XLA's default compile settings (compiled cheaply, a stage-4
# transition kernel of values ~4e-3 ended 4e-6 apart). With eps = 1e-4 an element with
# |g| << 1e-4 moves by lr * g / eps (noise stays noise), the others as in the recipe:
# `mismatches` holds every leaf to the same bounds, under XLA's cheap and default settings
# alike, and rows put on the wrong device still fail it (tried by reversing shard_batch's rows).
LAYOUT_EPS = 1e-4


def tiny_config(steps=4, backbone='tiny'):
  """The synthetic config shrunk to seconds: 3/2/2 categories of 6 drawn 48-px images."""
  c = synthetic.get_config(f'steps={steps},batch=4,backbone={backbone}')
  c.data.synthetic.update(categories=(3, 2, 2), instances=6, image_size=48)
  c.data.val_episodes = c.data.test_episodes = 1
  c.data.num_queries = 2
  c.eval_batch_size = 4
  c.log_every_steps = 2
  c.eval_every_steps = c.checkpoint_every_steps = steps
  c.validate = c.test_at_start = c.test_at_end = False
  c.async_checkpoints = False
  # The synthetic run trains without noise; keep dropout and drop path on here so the exact
  # resume and layout tests cover the per-step RNG too.
  if 'drop_path_rate' in c.model.backbone:
    c.model.backbone.drop_path_rate = 0.1
  c.model.head.dropout = 0.1
  c.model.fusion = dict(dropout=0.1)
  c.optim.eps = LAYOUT_EPS
  return c


def test_configs_build_models():
  from capenext_jax.models.capenext import CapeNextConfig
  for arg in ('split=3,shots=5', 'backbone=swinv2_b', 'capex', 'runlocal'):
    m = CapeNextConfig.from_dict(mp100.get_config(arg).model.to_dict())
    assert m.head.img_in_channels == m.backbone.embed_dim * 8
    assert m.head.text_in_channels == m.clip.embed_dim and m.head.num_feats == m.head.d_model // 2
  for config in (mp100, synthetic):
    assert CapeNextConfig.from_dict(config.get_config('capex').model.to_dict()).fusion is None
    with pytest.raises(ValueError, match='capex has no fusion module'):
      config.get_config('capex,fusion=CrossAttentionLayer')
  # Derived widths follow an override of the parts they derive from.
  c = mp100.get_config('')
  c.model.backbone.embed_dim, c.model.clip.embed_dim, c.model.head.d_model = 48, 128, 64
  m = CapeNextConfig.from_dict(c.model.to_dict())
  assert (m.head.img_in_channels, m.head.text_in_channels, m.head.num_feats,
          m.fusion.embed_dim) == (384, 128, 32, 128)
  with pytest.raises(ValueError, match='split'):
    mp100.get_config('split=6')
  assert synthetic.get_config().data.synthetic.enabled
  # The paper's training options as config arguments (trained end to end on mp100_mini:
  # test_eval.py).
  c = synthetic.get_config('fusion=SimpleMultiModalDoubleEncoder,mask')
  assert c.model.fusion.module == 'SimpleMultiModalDoubleEncoder' and c.data.mask_outside_bbox


def image_size(config) -> int:
  """The model input side of a run config (as the programs parse it, once)."""
  from capenext_jax.models.capenext import CapeNextConfig
  return CapeNextConfig.from_dict(config.model.to_dict()).image_size


def train(config, workdir):
  """train.py's work without its flags: the loop over the config's data splits."""
  from capenext_jax.models.capenext import CapeNextConfig
  from capenext_jax.training.loop import train_and_evaluate
  from data_pipeline.splits import run_splits
  model_config = CapeNextConfig.from_dict(config.model.to_dict())
  return train_and_evaluate(config, workdir, run_splits(
      config, workdir, image_size=model_config.image_size), model_config=model_config)


def checkpoint_reader(config):
  """workdir -> ((trainable params, BatchNorm statistics, optimizer state), data position) of
  the latest checkpoint in `workdir` (host numpy); the restore target is built once."""
  import jax
  from capenext_jax.training import checkpoint, init, schedule
  from capenext_jax.device import partition, state as state_lib
  tx = schedule.make_optimizer(config.optim, 1)
  mesh = partition.make_mesh({'data': 1, 'fsdp': 1}, jax.devices()[:1])
  with jax.set_mesh(mesh):
    _, st, sh = init.init_state(config, tx, mesh)
  target = state_lib.abstract_state(st, sh).replace(frozen=st.frozen)

  def read(workdir):
    with jax.set_mesh(mesh):
      ckpt = checkpoint.Checkpointer(os.path.join(workdir, 'checkpoints'))
      restored, pos = ckpt.restore(target)
      ckpt.close()
    return jax.device_get((restored.trainable, restored.batch_stats, restored.opt_state)), pos
  return read


# Every backbone architecture: BatchNorm statistics (ResNet, HRNet) are checkpointed state too,
# and each has its own parameter shapes for the FSDP layout to split.
@pytest.mark.parametrize('backbone', BACKBONES)
def test_resume_and_two_devices_equal_one_run(tmp_path, backbone, monkeypatch, request):
  """Resumed from step 2 of 4, the params, statistics and optimizer state equal an
  uninterrupted run's; and 2 devices (FSDP, in a subprocess) give that run's step-2 state and
  logged metrics.

  The headline backbone is preempted (SIGTERM inside the real loop) right after its periodic
  checkpoint. The others resume from a copy of the uninterrupted run's workdir cut back to its
  step-2 checkpoint: the same saved state (the run is deterministic) and the same restore, for
  two trainings instead of three (each compiles the model's programs again). The step-2
  checkpoint is also the 1-device reference of the 2-device check (`two_device_main`)."""
  import shutil
  import signal
  from capenext_jax.training import checkpoint
  from capenext_jax.training.workdir import LOCK_FILE
  full, part = str(tmp_path / 'full'), str(tmp_path / 'part')
  c = tiny_config(4, backbone)
  c.data.root = str(tmp_path / 'data')
  c.checkpoint_every_steps = 2   # step 2 is saved just before the loop sees the signal
  two_devices = start_two_devices(c, backbone, tmp_path)
  request.addfinalizer(two_devices[0].kill)   # a no-op once it has ended
  read = checkpoint_reader(c)
  train(c, full)
  if backbone == BACKBONES[0]:
    save = checkpoint.Checkpointer.save

    def save_then_sigterm(self, step, *args, **kwargs):
      # The signal comes from the loop's own thread (batches are read ahead by another one).
      save(self, step, *args, **kwargs)
      if step == 2:
        os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(checkpoint.Checkpointer, 'save', save_then_sigterm)
    stopped = train(c, part)
    monkeypatch.setattr(checkpoint.Checkpointer, 'save', save)
    assert stopped['preempted'] and stopped['step'] == 2   # step 1 ran, then the loop stopped
  else:
    shutil.copytree(full, part, ignore=shutil.ignore_patterns(LOCK_FILE))
    shutil.rmtree(os.path.join(part, 'checkpoints', '4'))
    os.remove(os.path.join(part, 'results.json'))
  at_2, pos = read(part)
  assert pos == {'step': 2}
  check_two_devices(two_devices, at_2, logged_train_metrics(full, 2))
  assert train(c, part)['step'] == 4
  (a, pos_a), (b, pos_b) = read(full), read(part)
  assert pos_a == pos_b == {'step': 4}
  import jax
  assert jax.tree.leaves(a[1]) or backbone not in BATCH_NORM, 'no BatchNorm statistics'
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7), a, b)
  if backbone != 'tiny':
    return   # the data position below does not depend on the model
  # The next batch a resumed run reads is the uninterrupted run's batch at that step.
  from data_pipeline.pipeline import json_source, make_train_iterator
  from data_pipeline.splits import data_files, pipeline_config
  files = data_files(c, full)
  src = json_source(files['train'], files['image_root'])
  pc = pipeline_config(c, image_size=image_size(c), train=True)
  it = make_train_iterator(src, 4, pc, process_index=0, process_count=1)
  uninterrupted = [next(it) for _ in range(5)][4]
  resumed = next(make_train_iterator(src, 4, pc, start_step=4, process_index=0,
                                     process_count=1))
  for k in uninterrupted:
    np.testing.assert_array_equal(uninterrupted[k], resumed[k])


def test_resume_with_another_model_is_refused_but_another_compute_is_not(tmp_path):
  """The restart check (training/workdir.py, which the loop runs before building anything) on a
  workdir holding a checkpoint: another backbone, fusion module or model size is another run and
  is refused, naming the field; how the same model computes (dtype, remat, attention kernel,
  matmul precision) leaves the checkpoint's layout unchanged and resumes."""
  from capenext_jax.training import workdir
  wd = tmp_path / 'run'
  (wd / 'checkpoints' / '4').mkdir(parents=True)
  (wd / 'config.json').write_text(tiny_config().to_json(indent=1))

  compute = tiny_config()
  compute.model.dtype, compute.model.remat, compute.model.attention = 'bfloat16', 'blocks', 'xla'
  compute.precision = 'default'
  workdir.check_resume_config(compute, wd)

  def another(change):
    c = tiny_config()
    change(c)
    c.model.dtype = 'bfloat16'   # never named beside a refused field
    return c

  for change, named in (
      (lambda c: c.update(model=tiny_config(backbone='resnet_tiny').model),
       r"model.backbone.arch: 'swin_v2' -> 'resnet'"),
      (lambda c: c.model.backbone.update(embed_dim=64), r'model.backbone.embed_dim: 16 -> 64'),
      (lambda c: c.model.fusion.update(module='CrossAttentionLayer'),
       r"model.fusion.module: '<absent>' -> 'CrossAttentionLayer'"),
      (lambda c: setattr(c.model, 'fusion', None), r"model\.fusion[.:]"),   # capex
      (lambda c: c.model.head.update(d_model=64), r'model.head.d_model: 32 -> 64')):
    with pytest.raises(ValueError, match=r'another config \(' + named) as refused:
      workdir.check_resume_config(another(change), wd)
    assert 'model.dtype' not in str(refused.value)
  assert (wd / 'config.json').read_text() == tiny_config().to_json(indent=1)


class NonFiniteAt:
  """The run's training split, with the keypoints of global step `step`'s batch not finite."""

  def __init__(self, split, step):
    self.split, self.step = split, step

  def __getattr__(self, name):
    return getattr(self.split, name)

  def train_batches(self, global_batch_size, *, start_step=0):
    for step, batch in enumerate(self.split.train_batches(global_batch_size,
                                                          start_step=start_step), start_step):
      if step == self.step:
        batch = dict(batch, query_joints=np.full_like(batch['query_joints'], np.nan))
      yield batch


def test_non_finite_loss_is_named(tmp_path):
  """Step 1's loss is not finite (its batch is): the run stops at the check after step 2,
  naming step 1, not the first of the window. (A blown-up lr would do it too, but lr is a
  constant of the step: another program to compile, ~12 s; this one is the tiny run's.)"""
  from capenext_jax.training.loop import train_and_evaluate
  from data_pipeline.splits import run_splits
  c = tiny_config(2)
  c.data.root = str(tmp_path / 'data')
  splits = run_splits(c, str(tmp_path / 'run'), image_size=image_size(c))
  with pytest.raises(FloatingPointError, match=r'non-finite .*loss.* at step 1 '):
    train_and_evaluate(c, str(tmp_path / 'run'),
                       splits._replace(train=NonFiniteAt(splits.train, 1)))


# ----------------------------------------------------------------------------- loop branches
def test_loop_validates_keeps_best_and_tests(tmp_path, capsys):
  """Validation every 2 steps, the best-by-val-PCK checkpoint kept beside the latest, test
  PCK before and after training; the final test scores equal eval.py's on that checkpoint."""
  import re
  c = tiny_config(4)
  c.data.root = str(tmp_path / 'data')
  c.validate, c.eval_every_steps, c.keep_checkpoints = True, 2, 1
  c.test_at_start = c.test_at_end = True
  wd = tmp_path / 'run'
  results = train(c, str(wd))
  out = capsys.readouterr().out
  val = {int(s): float(v) for s, v in re.findall(r'step (\d+): val PCK@0.2 ([\d.]+)', out)}
  assert sorted(val) == [2, 4] and 'test PCK@0.2 before training (step 0)' in out
  assert 100 * results['val_pck'] == pytest.approx(val[4], abs=0.006)
  kept = {int(p.name) for p in (wd / 'checkpoints').iterdir() if p.name.isdigit()}
  best = {s for s, v in val.items() if v == max(val.values())}
  assert 4 in kept and kept - {4} <= best and kept & best, (kept, val)
  saved = json.loads((wd / 'results.json').read_text())
  assert saved['test_pck_start'] == results['test_pck_start']
  assert saved['test_end']['PCK@0.2'] == results['test_pck_end']
  report = tmp_path / 'eval.json'
  from conftest import run_eval_cli   # in-process: no second start-up of jax and TensorFlow
  status, line = run_eval_cli(f'--checkpoint={wd}', '--step=4', '--batch_size=4',
                              f'--output={report}')
  assert status == 0, line
  overall = json.loads(report.read_text())['overall']
  loop = {k: v for k, v in saved['test_end'].items() if k != 'per_category'}
  assert overall == pytest.approx(loop, rel=1e-5, abs=1e-6)
  # capenext-convert --best finds the best val checkpoint on disk and records its val PCK.
  from capenext_jax.convert import cli
  assert cli.main([str(wd), str(tmp_path / 'best'), '--best']) == 0
  prov = json.loads((tmp_path / 'best' / 'config.json').read_text())['provenance']
  assert prov['step'] in best and 100 * prov['val_pck'] == pytest.approx(val[prov['step']],
                                                                         abs=0.006)
  assert prov['split']['train'] == str(tmp_path / 'data' / 'annotations' / 'synthetic_train.json')
  assert prov['split']['synthetic']['categories'] == [3, 2, 2]
  assert ('test_pck' in prov) == (prov['step'] == 4)   # results.json's test PCK is step 4's
  # A rerun of the finished run says so and repeats its held-out line, computing nothing.
  capsys.readouterr()
  again = train(c, str(wd))
  out = capsys.readouterr().out
  assert 'is already complete (step 4 of 4)' in out, out
  assert (f'held-out test PCK@0.2: untrained {100 * results["test_pck_start"]:.2f} -> trained '
          f'{100 * results["test_pck_end"]:.2f}') in out, out
  assert again == saved and 'compiling' not in out


# ----------------------------------------------------------------------------- 2 devices
def layout_batches(c) -> list[dict]:
  """The run's first 2 batches, as the loop's train iterator reads them (tf.data)."""
  from data_pipeline.pipeline import json_source, make_train_iterator
  from data_pipeline.splits import data_files, pipeline_config
  files = data_files(c, c.data.root)
  it = make_train_iterator(json_source(files['train'], files['image_root']), c.batch_size,
                           pipeline_config(c, image_size=image_size(c), train=True),
                           process_index=0, process_count=1)
  return [next(it) for _ in range(2)]


def flat(tree) -> dict:
  """{path: host array} of a pytree."""
  import jax
  leaves = jax.tree_util.tree_flatten_with_path(jax.device_get(tree))[0]
  return {jax.tree_util.keystr(path): np.asarray(x) for path, x in leaves}


def fsdp_run(c, batches) -> dict:
  """`flat(((params, BatchNorm statistics), metrics))` after the loop's train step
  (training.init.build_train_step, with the loop's optimizer and text cache) ran `batches` on
  the mesh ('data', 'fsdp') = (1, 2); metrics are their means over the steps, as the loop logs
  them. The step gathers params and splits activations over the batch with no all-to-all.
  (Imports no TensorFlow: the batches come from `layout_batches`.)"""
  import jax
  from capenext_jax.device import partition
  from capenext_jax.device.forward import device_batch
  from capenext_jax.mp100 import episodes as ep
  from capenext_jax.text.cache import replicated_text_cache
  from capenext_jax.training import init, schedule
  from data_pipeline.pipeline import json_source
  from data_pipeline.splits import data_files
  files = data_files(c, c.data.root)
  dataset = json_source(files['train'], files['image_root']).dataset
  tx = schedule.make_optimizer(schedule.for_batch_size(c.optim, c.batch_size),
                               ep.epoch_length(dataset) // c.batch_size)
  mesh = partition.make_mesh({'data': 1, 'fsdp': 2})
  with jax.set_mesh(mesh):
    graphdef, st, sh = init.init_state(c, tx, mesh)
    cache = replicated_text_cache(graphdef, st, dataset, mesh)
    step = init.build_train_step(c, image_size(c), graphdef, tx, sh)
    assert any('fsdp' in tuple(s.spec) for s in jax.tree.leaves(sh.trainable))
    step = step.lower(st, device_batch(batches[0], mesh), cache).compile()
    hlo = step.as_text()
    assert ' all-gather(' in hlo and ' all-to-all(' not in hlo
    metrics = []
    for b in batches:
      st, m = step(st, device_batch(b, mesh), cache)
      metrics.append(jax.device_get(m))
    means = {k: float(sum(m[k] for m in metrics) / len(metrics))
             for k in metrics[0] if k != 'finite'}
    return flat(((st.trainable, st.batch_stats), means))


def two_device_main(data_root, backbone, batches_file, out):
  """Subprocess with 2 devices: `fsdp_run` of the batches saved in `batches_file`, saved to
  the npz `out`.

  (1, 2) shards the params and splits the batch over both devices, so it covers each
  backbone's parameter shapes and its batch statistics. The data-parallel layout (2, 1) of the
  same model and loop is test_two_processes_match_one_process's (a run's default mesh over 2
  processes), and of the step on 2 devices of one process test_training_step's."""
  import jax
  assert jax.device_count() == 2
  c = tiny_config(backbone=backbone)
  c.data.root = data_root
  c.sharding_rules = ()          # everything 'fsdp': the largest divisible dim is split,
  c.fsdp_min_bytes = 0           # however small
  with np.load(batches_file) as saved:
    batches = [{k.split('|', 1)[1]: saved[k] for k in saved.files if k.startswith(f'{i}|')}
               for i in range(2)]
  np.savez(out, **fsdp_run(c, batches))


def start_two_devices(c, backbone, tmp_path) -> tuple[subprocess.Popen, str]:
  """`two_device_main` started on the first 2 batches of `c` = `tiny_config(4, backbone)`,
  read here by the loop's tf.data pipeline (the subprocess imports no TensorFlow): (process,
  its npz). It gets the run's XLA settings (conftest._compile_cheaply) and 2 host devices, and
  runs while this process trains (its programs are its own)."""
  env = dict(os.environ, JAX_PLATFORMS='cpu',
             XLA_FLAGS=xla_flags('--xla_force_host_platform_device_count=2'))
  batches = tmp_path / 'batches.npz'
  np.savez(batches, **{f'{i}|{k}': v for i, b in enumerate(layout_batches(c))
                       for k, v in b.items()})
  out = tmp_path / 'two_devices.npz'
  with open(f'{out}.log', 'w') as log:   # a file: nobody reads a pipe while the run trains
    proc = subprocess.Popen([sys.executable, __file__, 'two_devices', c.data.root, backbone,
                             str(batches), str(out)], env=env, stdout=log,
                            stderr=subprocess.STDOUT, cwd=REPO)
  return proc, str(out)


def check_two_devices(started, state, logged_metrics) -> None:
  """The 2-device run's params and BatchNorm statistics after 2 steps equal the 1-device run's
  (`state`: its step-2 checkpoint, as `checkpoint_reader` reads it), and its metrics the means
  the loop logged. (Not Adam's moments: they hold the gradients' layout round-off undamped,
  ~1e-5 of their scale, and pure noise where the exact gradient is 0; LAYOUT_EPS.)"""
  proc, out = started
  assert proc.wait(timeout=600) == 0, pathlib.Path(f'{out}.log').read_text()[-4000:]
  with np.load(out) as saved:
    two = {k: saved[k] for k in saved.files}
  params, batch_stats, _ = state
  one = flat(((params, batch_stats), {k: v for k, v in logged_metrics.items() if k != 'lr'}))
  assert two.keys() == one.keys()
  bad = mismatches(one, two)
  assert not bad, '; '.join(bad)


def logged_train_metrics(workdir, step) -> dict:
  """{name: value} of the `train/...` scalars the loop wrote to TensorBoard at `step`."""
  import glob
  import tensorflow as tf
  out = {}
  for path in glob.glob(os.path.join(workdir, 'events.out.tfevents.*')):
    for event in tf.compat.v1.train.summary_iterator(path):
      if event.step == step:
        for v in event.summary.value:
          if v.tag.startswith('train/'):
            out[v.tag[len('train/'):]] = float(tf.make_ndarray(v.tensor))
  assert out, f'no train/ scalars at step {step} in {workdir}'
  return out


def mismatches(want, got, rtol=2e-5, atol=2e-6) -> list[str]:
  """'path: max |diff|' of every leaf of `got` that is not allclose to `want`: float32
  round-off of the reduction order (the layout), for runs with Adam's eps = LAYOUT_EPS."""
  import jax
  out = []

  def check(path, a, b):
    if not np.allclose(a, b, rtol=rtol, atol=atol):
      out.append(f'{jax.tree_util.keystr(path, simple=True, separator="/")}: '
                 f'{np.max(np.abs(a - b)):.3g} (max |value| {np.max(np.abs(a)):.3g})')

  jax.tree_util.tree_map_with_path(check, want, got)
  return out


# ----------------------------------------------------------------------------- 2 processes
def train_cmd(workdir, data_root, *extra):
  return [sys.executable, str(REPO / 'train.py'), f'--workdir={workdir}',
          f'--config={REPO}/tests/test_train.py:tiny', f'--config.data.root={data_root}', *extra]


def get_config(arg=None):
  """Lets train.py load `tiny_config` via --config=tests/test_train.py:tiny."""
  del arg
  return tiny_config()


def test_two_processes_match_one_process(tmp_path):
  import socket
  with socket.socket() as s:
    s.bind(('localhost', 0))
    port = s.getsockname()[1]
  env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=f'{REPO}:{REPO}/tests')
  data = tmp_path / 'data'
  # Test-split evaluation at the end too: 2 categories x 1 episode x 3 queries = 6 pairs in
  # global batches of 4, so the second batch is padded and each process holds 2 rows of each.
  c = tiny_config()
  c.data.root, c.test_at_end, c.data.num_queries = str(data), True, 3
  train(c, str(tmp_path / 'one'))   # one process: this one (its programs are the suite's)
  evaluate = ('--config.test_at_end=True', '--config.data.num_queries=3')
  procs = [subprocess.Popen(train_cmd(tmp_path / 'two', data, *evaluate, '--num_processes=2',
                                      f'--process_id={i}', f'--coordinator_address=localhost:{port}'),
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=REPO) for i in range(2)]
  outs = [p.communicate(timeout=300) for p in procs]
  for p, (_, err) in zip(procs, outs):
    assert p.returncode == 0, err[-4000:]
  read = checkpoint_reader(c)
  (a, _), (b, _) = read(str(tmp_path / 'one')), read(str(tmp_path / 'two'))
  bad = mismatches(a, b)
  assert not bad, '; '.join(bad)
  # The per-process eval batches, the cross-host gather and the stitching give the scores of
  # one process (params agree to ~1e-6, far inside any PCK threshold margin here).
  one, two = (json.loads((tmp_path / wd / 'results.json').read_text())['test_end']
              for wd in ('one', 'two'))
  assert one['num_pairs'] == two['num_pairs'] == 6
  assert one['per_category'].keys() == two['per_category'].keys()
  for want, got in [(one, two)] + [(one['per_category'][k], two['per_category'][k])
                                   for k in one['per_category']]:
    assert {k: v for k, v in got.items() if k != 'per_category'} == pytest.approx(
        {k: v for k, v in want.items() if k != 'per_category'}, rel=1e-4, abs=1e-4)


# ----------------------------------------------------------------------------- kill -9
KILL_RUN = ('--config.total_steps=12', '--config.checkpoint_every_steps=2',
            '--config.eval_every_steps=12', '--config.async_checkpoints=True')


def test_kill_9_then_resume_equals_uninterrupted(tmp_path):
  """SIGKILL train.py mid-run (async saves in flight), restart: the params at the end equal an
  uninterrupted run's. A half-written (uncommitted) checkpoint from the crash is ignored."""
  import signal
  import time
  env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=f'{REPO}:{REPO}/tests')
  data, wd = tmp_path / 'data', tmp_path / 'killed'
  proc = subprocess.Popen(train_cmd(wd, data, *KILL_RUN), env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.DEVNULL, text=True, cwd=REPO)
  deadline = time.monotonic() + 300
  for line in proc.stdout:      # progress lines every 2 steps; kill after step 8
    if line.startswith('step 8/12') or time.monotonic() > deadline:
      proc.send_signal(signal.SIGKILL)
      break
  proc.wait(timeout=60)
  assert proc.returncode == -signal.SIGKILL, 'train.py finished before it could be killed'
  assert not (wd / 'results.json').exists()
  # What a crash during an async save leaves behind: orbax's temporary step directory.
  half = wd / 'checkpoints' / '10.orbax-checkpoint-tmp-1'
  half.mkdir(parents=True, exist_ok=True)
  (half / 'garbage').write_text('half written')
  resumed = subprocess.run(train_cmd(wd, data, *KILL_RUN), env=env, capture_output=True,
                           text=True, timeout=300, cwd=REPO)
  assert resumed.returncode == 0, resumed.stderr[-4000:]
  start = int(resumed.stdout.split('resumed from step ')[1].split()[0])
  assert 2 <= start <= 10 and start % 2 == 0, resumed.stdout
  c = tiny_config(12)
  c.data.root = str(data)
  c.checkpoint_every_steps = 12
  train(c, str(tmp_path / 'whole'))
  read = checkpoint_reader(c)
  (a, pos_a), (b, pos_b) = read(str(tmp_path / 'whole')), read(str(wd))
  assert pos_a == pos_b == {'step': 12}
  bad = mismatches(a, b)
  assert not bad, '; '.join(bad)


if __name__ == '__main__':
  sys.path[:0] = [str(REPO), str(REPO / 'tests')]
  if sys.argv[1] == 'two_devices':
    two_device_main(*sys.argv[2:6])

"""Bad inputs and faults, each through the code a user runs: nothing is lost, nothing silent.

Every case asserts the exit status, that the one error line names the file / field / flag, and
that nothing was written or lost. The CLIs run in-process (eval.py / train.py through their
absl entry points, capenext-predict through `main`) except where flag definition itself is
under test (config overrides are applied while train.py is imported).
"""
import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from PIL import Image

from conftest import FIXTURES, MP100_MINI, REPO, last_line, run_eval_cli, xla_flags

MINI_TEST = MP100_MINI / 'annotations' / 'mini_test.json'
ENV = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=f'{REPO}:{REPO}/tests')


def run_script(*args, timeout=120):
  """A program in a subprocess: (status, stdout, stderr)."""
  proc = subprocess.run([sys.executable, *map(str, args)], env=ENV, cwd=REPO, timeout=timeout,
                        capture_output=True, text=True)
  return proc.returncode, proc.stdout, proc.stderr


# ----------------------------------------------------------------------------- checkpoints
def tiny_state(value: float):
  from capenext_jax.device.state import TrainState
  return TrainState(trainable={'w': jax.numpy.full((4, 3), value)}, batch_stats={}, frozen={},
                    opt_state={'mu': jax.numpy.full((4, 3), value / 2)},
                    step=jax.numpy.int32(int(value)), rng=jax.numpy.zeros(2, jax.numpy.uint32))


def failing_writes(monkeypatch, after: int):
  """Array writes of every save after the first `after` ones fail in the background (as a
  full disk does: the save call returns, the commit thread fails later)."""
  from orbax.checkpoint._src.serialization import type_handlers
  original, calls = type_handlers.ArrayHandler.serialize, []

  class FullDisk:
    def result(self, timeout=None):
      raise OSError(28, 'No space left on device\n' + 'TensorStore context dump\n' * 500)

  async def serialize(self, *args, **kwargs):
    calls.append(1)
    futures = await original(self, *args, **kwargs)
    return list(futures) + [FullDisk()] if len(calls) > after else futures

  monkeypatch.setattr(type_handlers.ArrayHandler, 'serialize', serialize)


def test_failed_save_is_one_error_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch,
                                                                    capfd):
  from capenext_jax.training.checkpoint import Checkpointer, CheckpointError
  failing_writes(monkeypatch, after=1)
  ckpt = Checkpointer(str(tmp_path / 'checkpoints'), async_save=True)
  ckpt.save(1, tiny_state(1.0), {'step': 1})
  ckpt.wait()
  ckpt.save(2, tiny_state(2.0), {'step': 2})   # returns; the commit fails in the background
  with pytest.raises(CheckpointError) as err:
    for _ in range(200):                       # what the loop does between steps
      ckpt.check()
      time.sleep(0.05)
  ckpt.close()                                 # not a second report
  message = str(err.value)
  assert 'No space left on device' in message and str(tmp_path / 'checkpoints') in message
  assert 'latest complete checkpoint is step 1' in message and '\n' not in message
  assert len(capfd.readouterr().err.splitlines()) < 10     # no page of TensorStore dump
  monkeypatch.undo()
  reader = Checkpointer(str(tmp_path / 'checkpoints'))
  state, position = reader.restore_latest(tiny_state(0.0))
  reader.close()
  assert position == {'step': 1}
  np.testing.assert_array_equal(state.trainable['w'], np.full((4, 3), 1.0))


@pytest.mark.parametrize('damage', ['data', '_METADATA'])
def test_damaged_latest_checkpoint_falls_back_and_is_kept(tmp_path, capsys, damage):
  from capenext_jax.training.checkpoint import Checkpointer
  ckpt = Checkpointer(str(tmp_path / 'checkpoints'), async_save=False)
  for step in (1, 2):
    ckpt.save(step, tiny_state(float(step)), {'step': step})
  ckpt.close()
  files = [p for p in (tmp_path / 'checkpoints' / '2' / 'state').rglob('*') if p.is_file() and (
      p.name == '_METADATA' if damage == '_METADATA' else p.parent.name == 'd')]
  assert files, sorted((tmp_path / 'checkpoints' / '2').rglob('*'))
  for p in files:   # truncate the latest checkpoint's array data, or its metadata
    p.write_bytes(p.read_bytes()[:len(p.read_bytes()) // 3])
  reader = Checkpointer(str(tmp_path / 'checkpoints'))
  state, position = reader.restore_latest(tiny_state(0.0))
  steps = reader.all_steps()
  reader.close()
  assert position == {'step': 1} and steps == [1]
  np.testing.assert_array_equal(state.trainable['w'], np.full((4, 3), 1.0))
  warning = capsys.readouterr().err
  assert 'checkpoint step 2' in warning and 'does not restore' in warning
  moved = list((tmp_path / 'checkpoints.corrupt').iterdir())   # set aside, not deleted
  assert len(moved) == 1 and moved[0].name.startswith('2-') and any(moved[0].rglob('*'))


def test_training_stops_at_once_when_a_save_fails(tmp_path, monkeypatch, capsys):
  """The loop polls the checkpointer every step: a save that fails in the background ends
  the run at the next step, not at the next save, with the workdir unlocked and resumable."""
  import time
  from capenext_jax.training import checkpoint
  from capenext_jax.training.workdir import WorkdirLock
  from test_train import tiny_config, train
  c = tiny_config(8)
  c.data.root = str(tmp_path / 'data')
  c.checkpoint_every_steps = c.eval_every_steps = 2
  c.async_checkpoints = True
  # The run's first save is its frozen weights (<workdir>/frozen); then step 2 is saved, and
  # step 4's commit fails. Each save returns once its background commit has ended, so the
  # failure is there to be seen before step 5 trains (without the wait, when it is seen depends
  # on the commit thread's timing).
  failing_writes(monkeypatch, after=2)
  save = checkpoint.Checkpointer.save

  def save_then_settle(self, *args, **kwargs):
    saved = save(self, *args, **kwargs)
    deadline = time.monotonic() + 120
    while self.manager.is_saving_in_progress() and time.monotonic() < deadline:
      time.sleep(0.01)
    return saved

  monkeypatch.setattr(checkpoint.Checkpointer, 'save', save_then_settle)
  capsys.readouterr()
  with pytest.raises(checkpoint.CheckpointError, match=r'latest complete checkpoint is step 2'):
    train(c, str(tmp_path / 'run'))
  out = capsys.readouterr().out
  # Progress is logged every 2 steps: step 4 was the last one trained (a loop that learnt of
  # the failure only at its next save would have trained and logged step 6 first).
  assert 'step 4/8' in out and 'step 6/8' not in out, out
  kept = sorted(p.name for p in (tmp_path / 'run' / 'checkpoints').iterdir())
  assert '2' in kept and '6' not in kept and '8' not in kept, kept
  with WorkdirLock(tmp_path / 'run'):       # released by the failed run
    pass


# ----------------------------------------------------------------------------- workdirs
def test_second_training_on_a_held_workdir_stops_at_once(tmp_path):
  """Nothing is written into the held workdir, not even the synthetic data that the run would
  draw into it (data.root '' is <workdir>/data); the lock held here, in-process, nests."""
  from capenext_jax.training.workdir import LOCK_FILE, WorkdirLock
  wd = tmp_path / 'run'
  config = tmp_path / 'tiny.py'
  config.write_text('from test_train import tiny_config\n\n'
                    'def get_config():\n  return tiny_config(2)\n')
  with WorkdirLock(wd), WorkdirLock(wd):   # nests in one process (train.py, then its loop)
    pass
  (wd / LOCK_FILE).unlink()
  wd.rmdir()
  with WorkdirLock(wd):
    status, out, err = run_script('train.py', f'--config={config}', f'--workdir={wd}')
  assert status == 2, err[-3000:]
  assert last_line(err).startswith(f'train.py: error: {wd}: the workdir is in use by another '
                                   f'training (pid {os.getpid()}')
  assert 'Traceback' not in err and sorted(p.name for p in wd.iterdir()) == [LOCK_FILE]


def test_lock_of_a_killed_training_is_not_stale(tmp_path):
  from capenext_jax.training.workdir import WorkdirLock
  holder = subprocess.Popen(
      [sys.executable, '-c', 'import sys, time\nfrom capenext_jax.training.workdir import '
       'WorkdirLock\nwith WorkdirLock(sys.argv[1]):\n  print("locked", flush=True)\n'
       '  time.sleep(600)\n', str(tmp_path)], env=ENV, stdout=subprocess.PIPE, text=True)
  assert holder.stdout.readline().strip() == 'locked'
  with pytest.raises(ValueError, match=f'pid {holder.pid} on'):
    WorkdirLock(tmp_path).__enter__()
  holder.send_signal(signal.SIGKILL)
  holder.wait(timeout=30)
  with WorkdirLock(tmp_path):
    pass


def test_restart_with_another_config_is_refused_unless_asked(tmp_path):
  from capenext_jax.training import workdir
  from test_train import tiny_config, train
  wd = tmp_path / 'run'
  (wd / 'checkpoints' / '2').mkdir(parents=True)
  saved = tiny_config(2)
  (wd / 'config.json').write_text(saved.to_json(indent=1))
  longer = tiny_config(2)
  longer.total_steps, longer.log_every_steps, longer.mesh_shape.data = 10, 5, 1
  workdir.check_resume_config(longer, wd)            # run length / logging / layout: fine
  changed = tiny_config(2)
  changed.optim.lr, changed.seed = 3e-4, 7
  with pytest.raises(ValueError, match=r'config.json: this workdir holds a run with another '
                     r'config \(optim.lr: 0.002 -> 0.0003; seed: 1 -> 7\)'):
    train(changed, str(wd))
  assert json.loads((wd / 'config.json').read_text()) == json.loads(saved.to_json())
  changed.allow_config_change = True
  workdir.check_resume_config(changed, wd)
  kept = [p.name for p in wd.iterdir() if p.name.startswith('config.') and p.name != 'config.json']
  assert len(kept) == 1 and json.loads((wd / kept[0]).read_text()) == json.loads(saved.to_json())


# ----------------------------------------------------------------------------- EXIF
# The EXIF specification's eight orientations, as numpy on the stored pixels (an independent
# statement of what cv2's IMREAD_COLOR shows).
UPRIGHT = {1: lambda a: a, 2: lambda a: a[:, ::-1], 3: lambda a: a[::-1, ::-1],
           4: lambda a: a[::-1], 5: lambda a: a.transpose(1, 0, 2),
           6: lambda a: np.rot90(a, -1), 7: lambda a: np.rot90(a, 1)[:, ::-1],
           8: lambda a: np.rot90(a, 1)}


def exif_jpegs(tmp_path):
  """A 24-wide, 40-high JPEG per orientation (same pixels, tag 1..8) and the stored pixels."""
  rng = np.random.default_rng(0)
  stored = np.repeat(np.repeat(rng.integers(0, 256, (5, 3, 3), np.uint8), 8, 0), 8, 1)
  paths = {}
  for o in UPRIGHT:
    exif = Image.Exif()
    exif[0x0112] = o
    paths[o] = tmp_path / f'orientation_{o}.jpg'
    Image.fromarray(stored).save(paths[o], quality=95, exif=exif.tobytes())
  return paths


def test_exif_orientation_is_applied_in_every_decoder(tmp_path):
  """load_rgb (predict, overlays, image checks, the TFDS builder) and the tf.data decoder
  both show all eight orientations upright, as cv2 does."""
  import tensorflow as tf

  from capenext_jax.mp100.images import exif_orientation, load_rgb
  from data_pipeline.pipeline import decode, decode_upright
  paths = exif_jpegs(tmp_path)
  raw = decode(tf.io.read_file(str(paths[1]))).numpy()    # the stored pixels, as TF decodes
  for o, path in paths.items():
    assert exif_orientation(path.read_bytes()) == o
    want = UPRIGHT[o](raw)
    got_tf = decode_upright(tf.io.read_file(str(path))).numpy()
    np.testing.assert_array_equal(got_tf, want, err_msg=f'tf.data, orientation {o}')
    got_pil = load_rgb(path)
    assert got_pil.shape == want.shape, o
    # PIL and TF both run libjpeg's accurate integer IDCT; allow the odd rounding step.
    assert np.abs(got_pil.astype(int) - want).max() <= 1, o
  assert load_rgb(paths[6], (40, 24)).shape == (24, 40, 3)   # stored 24 wide, 40 high
  with pytest.raises(ValueError, match=r'orientation_6.jpg: image is 40x24 upright but the '
                     r'json says width x height 24x40 \(its EXIF orientation tag turns it'):
    load_rgb(paths[6], (24, 40))


# ----------------------------------------------------------------------------- eval.py
@pytest.fixture(scope='module')
def exports(tmp_path_factory):
  """The tiny fixture exported: intact (safetensors, msgpack), with an edited config.json,
  with NaN weights, and a few broken weight files."""
  from capenext_jax import export, loading
  root = tmp_path_factory.mktemp('exports')
  model = loading.load_model(FIXTURES / 'tiny_capenext.npz')
  params, config = export.model_params(model), model.config
  for name in ('edited', 'edited_msgpack'):
    fmt = 'msgpack' if name.endswith('msgpack') else 'safetensors'
    export.export_params(params, config, root / name, formats=(fmt,))
    header = json.loads((root / name / 'config.json').read_text())
    header['config']['head']['nhead'] = 2      # still fits every array: 4 -> 2 heads
    (root / name / 'config.json').write_text(json.dumps(header))
  broken = export.params_lib.flatten(params)
  broken['head/decoder_layers/0/ffn2/kernel'] = np.full_like(
      broken['head/decoder_layers/0/ffn2/kernel'], np.nan)
  export.export_params(export.params_lib.unflatten(broken), config, root / 'nan')
  export.export_params(params, config, root / 'orbax_broken', formats=('orbax',))
  for p in (root / 'orbax_broken' / 'params.orbax').rglob('*'):
    if p.is_file() and p.parent.name == 'd':
      p.write_bytes(p.read_bytes()[:10])
  (root / 'notes.pth').write_text('these are my notes, not weights\n')
  np.savez(root / 'objects.npz', w=np.array([{'a': 1}], dtype=object))
  (root / 'garbage').mkdir()
  (root / 'garbage' / 'config.json').write_text(json.dumps(header))
  (root / 'garbage' / 'params.safetensors').write_bytes(b'\x10\x00\x00\x00\x00\x00\x00\x00{"a"')
  return root


EVAL_BASE = ('--annotations', MINI_TEST, '--image_root', MP100_MINI / 'images', '--shots=1',
             '--num_episodes=1', '--num_queries=1', '--batch_size=4')


@pytest.mark.parametrize('argv, status, names', [
    (('--shots=0',), 2, '--shots=0'),
    (('--num_episodes=-3',), 2, '--num_episodes=-3'),
    (('--num_queries=0',), 2, '--num_queries=0'),
    (('--batch_size=0',), 2, '--batch_size=0'),
    (('--visualize=-1',), 2, '--visualize=-1'),
    (('--step=-2',), 2, '--step=-2'),
    (('--checkpoint={root}/missing.pth',), 2, 'missing.pth: no such checkpoint'),
    (('--checkpoint={root}/notes.pth',), 2, 'notes.pth: not a PyTorch checkpoint'),
    (('--checkpoint={root}/objects.npz',), 2, 'objects.npz: refused: holds object arrays'),
    (('--checkpoint={root}/garbage',), 2, 'params.safetensors: not a readable safetensors file'),
    (('--checkpoint={root}/orbax_broken',), 2, 'params.orbax: cannot read the orbax params'),
    (('--checkpoint={root}/edited',), 2, 'edited/config.json: its model config differs from the '
     'one inside params.safetensors'),
    (('--checkpoint={root}/edited_msgpack',), 2, 'edited_msgpack/config.json: the model config '
     'was edited after export'),
    (('--checkpoint={root}/nan',), 2, 'params/head/decoder_layers/0/ffn2/kernel: 1536 of 1536 values '
     'are NaN or inf'),
    (('--checkpoint={root}/nan', '--output={root}/notes.pth/eval/report.json'), 2,
     '--output={root}/notes.pth/eval/report.json: {root}/notes.pth is a file, not a folder'),
    (('--annotations={root}/missing.json', '--export_episodes={root}/e.npz'), 2,
     'missing.json: annotation file not found'),
    (('--score_predictions={root}/notes.pth',), 2, 'notes.pth'),
    ((), 2, '--checkpoint is required'),
])
def test_eval_cli_bad_inputs(exports, argv, status, names):
  argv = [a.format(root=exports) if isinstance(a, str) else a for a in argv]
  got, line = run_eval_cli(*EVAL_BASE, *argv)
  assert got == status and line.startswith('eval.py: error: ') and names.format(
      root=exports) in line, (got, line)


def test_eval_cli_verbose_keeps_the_traceback(exports):
  with pytest.raises(ValueError, match='no such checkpoint'):
    run_eval_cli(*EVAL_BASE, f'--checkpoint={exports}/missing.pth', '--verbosity=1')


# ----------------------------------------------------------------------------- capenext-predict
def coco_json(tmp_path, edit) -> str:
  """mini_test.json changed by `edit(data)`, written beside the test."""
  data = json.loads(MINI_TEST.read_text())
  edit(data)
  path = tmp_path / 'coco.json'
  path.write_text(json.dumps(data))
  return str(path)


def _orphan_image(d):
  d['annotations'][0]['image_id'] = 424242


def _k101(d):
  c = d['categories'][0]
  c['keypoints'] = [f'p{i}' for i in range(101)]
  for a in d['annotations']:
    if a['category_id'] == c['id']:
      a['keypoints'] = [1, 1, 2] * 101


def _k0(d):
  c = d['categories'][0]
  c['keypoints'] = []
  for a in d['annotations']:
    if a['category_id'] == c['id']:
      a['keypoints'] = []


def _no_categories(d):
  del d['categories']


PREDICT_IMAGE = sorted((MP100_MINI / 'images' / 'tiger_body').glob('*.jpg'))[0]


@pytest.mark.parametrize('case, argv, names', [
    ('nan box', ['{image}', '--bbox', 'nan,0,100,100'], "--bbox 'nan,0,100,100'"),
    ('text box', ['{image}', '--bbox', '1,2,three,4'], "--bbox '1,2,three,4'"),
    ('missing image', ['{tmp}/nope.jpg'], 'nope.jpg: no such image file'),
    ('corrupt image', ['{tmp}/broken.jpg'], 'broken.jpg: cannot read image'),
    ('output folder', ['{image}', '--output', '{tmp}/broken.jpg/out.json'],
     '--output={tmp}/broken.jpg/out.json: {tmp}/broken.jpg is a file, not a folder'),
    ('nan weights', ['{image}', '--checkpoint', '{exports}/nan'], 'are NaN or inf'),
    ('orphan image id', ['--coco', _orphan_image], 'field "image_id"=424242 is not an image'),
    ('101 keypoints', ['--coco', _k101], '101 keypoints, more than max_kpt_num=100'),
    ('0 keypoints', ['--coco', _k0], 'its annotations have 0 keypoints'),
    ('no categories', ['--coco', _no_categories], 'missing field "categories"'),
    ('batch size', ['--coco', lambda d: None, '--batch_size', '0'], '--batch_size'),
])
def test_predict_cli_bad_inputs(tmp_path, exports, capsys, case, argv, names):
  from capenext_jax import predict
  (tmp_path / 'broken.jpg').write_bytes(b'\xff\xd8\xff\xe0 truncated')
  fill = dict(image=PREDICT_IMAGE, tmp=tmp_path, exports=exports)
  args = [coco_json(tmp_path, a) if callable(a) else a.format(**fill) for a in argv]
  if '--coco' in args:
    args += ['--image_root', str(MP100_MINI / 'images')]
  else:
    args += ['--category', 'tiger', '--keypoints', 'nose,tail']
  if '--checkpoint' not in args:
    args += ['--checkpoint', str(FIXTURES / 'tiny_capenext.npz')]
  args += ['--output', str(tmp_path / 'out.json')] if '--output' not in args else []
  with pytest.raises(SystemExit) if case == 'batch size' else contextlib_null():
    status = predict.main(args)
  err = capsys.readouterr().err
  if case == 'batch size':
    assert '--batch_size: 0: must be a positive integer' in err
    return
  assert status == 2 and last_line(err).startswith('capenext-predict: error: '), err
  assert names.format(**fill) in last_line(err), err
  assert not (tmp_path / 'out.json').exists()


def contextlib_null():
  import contextlib
  return contextlib.nullcontext()


# ----------------------------------------------------------------------------- train.py
def test_train_cli_names_a_misspelt_config_field():
  status, _, err = run_script('train.py', '--workdir=/nonexistent/run', '--config.optim.lrr=1')
  assert status == 2 and last_line(err) == (
      "train.py: error: --config.optim.lrr: config.optim has no field 'lrr' (did you mean lr?)")
  status, _, err = run_script('train.py', '--workdir=/nonexistent/run', '--config.nonexistent_knob=1')
  assert status == 2 and "config has no field 'nonexistent_knob'" in last_line(err), err[-2000:]
  assert 'Traceback' not in err and not os.path.exists('/nonexistent')


def test_train_cli_checks_batch_size_against_the_mesh_before_compiling(tmp_path):
  env_devices = dict(ENV, XLA_FLAGS=xla_flags('--xla_force_host_platform_device_count=2'))
  proc = subprocess.run([sys.executable, 'train.py', f'--workdir={tmp_path / "run"}',
                         '--config.batch_size=3'], env=env_devices, cwd=REPO, timeout=120,
                        capture_output=True, text=True)
  assert proc.returncode == 2 and last_line(proc.stderr) == (
      "train.py: error: batch_size=3 does not split over the 2 devices of the mesh "
      "{'data': 2, 'fsdp': 1} (1 process(es)): use a multiple of 2"), proc.stderr[-2000:]


def test_headline_recipe_refuses_random_pretrained_parts(tmp_path):
  from configs import mp100
  from test_train import train
  c = mp100.get_config('runlocal')
  c.init.from_scratch = False
  c.init.clip_path = 'clip.safetensors'
  c.data.update(root=str(MP100_MINI), image_root=str(MP100_MINI / 'images'),
                train_ann=str(MP100_MINI / 'annotations' / 'mini_train.json'),
                val_ann=str(MINI_TEST), test_ann=str(MINI_TEST))
  with pytest.raises(ValueError, match=r'config.init.backbone_path empty: the recipe starts from '
                     r'the ImageNet backbone .* --config.init.from_scratch=True'):
    train(c, str(tmp_path / 'run'))
  assert not (tmp_path / 'run' / 'checkpoints').exists()
  assert mp100.get_config('runlocal').init.from_scratch
  assert not mp100.get_config('split=2').init.from_scratch


# ----------------------------------------------------------------------------- outputs vs inputs
def _digests(paths) -> dict:
  import hashlib
  return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in paths}


@pytest.mark.parametrize('argv, names', [
    (['{photo}', '--overlay', '{photo}'], '--overlay={photo}: is the input IMAGE={photo}'),
    (['{photo}', '--output', '{photo}'], '--output={photo}: is the input IMAGE={photo}'),
    (['{photo}', '--output', '{tmp}/x.json', '--overlay', '{tmp}/x.json'],
     '--overlay={tmp}/x.json: --output is the same file'),
    (['{photo}', '--output', '{tmp}/link.jpg'], '--output={tmp}/link.jpg: is the input IMAGE'),
    (['{photo}', '--output', '{tmp}/kp.txt', '--keypoints_file', '{tmp}/kp.txt'],
     '--output={tmp}/kp.txt: is the input --keypoints_file={tmp}/kp.txt'),
    (['--coco', '{tmp}/ann.json', '--output', '{tmp}/ann.json'],
     '--output={tmp}/ann.json: is the input --coco={tmp}/ann.json'),
    (['--coco', '{tmp}/ann.json', '--overlay_dir', '{images}', '--output', '{tmp}/p.json'],
     'an overlay in --overlay_dir={images}/'),
])
def test_predict_never_writes_over_its_inputs(tmp_path, capsys, argv, names):
  """Refused before the model loads: one line naming both flags and the path, every input
  byte-identical afterwards (a hard link to the photo counts as the photo)."""
  from capenext_jax import predict
  photo = tmp_path / 'photo.jpg'
  photo.write_bytes(PREDICT_IMAGE.read_bytes())
  os.link(photo, tmp_path / 'link.jpg')
  (tmp_path / 'kp.txt').write_text('nose\ntail\n')
  # The annotations' images, in a folder of their own whose one image is named like an
  # annotation's overlay (`<id>.png`).
  images = tmp_path / 'images'
  data = json.loads(MINI_TEST.read_text())
  data['annotations'] = data['annotations'][:1]
  image = next(im for im in data['images'] if im['id'] == data['annotations'][0]['image_id'])
  images.mkdir()
  png = images / f'{data["annotations"][0]["id"]}.png'
  Image.open(MP100_MINI / 'images' / image['file_name']).save(png)
  image['file_name'] = png.name
  (tmp_path / 'ann.json').write_text(json.dumps(data))
  fill = dict(photo=photo, tmp=tmp_path, images=images)
  args = [a.format(**fill) for a in argv] + ['--checkpoint', str(FIXTURES / 'tiny_capenext.npz')]
  args += [] if '--output' in args else ['--output', str(tmp_path / 'out.json')]
  if '--coco' in args:
    args += ['--image_root', str(images)]
  else:
    args += ['--category', 'tiger']
    args += [] if '--keypoints_file' in args else ['--keypoints', 'nose,tail']
  before = _digests(p for p in tmp_path.rglob('*') if p.is_file())
  assert predict.main(args) == 2
  line = last_line(capsys.readouterr().err)
  assert line.startswith('capenext-predict: error: ') and names.format(**fill) in line, line
  assert _digests(p for p in tmp_path.rglob('*') if p.is_file()) == before


@pytest.mark.parametrize('argv, names', [
    (['--keypoints', 'nose,,tail'], "--keypoints 'nose,,tail': name 1 (0-based) is empty"),
    (['--keypoints', 'nose,tail', '--skeleton', '[[0.6, 1.9]]'],
     '--skeleton: edge 0 (0-based) is [0.6, 1.9]: expected two 0-based keypoint indices'),
    (['--keypoints', 'a,b,c', '--skeleton', '0-1,1-2.0'], '--skeleton: edge 1 (0-based) is '
     '["1", "2.0"]'),
    (['--keypoints_file', '{tmp}/object.json'], '--keypoints_file {tmp}/object.json: a JSON '
     'list of keypoint names is needed, not a JSON object'),
    (['--keypoints_file', '{tmp}/mixed.json'], '--keypoints_file {tmp}/mixed.json: item 1 '
     '(0-based) is null, not a keypoint name'),
    (['--keypoints_file', '{tmp}/number.json'], '--keypoints_file {tmp}/number.json: item 0 '
     '(0-based) is 3, not a keypoint name'),
    (['--keypoints_file', '{tmp}/gap.txt'], '--keypoints_file {tmp}/gap.txt: line 2 is empty'),
    (['--keypoints_file', '{tmp}/latin1.txt'], '{tmp}/latin1.txt: not UTF-8 text (byte 0xe9'),
])
def test_predict_refuses_names_and_edges_by_position(tmp_path, capsys, argv, names):
  """Before the model loads: no name dropped (later indices would shift), no float truncated
  to an index; the one line names the flag / file and the position."""
  from capenext_jax import predict
  (tmp_path / 'object.json').write_text('{"nose": 0, "tail": 1}')
  (tmp_path / 'mixed.json').write_text('["nose", null, 3]')
  (tmp_path / 'number.json').write_text('[3, "nose"]')
  (tmp_path / 'gap.txt').write_text('nose\n\ntail\n')
  (tmp_path / 'latin1.txt').write_bytes('épaule\nqueue\n'.encode('latin-1'))
  args = [a.format(tmp=tmp_path) for a in argv]
  assert predict.main([str(PREDICT_IMAGE), '--category', 'tiger', *args, '--checkpoint',
                       str(tmp_path / 'not_loaded.pth'), '--output',
                       str(tmp_path / 'out.json')]) == 2
  line = last_line(capsys.readouterr().err)
  assert line.startswith('capenext-predict: error: ') and names.format(tmp=tmp_path) in line, line
  assert not (tmp_path / 'out.json').exists()


def test_predict_keypoints_file_in_utf16_and_utf8_bom(tmp_path):
  from capenext_jax import predict
  names = ['épaule gauche', 'queue', '鼻']
  for encoding in ('utf-16', 'utf-8-sig'):
    (tmp_path / encoding).write_bytes('\n'.join(names).encode(encoding))
    (tmp_path / f'{encoding}.json').write_bytes(json.dumps(names).encode(encoding))
    assert list(predict.parse_descriptions(None, str(tmp_path / encoding))) == names
    assert list(predict.parse_descriptions(None, str(tmp_path / f'{encoding}.json'))) == names


def test_predict_overlays_stay_in_their_folder_and_apart(tmp_path):
  """Annotation ids are file names: '../escaped_overlay' stays inside --overlay_dir, and two
  annotations with one id get one overlay each."""
  from capenext_jax import predict
  data = json.loads(MINI_TEST.read_text())
  data['annotations'] = data['annotations'][:3]
  ids = ['../escaped_overlay', 7, 7]
  for ann, new_id in zip(data['annotations'], ids):
    ann['id'] = new_id
  (tmp_path / 'ann.json').write_text(json.dumps(data))
  out = tmp_path / 'a' / 'b'
  assert predict.main(['--coco', str(tmp_path / 'ann.json'), '--image_root',
                       str(MP100_MINI / 'images'), '--checkpoint',
                       str(FIXTURES / 'tiny_capenext.npz'), '--output',
                       str(tmp_path / 'p.json'), '--overlay_dir', str(out),
                       '--batch_size', '4']) == 0
  assert sorted(p.name for p in out.iterdir()) == ['7.png', '7_2.png', '_escaped_overlay.png']
  assert not (tmp_path / 'a' / 'escaped_overlay.png').exists()


# ----------------------------------------------------------------------------- eval.py outputs
def test_eval_never_writes_over_its_inputs(tmp_path):
  from capenext_jax.evaluation.pairs import EvalProtocol, pairs_of_file
  ann = tmp_path / 'ann.json'
  ann.write_bytes(MINI_TEST.read_bytes())
  pairs = pairs_of_file(str(ann), EvalProtocol(shots=1, num_episodes=1, num_queries=1))
  pairs.write_predictions(tmp_path / 'p.json', pairs.arrays['gt_keypoints'])
  before = _digests([ann, tmp_path / 'p.json'])
  base = ('--annotations', ann, '--shots=1', '--num_episodes=1', '--num_queries=1')
  for argv, names in [
      ((f'--output={ann}', f'--score_predictions={tmp_path}/p.json'),
       f'--output={ann}: is the input --annotations={ann}'),
      ((f'--output={tmp_path}/p.json', f'--score_predictions={tmp_path}/p.json'),
       f'--output={tmp_path}/p.json: is the input --score_predictions={tmp_path}/p.json'),
      ((f'--export_episodes={ann}',), f'--export_episodes={ann}: is the input --annotations'),
      ((f'--checkpoint={FIXTURES}/tiny_capenext.npz', f'--output={tmp_path}/x.json',
        f'--predictions_out={tmp_path}/x.json'),
       f'--predictions_out={tmp_path}/x.json: --output is the same file'),
      ((f'--checkpoint={FIXTURES}/tiny_capenext.npz', f'--output={ann}'),
       f'--output={ann}: is the input --annotations={ann}')]:
    status, line = run_eval_cli(*base, *argv)
    assert status == 2 and line.startswith('eval.py: error: ') and names in line, (argv, line)
  assert _digests([ann, tmp_path / 'p.json']) == before
  assert sorted(p.name for p in tmp_path.iterdir()) == ['ann.json', 'p.json']


def test_eval_refuses_scores_that_overflow_and_writes_no_report(tmp_path):
  """Coordinates of 1e308 are finite, but their mean error is inf: one line naming the file,
  no table printed, no (truncated) report."""
  from capenext_jax.evaluation.pairs import EvalProtocol, pairs_of_file
  pairs = pairs_of_file(str(MINI_TEST), EvalProtocol(shots=1, num_episodes=1, num_queries=1))
  far = pairs.arrays['gt_keypoints'].copy()
  far[1, 0] = 1e308
  pairs.write_predictions(tmp_path / 'far.json', far)
  status, line = run_eval_cli('--annotations', MINI_TEST, '--shots=1', '--num_episodes=1',
                              '--num_queries=1', f'--score_predictions={tmp_path}/far.json',
                              f'--output={tmp_path}/report.json')
  assert status == 2 and line.startswith(f'eval.py: error: {tmp_path}/far.json: the scores are '
                                         'not finite') and '1e+308 px' in line, line
  assert not (tmp_path / 'report.json').exists()

"""eval.py: episode export and predictions scoring (no model, no images), model eval on
mp100_mini from a train.py workdir and from the official tiny fixture, overlays."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import FIXTURES, MP100_MINI, REPO

TEST_ANN = MP100_MINI / 'annotations' / 'mini_test.json'
TRAIN_ANN = MP100_MINI / 'annotations' / 'mini_train.json'
IMAGES = MP100_MINI / 'images'
ENV = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=f'{REPO}:{REPO}/tests')


def run(script, *args):
  """Run a repo script; returns its stdout (the test fails with its stderr tail)."""
  proc = subprocess.run([sys.executable, str(REPO / script), *map(str, args)], env=ENV,
                        capture_output=True, text=True, timeout=600, cwd=REPO)
  assert proc.returncode == 0, proc.stderr[-4000:]
  return proc.stdout


def categories_with(path, min_instances, out):
  """Copy of the annotation json keeping the categories with >= min_instances instances."""
  d = json.loads(path.read_text())
  counts = {}
  for a in d['annotations']:
    counts[a['category_id']] = counts.get(a['category_id'], 0) + 1
  keep = {c for c, n in counts.items() if n >= min_instances}
  d['categories'] = [c for c in d['categories'] if c['id'] in keep]
  d['annotations'] = [a for a in d['annotations'] if a['category_id'] in keep]
  out.write_text(json.dumps(d))
  return out


def check_export(npz, ann, shots, episodes, queries):
  from capenext_jax.evaluation.pairs import EvalProtocol, pairs_of_file
  got = np.load(npz)
  want = pairs_of_file(str(ann), EvalProtocol(shots=shots, num_episodes=episodes,
                                              num_queries=queries)).arrays
  n = len(want['query_ann_id'])
  for key, dtype, shape in (('support_ann_ids', np.int64, (n, shots)),
                            ('query_ann_id', np.int64, (n,)), ('bbox_thr', np.float64, (n,)),
                            ('mask', np.bool_, (n, 100))):
    assert got[key].dtype == dtype and got[key].shape == shape, key
    np.testing.assert_array_equal(got[key], want[key])


def test_export_episodes_without_model_or_images(tmp_path):
  # 1-shot on the test split (2 instances per category: 1 support + 1 query).
  out = tmp_path / 'one.npz'
  run('eval.py', f'--annotations={TEST_ANN}', '--shots=1', '--num_episodes=5',
      '--num_queries=1', f'--export_episodes={out}', '--image_root=/nonexistent')
  check_export(out, TEST_ANN, 1, 5, 1)
  # 5-shot where the data allows: train categories with >= 7 instances (5 + 2 queries).
  ann = categories_with(TRAIN_ANN, 7, tmp_path / 'big.json')
  from capenext_jax.evaluation.pairs import EvalProtocol, export_episodes
  from PIL import Image
  with pytest.MonkeyPatch.context() as mp:   # no image is opened
    mp.setattr(Image, 'open', lambda *a, **k: pytest.fail('image read'))
    export_episodes(str(ann), str(tmp_path / 'five.npz'),
                    EvalProtocol(shots=5, num_episodes=4, num_queries=2))
  check_export(tmp_path / 'five.npz', ann, 5, 4, 2)


def test_score_predictions_ground_truth_and_shifted(tmp_path):
  from capenext_jax.evaluation.pairs import EvalProtocol, pairs_of_file
  pairs = pairs_of_file(str(TEST_ANN), EvalProtocol(shots=1, num_episodes=3, num_queries=1))
  arrays = pairs.arrays
  assert arrays['mask'].any(axis=1).all()   # no empty pair: the hand values below hold
  gt = arrays['gt_keypoints']
  pairs.write_predictions(tmp_path / 'gt.json', gt)
  # Every keypoint moved 0.12 * bbox_thr along x: dist 0.12 for every valid keypoint, so
  # PCK@0.05 = PCK@0.1 = 0, PCK@0.15..0.25 = 1, mPCK 0.6, AUC = 17 thresholds (0.15..0.95) / 20.
  shift = gt.copy()
  shift[..., 0] += 0.12 * arrays['bbox_thr'][:, None]
  pairs.write_predictions(tmp_path / 'shift.json', shift)
  for name in ('gt', 'shift'):
    run('eval.py', f'--annotations={TEST_ANN}', '--shots=1', '--num_episodes=3',
        '--num_queries=1', f'--score_predictions={tmp_path / name}.json',
        f'--output={tmp_path / name}_scores.json')
  gt_scores = json.loads((tmp_path / 'gt_scores.json').read_text())
  shift_scores = json.loads((tmp_path / 'shift_scores.json').read_text())
  a, b = gt_scores['overall'], shift_scores['overall']
  assert a['PCK@0.2'] == 1.0 and a['mPCK'] == 1.0 and a['AUC'] == pytest.approx(0.95)
  assert a['EPE'] == 0.0 and a['num_pairs'] == 12
  assert (b['PCK@0.05'], b['PCK@0.1'], b['PCK@0.15'], b['PCK@0.2'], b['PCK@0.25']) == (
      0, 0, 1, 1, 1)
  assert b['mPCK'] == pytest.approx(0.6) and b['AUC'] == pytest.approx(0.85)
  assert b['NME'] == pytest.approx(0.12, rel=1e-5)
  assert b['EPE'] == pytest.approx(np.mean(0.12 * arrays['bbox_thr']), rel=1e-5)


def write_clip(path, seed):
  """A random CLIP of the runlocal size in the OpenAI layout (an `init.clip_path` file):
  (path, its params)."""
  from flax import nnx

  from capenext_jax.convert.clip import clip_to_openai
  from capenext_jax.models.capenext import CapeNextConfig
  from capenext_jax.models.clip import CLIP
  from configs import mp100
  config = CapeNextConfig.from_dict(mp100.get_config('runlocal').model.to_dict())
  params = nnx.to_pure_dict(nnx.state(CLIP(config.clip, rngs=nnx.Rngs(seed)), nnx.Param))
  np.savez(path, **clip_to_openai(params))
  return path, params


def assert_workdir_clip(workdir, clip_params):
  """The workdir loads (weights only: no optimizer state) with `clip_params` as its CLIP."""
  from capenext_jax import loading
  from capenext_jax import params as params_lib
  from capenext_jax.device.partition import to_host
  ckpt = loading.load(workdir)
  assert ckpt.state.opt_state == ()
  got = params_lib.flatten(to_host(ckpt.state.frozen['clip']))
  want = params_lib.flatten(clip_params)
  assert set(want) <= set(got)
  for name, value in want.items():
    np.testing.assert_array_equal(got[name], value, err_msg=name)


def mp100_mini_train_cmd(workdir, options=''):
  """train.py on mp100_mini: configs/mp100.py runlocal (tiny model, 4 steps), no val split."""
  return ('train.py', f'--workdir={workdir}',
          f'--config={REPO}/configs/mp100.py:runlocal,root={MP100_MINI}{options}',
          f'--config.data.train_ann={TRAIN_ANN}', f'--config.data.test_ann={TEST_ANN}',
          '--config.data.val_ann=', '--config.async_checkpoints=False')


def test_mp100_mini_train_then_eval_with_overlays(tmp_path, capsys):
  """Also the paper's ablation options end to end: a fusion variant (one without the CLIP image
  tower, the cheapest to compile) and the masked images in training, the CapeX synonyms and
  wrong category prompts in evaluation, the table tool."""
  wd = tmp_path / 'run'
  clip_file, clip_params = write_clip(tmp_path / 'clip.npz', seed=1)
  out = run(*mp100_mini_train_cmd(wd, ',fusion=SimpleMultiModalWithoutQueryImgEmbedding,mask'),
            f'--config.init.clip_path={clip_file}',
            '--config.checkpoint_every_steps=2')   # step 2 too: an earlier step to convert
  assert 'step 4/4' in out and 'test PCK@0.2 after training' in out, out
  # Self-contained: the run's CLIP file replaced by another one, then gone; the workdir
  # evaluates, predicts and converts below with the CLIP it trained with.
  write_clip(clip_file, seed=2)
  assert_workdir_clip(wd, clip_params)
  clip_file.unlink()
  assert json.loads((wd / 'results.json').read_text())['step'] == 4
  run_config = json.loads((wd / 'config.json').read_text())
  assert run_config['model']['fusion']['module'] == 'SimpleMultiModalWithoutQueryImgEmbedding'
  assert run_config['data']['mask_outside_bbox']
  # 4 test categories x 3 episodes x 1 query = 12 pairs; batch 5 pads the last batch by 3.
  report = tmp_path / 'eval' / 'report.json'
  from conftest import run_eval_cli   # in-process: no second start-up of jax and TensorFlow
  capsys.readouterr()
  status, line = run_eval_cli(f'--checkpoint={wd}', f'--annotations={TEST_ANN}',
                              f'--image_root={IMAGES}', '--shots=1', '--num_episodes=3',
                              '--num_queries=1', '--batch_size=5', f'--output={report}',
                              '--visualize=1', f'--predictions_out={tmp_path / "p.json"}',
                              '--descriptions=synonyms', '--category_prompt=wrong')
  assert status == 0, line
  assert 'PCK@0.2' in capsys.readouterr().out
  r = json.loads(report.read_text())
  assert r['overall']['num_pairs'] == 12 and len(r['per_category']) == 4
  assert r['info']['descriptions'].startswith('synonyms') and r['info']['category_prompt'] == 'wrong'
  from capenext_jax.tools import mp100_table
  assert mp100_table.main([f'{report}@2']) == 0
  table = capsys.readouterr().out
  assert '| 1-shot | missing |' in table and 'split(s) 1, 3, 4, 5 missing' in table
  assert len(list((tmp_path / 'eval' / 'overlays').glob('*.png'))) == 4
  # Our predictions file scores to the same numbers as the run itself.
  status, line = run_eval_cli(f'--annotations={TEST_ANN}', '--shots=1', '--num_episodes=3',
                              '--num_queries=1', f'--score_predictions={tmp_path / "p.json"}',
                              f'--output={tmp_path / "rescored.json"}')
  assert status == 0, line
  rescored = json.loads((tmp_path / 'rescored.json').read_text())
  assert rescored['overall'] == pytest.approx(r['overall'], rel=1e-5, abs=1e-6)
  # The same workdir through capenext-predict (the loader's workdir -> model path).
  from capenext_jax import predict
  assert predict.main(['--coco', str(TEST_ANN), '--image_root', str(IMAGES), '--checkpoint',
                       str(wd), '--output', str(tmp_path / 'coco.json'), '--batch_size', '3']) == 0
  coco = json.loads((tmp_path / 'coco.json').read_text())
  assert len(coco) == len(json.loads(TEST_ANN.read_text())['annotations'])
  # capenext-convert: its latest step -> an export that records where it came from.
  from capenext_jax.convert import cli
  assert cli.main([str(wd), str(tmp_path / 'exported')]) == 0
  prov = json.loads((tmp_path / 'exported' / 'config.json').read_text())['provenance']
  results = json.loads((wd / 'results.json').read_text())
  assert (prov['kind'], prov['step'], prov['shots']) == ('workdir', 4, 1)
  assert prov['test_pck'] == results['test_pck_end'] and prov['split']['test'] == str(TEST_ANN)
  assert prov['sha256'] == cli.sha256_of(wd / 'checkpoints' / '4') and 'val_pck' not in prov
  assert cli.main([str(wd), str(tmp_path / 'best'), '--best']) == 2   # this run has no val split
  # An earlier step carries its own facts, not the final step's test PCK (results.json's).
  assert cli.main([str(wd), str(tmp_path / 'step2'), '--step', '2']) == 0
  prov = json.loads((tmp_path / 'step2' / 'config.json').read_text())['provenance']
  assert prov['step'] == 2 and prov['sha256'] == cli.sha256_of(wd / 'checkpoints' / '2')
  assert 'test_pck' not in prov and 'val_pck' not in prov


def test_eval_official_fixture_checkpoint_on_one_and_two_processes(tmp_path, capsys):
  """The official-weights path: tiny_capenext.npz through the converter (64 px, its config);
  on 2 processes (jax.distributed, a localhost coordinator) the same report, written once."""
  import socket
  from conftest import run_eval_cli   # one process: this one (no start-up of jax and TF)
  args = [f'--checkpoint={FIXTURES / "tiny_capenext.npz"}', f'--annotations={TEST_ANN}',
          f'--image_root={IMAGES}', '--shots=1', '--num_episodes=1', '--num_queries=1']
  one = tmp_path / 'one' / 'fixture.json'
  capsys.readouterr()
  status, line = run_eval_cli(*args, '--batch_size=3', f'--output={one}')
  assert status == 0, line
  assert 'PCK@0.2' in capsys.readouterr().out and one.exists()
  with socket.socket() as s:
    s.bind(('localhost', 0))
    port = s.getsockname()[1]
  two = tmp_path / 'two' / 'fixture.json'
  # Global batches of 4 (2 rows per process), the last one padded.
  procs = [subprocess.Popen(
      [sys.executable, str(REPO / 'eval.py'), *args, '--batch_size=4', f'--output={two}',
       f'--predictions_out={two}.predictions', '--visualize=1', '--num_processes=2',
       f'--process_id={i}', f'--coordinator_address=localhost:{port}'],
      env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
      for i in range(2)]
  outs = [p.communicate(timeout=600) for p in procs]
  for p, (_, err) in zip(procs, outs):
    assert p.returncode == 0, err[-4000:]
  assert 'PCK@0.2' in outs[0][0] and 'PCK@0.2' not in outs[1][0]   # process 0 reports
  a, b = (json.loads(p.read_text()) for p in (one, two))
  assert a['info'] == b['info'] and a.keys() == b.keys()
  assert b['overall'] == pytest.approx(a['overall'], rel=1e-5, abs=1e-6)
  assert len(a['per_category']) == len(b['per_category']) > 1
  for x, y in zip(a['per_category'], b['per_category']):
    assert (x['category_id'], x['name']) == (y['category_id'], y['name'])
    numbers = lambda d: {k: v for k, v in d.items() if k not in ('category_id', 'name')}  # noqa: E731
    assert numbers(y) == pytest.approx(numbers(x), rel=1e-5, abs=1e-6)
  assert sorted(os.listdir(tmp_path / 'two')) == ['fixture.json', 'fixture.json.predictions',
                                                  'overlays']

"""The programs' faces: capenext-train / capenext-eval (train.py / eval.py) take a config by
module name from any folder, and --help lists the flags a user needs. No model is built."""
import os
import subprocess
import sys

import numpy as np

from conftest import MP100_MINI, REPO, run_eval_cli
from capenext_jax import cli

ENV = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=str(REPO))
TEST_ANN = MP100_MINI / 'annotations' / 'mini_test.json'


def test_config_names_a_module_of_the_configs_package(tmp_path):
  spec = cli.config_spec('mp100:runlocal,root=.')
  assert spec == f'{REPO / "configs" / "mp100.py"}:runlocal,root=.'
  assert cli.config_spec('synthetic') == str(REPO / 'configs' / 'synthetic.py')
  own = tmp_path / 'mine.py'
  own.write_text('')
  assert cli.config_spec(f'{own}:x') == f'{own}:x'           # a file stays a file
  assert cli.config_spec('nonexistent:x') == 'nonexistent:x'  # ml_collections names it
  assert cli.config_argv(['p', '--config', 'mp100:split=2', '--config.seed=3']) == [
      'p', '--config', f'{REPO / "configs" / "mp100.py"}:split=2', '--config.seed=3']
  assert cli.load_config('mp100:split=2,root=.').data.root == '.'


def test_eval_takes_a_config_module(tmp_path):
  """(In-process: ml_collections registers --config.* overrides from sys.argv when the flag is
  defined, so the overrides are the subprocess test's.)"""
  out = tmp_path / 'pairs.npz'
  status, err = run_eval_cli('--config=mp100:runlocal,root=.', f'--annotations={TEST_ANN}',
                             '--num_episodes=1', '--num_queries=1', f'--export_episodes={out}')
  assert status == 0, err
  assert np.load(out)['support_ann_ids'].shape[1] == 1   # the config's shots
  status, err = run_eval_cli('--config=mp100:split=9,root=.', f'--annotations={TEST_ANN}',
                             f'--export_episodes={out}')
  assert status == 2 and 'split' in err, err   # the module's own check ran


def test_help_lists_the_flags_a_user_needs(tmp_path):
  """From a folder outside the repo, as the console command runs (train.py: the same run),
  with a config module and an override: --help lists --config and how to override it."""
  command = [sys.executable, '-c', 'from capenext_jax.commands import train; train()',
             '--config', 'mp100:runlocal,root=.', '--config.batch_size=2', '--help']
  proc = subprocess.run(command, env=ENV, cwd=tmp_path, capture_output=True, text=True,
                        timeout=300)
  assert proc.returncode == 1 and 'error' not in proc.stderr, proc.stderr   # absl's --help
  for flag in ('--config:', '--config.<field>=value', '--workdir:', 'distributed:',
               '--coordinator_address', '--num_processes', '--process_id'):
    assert flag in proc.stdout, (flag, proc.stdout)

"""Shared test helpers: where the golden fixtures and the real mini dataset live.

CI clones the repo with `shared/` beside it, so both are found relative to the repo root
(override with $CAPENEXT_SHARED). A missing file is a failure, never a skip.
"""
import importlib.util
import os
import pathlib
import sys

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED = pathlib.Path(os.environ.get('CAPENEXT_SHARED', REPO.parent / 'shared'))
FIXTURES = SHARED / 'fixtures'
MP100_MINI = SHARED / 'data' / 'mp100_mini'


def load_fixture(name: str):
  """np.load of a golden fixture (no pickles)."""
  path = FIXTURES / name
  if not path.exists():
    raise FileNotFoundError(f'golden fixture {path} is missing (set $CAPENEXT_SHARED)')
  return np.load(path, allow_pickle=False)


def eval_program():
  """eval.py imported once per process (absl flags can be defined only once)."""
  if 'eval_program' not in sys.modules:
    spec = importlib.util.spec_from_file_location('eval_program', REPO / 'eval.py')
    module = importlib.util.module_from_spec(spec)
    sys.modules['eval_program'] = module
    spec.loader.exec_module(module)
  return sys.modules['eval_program']


def last_line(text: str) -> str:
  return text.strip().splitlines()[-1] if text.strip() else ''


def run_eval_cli(*argv):
  """eval.py as `app.run` runs it (our flag parser, then the guarded main), in-process:
  (exit status, stderr's last line)."""
  import contextlib
  import io

  from absl import flags

  from capenext_jax import cli
  program = eval_program()
  flags.FLAGS.unparse_flags()
  err = io.StringIO()
  with contextlib.redirect_stderr(err):
    try:
      cli.absl_flags_parser('eval.py')(['eval.py', *map(str, argv)])
      cli.guarded('eval.py', program.main, verbose=cli.absl_verbose)([])
      status = 0
    except SystemExit as e:
      status = e.code
  return status, last_line(err.getvalue())

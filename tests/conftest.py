"""Shared test helpers: where the golden fixtures and the real mini dataset live.

CI clones the repo with `shared/` beside it, so both are found relative to the repo root
(override with $CAPENEXT_SHARED). A missing file is a failure, never a skip.

Compiled XLA programs are shared through JAX's persistent compilation cache, in one fresh
directory per test run: the same tiny model's train step is compiled again by every `train()`
of a resume test and by every train.py / eval.py subprocess (tests build their subprocess
environments from os.environ, so the variables below reach them, and pytest-xdist's workers
inherit them from the controller). A hit runs the identical executable, so no check changes;
each run starts empty, so every program is still compiled at least once per run.
"""
import atexit
import importlib.util
import os
import pathlib
import shutil
import sys
import tempfile

import numpy as np

from capenext_jax import runtime

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED = pathlib.Path(os.environ.get('CAPENEXT_SHARED', REPO.parent / 'shared'))
FIXTURES = SHARED / 'fixtures'
MP100_MINI = SHARED / 'data' / 'mp100_mini'




def _share_compiled_programs():
  """Set JAX's cache variables before jax is imported (here, in the first process of the run)."""
  if 'JAX_COMPILATION_CACHE_DIR' in os.environ:
    return   # a worker of this run (inherited), or the caller chose a cache
  cache = tempfile.mkdtemp(prefix='capenext-test-xla-cache-')
  atexit.register(shutil.rmtree, cache, ignore_errors=True)
  os.environ['JAX_COMPILATION_CACHE_DIR'] = cache
  # Programs that compile in under 0.5 s are cheaper to compile than to look up and write.
  os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0.5')


_share_compiled_programs()


def _compile_cheaply():
  """XLA's cheap backend settings (runtime.ONE_RUN_XLA_FLAGS) for every program of the run,
  this process's and its subprocesses' (through XLA_FLAGS, read when jax starts its backend):
  the tests run tiny models for a step or a few, and compiling was most of the suite's time
  (they cut a tiny train step's compile from 21 s to 12 s then; today's compiles in 7.1 s with
  them, 3.9 s with jaxlib 0.10's older CPU kernel emitters too, see runtime.ONE_RUN_COMPILE).
  The programs, their shapes and dtypes are the same; only the machine code differs, which
  moves float32 round-off: every bound in the tests holds for both (test_train.LAYOUT_EPS says
  how the layout checks do). A caller that sets the optimisation level itself, e.g.
  XLA_FLAGS=--xla_backend_optimization_level=3 (XLA's default), runs the suite with XLA's
  default settings. Either way LLVM's fast instruction selector is off (runtime.NO_FAST_ISEL:
  at level 0 it made kernels read past their buffers). (capenext_jax.runtime imports no jax:
  the variables are still set before jax loads.)"""
  if os.environ.get('CAPENEXT_TEST_XLA_FLAGS'):
    return   # a subprocess of the run (or a worker): its XLA_FLAGS are what its parent chose
  os.environ['CAPENEXT_TEST_XLA_FLAGS'] = '1'
  flags = os.environ.get('XLA_FLAGS', '')
  if 'xla_backend_optimization_level' not in flags:
    os.environ['XLA_FLAGS'] = f'{flags} {runtime.ONE_RUN_XLA_FLAGS}'.strip()
  runtime.allow_one_run_compile()


def xla_flags(*extra: str) -> str:
  """XLA_FLAGS for a subprocess: the run's (cheap compilation) plus `extra`."""
  return ' '.join([os.environ.get('XLA_FLAGS', ''), *extra]).strip()


def _tune_allocator_for_subprocesses():
  """The programs' allocator (capenext_jax/runtime.py) chosen once, in the first process of
  the run: every train.py / eval.py / benchmark subprocess (and pytest-xdist worker) starts in
  the environment its `tune_allocator` would re-exec into, so none of them starts twice (each
  re-exec imports jax and the program again: ~2 s per subprocess on the 2-core CI machine).
  tests/test_runtime.py clears these variables to test the re-exec itself.

  jemalloc keeps its default page decay here (an empty MALLOC_CONF): pytest-xdist's workers
  hold several GB of compiled programs for the whole run, and the programs' never-decay
  setting is meant for one long training process."""
  os.environ.setdefault('MALLOC_CONF', '')
  os.environ.update(runtime.tuned_environment(dict(os.environ)) or {})


_tune_allocator_for_subprocesses()
_compile_cheaply()
# A native crash of a subprocess (train.py, eval.py, a 2-device run) prints its Python threads'
# stacks into the output its test reports: the XLA:CPU crash of runtime.NO_FAST_ISEL left
# nothing but an exit status of -11 in CI.
os.environ.setdefault('PYTHONFAULTHANDLER', '1')


# Modules whose tests train or evaluate in subprocesses, about a minute each: they run first,
# so that pytest-xdist's work stealing (`-n 2 --dist worksteal`, the README's command) spreads
# them over the workers, instead of one worker running the last of them while the other idles
# (with xdist's default scheduling one worker once ran all of test_train.py, 12 minutes alone).
RUN_FIRST = ('test_train.py', 'test_eval.py', 'test_docs.py')


def pytest_collection_modifyitems(config, items):
  del config
  items.sort(key=lambda item: item.path.name not in RUN_FIRST)   # stable: same order within


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

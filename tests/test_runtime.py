"""`tune_allocator` (Linux): the programs re-exec once with jemalloc or glibc's huge-page
tunable."""
import os
import subprocess
import sys

from capenext_jax import runtime
from conftest import REPO

REPORT = ('from capenext_jax.runtime import tune_allocator, allocator; import os; '
          'tune_allocator(); print(allocator(), os.environ.get("GLIBC_TUNABLES", "-"))')
HAS_JEMALLOC = any(os.path.exists(p) for p in runtime.JEMALLOC_PATHS)


def run(**env_changes) -> list[str]:
  env = {k: v for k, v in os.environ.items()
         if k not in ('LD_PRELOAD', 'MALLOC_CONF', 'GLIBC_TUNABLES', 'CAPENEXT_NO_JEMALLOC',
                      runtime._DONE)}
  env.update(env_changes)
  out = subprocess.run([sys.executable, '-c', REPORT], env=env, cwd=REPO, check=True,
                       capture_output=True, text=True).stdout
  return out.split()


def test_reexec_picks_an_allocator():
  expected = 'jemalloc' if HAS_JEMALLOC else 'glibc+hugetlb'
  assert run()[0] == expected
  assert run(CAPENEXT_NO_JEMALLOC='1') == ['glibc+hugetlb', runtime.GLIBC_TUNABLES]


def test_caller_choice_is_kept():
  # A caller's own GLIBC_TUNABLES is never overridden, and nothing re-executes.
  assert run(CAPENEXT_NO_JEMALLOC='1', GLIBC_TUNABLES='glibc.malloc.arena_max=2') == \
      ['glibc', 'glibc.malloc.arena_max=2']


def test_tensorflow_runs_without_onednn_rewrites():
  """The oneDNN graph pass logs `E0000 ... oneDNN supports DT_UINT8 only on platforms with
  AVX-512` on CPUs without AVX-512 (not reproducible on this one): the programs' TensorFlow
  import turns that pass off, and a caller's own choice is kept."""
  probe = ('from capenext_jax.runtime import import_tensorflow_quietly as q; q(); '
           'from tensorflow.python.util import _pywrap_util_port as p; print(p.IsMklEnabled())')
  env = {k: v for k, v in os.environ.items() if k != 'TF_ENABLE_ONEDNN_OPTS'}

  def onednn(**changes) -> str:
    return subprocess.run([sys.executable, '-c', probe], env=dict(env, **changes), cwd=REPO,
                          check=True, capture_output=True, text=True).stdout.strip()

  assert onednn() == 'False'
  assert onednn(TF_ENABLE_ONEDNN_OPTS='1') == 'True'

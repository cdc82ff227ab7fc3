"""`tune_allocator` (Linux): the programs re-exec once with jemalloc or glibc's huge-page
tunable. The cheap compile settings of programs run once keep kernels inside their buffers.
TensorFlow's oneDNN rewrites stay off."""
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


# A BatchNorm-style reduction with ReLU's gradient in it (`where(y > 0, g, 0)`), run with `g` in
# the last bytes of a page whose next page is unreadable: a kernel that reads past `g` dies of
# SIGSEGV. At backend level 0 LLVM's FastISel compiled the select as a 16-byte `vblendvps` load
# of a 4-byte value (runtime.NO_FAST_ISEL), so without the guard this crashes every time.
PAGE_END_KERNEL = """
import ctypes, importlib, mmap, sys
import numpy as np
import jax, jax.numpy as jnp
from capenext_jax import runtime
expected_level, imports, allow = int(sys.argv[1]), sys.argv[2].split(','), sys.argv[3] == 'allow'
for module in filter(None, imports):
  importlib.import_module(module)
if allow:
  runtime.allow_one_run_compile()
page = mmap.PAGESIZE
memory = mmap.mmap(-1, 2 * page, prot=mmap.PROT_READ | mmap.PROT_WRITE)
start = ctypes.addressof(ctypes.c_char.from_buffer(memory))
assert ctypes.CDLL(None).mprotect(ctypes.c_void_p(start + page), page, 0) == 0
g = np.frombuffer(memory, np.float32, 1024, page - 4096).reshape(2, 4, 4, 32)
g[...] = 1
g_device = jax.device_put(g)
assert g_device.unsafe_buffer_pointer() == g.ctypes.data, 'copied: the test would prove nothing'


def bn_relu_grad(x, g, mean, scale, bias):
  return jnp.sum(jnp.where((x - mean) * scale + bias > 0, g, 0.0) * (x - mean), axis=(0, 1, 2))


x, ones = jnp.full((2, 4, 4, 32), 2.0), jnp.ones(32)
options = runtime.one_run_compile_options()
assert options['xla_backend_optimization_level'] == expected_level, options
out = jax.jit(bn_relu_grad).lower(x, g_device, ones, ones, ones).compile(options)(
    x, g_device, ones, ones, ones)
np.testing.assert_array_equal(np.asarray(out), np.full(32, 32.0))
print('ok')
"""


def test_one_run_compile_reads_nothing_past_a_buffer():
  """The suite's XLA_FLAGS (runtime.ONE_RUN_XLA_FLAGS) compile at the cheap level safely (0 on
  jaxlib 0.10, with its guard); a process without the guard in its XLA_FLAGS gets level 1; and
  check_parity's command line, which adds the guard after its imports, still adds it before
  jax's backend started (else: SIGSEGV)."""
  env = {k: v for k, v in os.environ.items() if k not in ('XLA_FLAGS', 'JAX_COMPILATION_CACHE_DIR')}
  cheap = runtime.ONE_RUN_COMPILE['xla_backend_optimization_level']
  unguarded = runtime.ONE_RUN_XLA_FLAGS.replace(runtime.NO_FAST_ISEL, '')

  def kernel(xla_flags, level, imports='', allow='') -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, '-c', PAGE_END_KERNEL, str(level), imports, allow],
                          env=dict(env, JAX_PLATFORMS='cpu', XLA_FLAGS=xla_flags), cwd=REPO,
                          capture_output=True, text=True)

  for run in (kernel(runtime.ONE_RUN_XLA_FLAGS, cheap), kernel(unguarded, 1),
              kernel('', cheap, 'capenext_jax.tools.check_parity', 'allow')):
    assert run.returncode == 0 and run.stdout.strip() == 'ok', (run.returncode, run.stderr[-2000:])

"""Process-level settings for the programs (train.py, eval.py, benchmarks); the library
itself never calls this.

TensorFlow's C++ start-up INFO lines stay off the console: `quiet_startup()` hides the CPU
feature banner (TF_CPP_MIN_LOG_LEVEL=1 unless the caller set it); the oneDNN notice, which TF's
two shared libraries each print through absl before any log level applies, is dropped by
`import_tensorflow_quietly()`, which imports TensorFlow once with the process's stderr captured
(other lines are passed on).

Both also turn TensorFlow's oneDNN graph rewrites off (TF_ENABLE_ONEDNN_OPTS=0 unless the
caller set it). On a CPU without AVX-512 that pass logs, at ERROR level and so past any
TF_CPP_MIN_LOG_LEVEL that keeps real errors, `E0000 ... oneDNN supports DT_UINT8 only on
platforms with AVX-512` in the middle of every run. Nothing here needs it: TensorFlow runs only
the tf.data input pipeline (decoding, warps and elementwise ops; its arithmetic is numpy's), and
on such CPUs the uint8 ops fall back to the same Eigen kernels anyway, so the pipeline now runs
the same kernels on every CPU.

XLA:CPU allocates each step's temporaries (~2.3 GB for a full-size training step) afresh.
glibc hands such blocks back to the kernel on free, so every step page-faults them in again:
~600k faults per step, about 20% of a CPU training step. jemalloc keeps freed pages when
told not to decay them. Where jemalloc is not installed, glibc's malloc is told to back its
memory with transparent huge pages, which cuts the faults 512-fold (about 8% of a step).
Both must be in place before the interpreter starts, so `tune_allocator()` re-executes the
program once: with jemalloc preloaded when the library is installed (Debian/Ubuntu:
`apt-get install libjemalloc2`), else with the glibc tunable. Set CAPENEXT_NO_JEMALLOC=1 to
keep glibc.
"""
from __future__ import annotations

import os
import sys
from importlib import metadata

JEMALLOC_PATHS = ('/usr/lib/x86_64-linux-gnu/libjemalloc.so.2',
                  '/usr/lib/aarch64-linux-gnu/libjemalloc.so.2',
                  '/usr/lib64/libjemalloc.so.2', '/usr/local/lib/libjemalloc.so.2')
# Never return freed pages to the kernel, so the next step reuses them without faulting.
JEMALLOC_CONF = 'dirty_decay_ms:-1,muzzy_decay_ms:-1'
# glibc >= 2.35: madvise(MADV_HUGEPAGE) on malloc's memory; older glibc ignores the name.
GLIBC_TUNABLES = 'glibc.malloc.hugetlb=1'
_DONE = 'CAPENEXT_ALLOCATOR_TUNED'


def _jaxlib_minor() -> tuple[int, int] | None:
  """(major, minor) of the installed jaxlib, read without importing it; None if absent."""
  try:
    return tuple(int(part) for part in metadata.version('jaxlib').split('.')[:2])
  except (metadata.PackageNotFoundError, ValueError):
    return None


# XLA's cheap backend settings for programs that run once or twice (tools/check_parity.py, the
# tests): the same program, less optimised machine code, compiled about 3x faster on a CPU.
# Their round-off differs from the default compilation's, so compare only programs compiled
# alike. Compile with `one_run_compile_options()`, never with this dict alone (NO_FAST_ISEL).
ONE_RUN_COMPILE = {'xla_backend_optimization_level': 0, 'xla_llvm_disable_expensive_passes': True}
# At backend level 0 XLA:CPU has LLVM pick instructions with its fast selector (FastISel), which
# folds a 4-byte float load into the 16-byte memory operand of `vblendvps` (a `select`, e.g.
# ReLU's gradient inside a BatchNorm reduction): the kernel reads 12 bytes past the value, and
# dies of SIGSEGV where its buffer ends in the last 12 bytes of a mapped page. It took down ~1
# run in 4 of the suite's HRNet 2-device step (38 such folds in that step; jaxlib 0.10.2 and
# 0.12.1 alike; tests/test_runtime.py puts a buffer at a page's end). jaxlib 0.10 takes LLVM's
# option to use its own selector instead (NO_FAST_ISEL: no fold left, compile times within
# noise); 0.12 ignores it, so there the cheap level is 1, where LLVM runs no FastISel. LLVM's
# options belong to the process: XLA takes them from XLA_FLAGS only, read once when its backend
# starts (the first array or compile), never as compile options.
NO_FAST_ISEL = '--xla_backend_extra_options=-fast-isel=false'
if _jaxlib_minor() == (0, 10):
  # jaxlib 0.10's XLA:CPU still has its element-by-element kernel emitters beside the MLIR
  # fusion emitters it uses by default; they compile a tiny train step in half the time (7.1 s
  # -> 3.9 s; the whole test suite 981 s -> 657 s on 2 cores). Later jaxlibs have only the
  # fusion emitters, and XLA refuses a flag it does not know.
  ONE_RUN_COMPILE['xla_cpu_use_fusion_emitters'] = False
  _GUARD = NO_FAST_ISEL
else:
  ONE_RUN_COMPILE['xla_backend_optimization_level'] = 1
  _GUARD = ''
# The process-wide form of the cheap settings, for a process's XLA_FLAGS (the test suite's).
ONE_RUN_XLA_FLAGS = ' '.join(
    [*(f'--{k}={str(v).lower()}' for k, v in ONE_RUN_COMPILE.items()), _GUARD]).strip()


def allow_one_run_compile(environ=os.environ) -> None:
  """Add the FastISel guard (where level 0 needs it) to `environ`'s XLA_FLAGS, unless they set
  LLVM options of their own (which it would replace). In a program: before jax starts its
  backend; later it changes nothing."""
  flags = environ.get('XLA_FLAGS', '')
  if _GUARD and 'xla_backend_extra_options' not in flags:
    environ['XLA_FLAGS'] = f'{flags} {_GUARD}'.strip()


def one_run_compile_options() -> dict:
  """The compile options of a program run once (`jitted.lower(...).compile(options)`):
  ONE_RUN_COMPILE where it is safe in this process (level 0 needs the guard in the XLA_FLAGS
  the backend started with: `allow_one_run_compile`), else the same at level 1 (jaxlib 0.10's
  tiny parity check compiles in 47 s there instead of 28 s)."""
  if not _GUARD or _GUARD in os.environ.get('XLA_FLAGS', '').split():
    return dict(ONE_RUN_COMPILE)
  return dict(ONE_RUN_COMPILE, xla_backend_optimization_level=1)


def tuned_environment(environ: dict[str, str]) -> dict[str, str] | None:
  """The environment `tune_allocator` re-executes with (`environ` plus the allocator's
  variables and the done mark), or None where nothing is to change: off Linux, on the
  re-executed run, and where the caller already chose (LD_PRELOAD with jemalloc, or
  GLIBC_TUNABLES set). A parent that sets it for its children spares each a re-exec."""
  if not sys.platform.startswith('linux') or environ.get(_DONE):
    return None
  env = dict(environ, **{_DONE: '1'})
  if 'jemalloc' in env.get('LD_PRELOAD', ''):
    return None
  library = next((p for p in JEMALLOC_PATHS if os.path.exists(p)), None)
  if library is not None and not env.get('CAPENEXT_NO_JEMALLOC'):
    env['LD_PRELOAD'] = ' '.join(filter(None, [library, env.get('LD_PRELOAD')]))
    env.setdefault('MALLOC_CONF', JEMALLOC_CONF)
  elif 'GLIBC_TUNABLES' not in env:
    env['GLIBC_TUNABLES'] = GLIBC_TUNABLES
  else:
    return None
  return env


def tune_allocator() -> None:
  """Re-exec the current command once in `tuned_environment` (jemalloc preloaded or, failing
  that, glibc's huge-page tunable); a no-op where that is None."""
  env = tuned_environment(dict(os.environ))
  if env is None:
    return
  sys.stdout.flush()
  sys.stderr.flush()
  os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)


def quiet_startup() -> None:
  """Before TensorFlow is imported (and before `tune_allocator`, whose re-exec inherits it)."""
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '1')
  os.environ.setdefault('TF_ENABLE_ONEDNN_OPTS', '0')


# Start-up lines of TensorFlow that say nothing about this run.
_TF_NOISE = ('All log messages before absl::InitializeLog() is called',
             'oneDNN custom operations are on')


def import_tensorflow_quietly() -> None:
  """Import TensorFlow (if installed) with its oneDNN rewrites off (unless the caller chose)
  and file descriptor 2 captured; lines other than the start-up notices in `_TF_NOISE` are
  written back to stderr."""
  import importlib.util
  import tempfile
  if 'tensorflow' in sys.modules or importlib.util.find_spec('tensorflow') is None:
    return
  os.environ.setdefault('TF_ENABLE_ONEDNN_OPTS', '0')   # read once, at TF's import
  sys.stderr.flush()
  saved = os.dup(2)
  with tempfile.TemporaryFile() as captured:
    os.dup2(captured.fileno(), 2)
    try:
      import tensorflow  # noqa: F401
    finally:
      os.dup2(saved, 2)
      os.close(saved)
      captured.seek(0)
      lines = captured.read().decode(errors='replace').splitlines(keepends=True)
      sys.stderr.write(''.join(l for l in lines if not any(n in l for n in _TF_NOISE)))
      sys.stderr.flush()


def allocator() -> str:
  """What `tune_allocator` left this process with, for benchmark records."""
  if 'jemalloc' in os.environ.get('LD_PRELOAD', ''):
    return 'jemalloc'
  return 'glibc+hugetlb' if 'hugetlb' in os.environ.get('GLIBC_TUNABLES', '') else 'glibc'

"""Process-level settings for the programs (train.py, eval.py, benchmarks); the library
itself never calls this.

XLA:CPU allocates each step's temporaries (~2.3 GB for a full-size training step) afresh.
glibc hands such blocks back to the kernel on free, so every step page-faults them in again:
~600k faults per step, about 20% of a CPU training step. jemalloc keeps freed pages when
told not to decay them. It must be loaded before the interpreter starts, so
`prefer_jemalloc()` re-executes the program once with it preloaded when the library is
installed (Debian/Ubuntu: `apt-get install libjemalloc2`) and does nothing otherwise.
Set CAPENEXT_NO_JEMALLOC=1 to opt out.
"""
from __future__ import annotations

import os
import sys

JEMALLOC_PATHS = ('/usr/lib/x86_64-linux-gnu/libjemalloc.so.2',
                  '/usr/lib/aarch64-linux-gnu/libjemalloc.so.2',
                  '/usr/lib64/libjemalloc.so.2', '/usr/local/lib/libjemalloc.so.2')
# Never return freed pages to the kernel, so the next step reuses them without faulting.
JEMALLOC_CONF = 'dirty_decay_ms:-1,muzzy_decay_ms:-1'


def prefer_jemalloc() -> None:
  """Re-exec the current command with jemalloc preloaded, once; a no-op where unavailable."""
  if os.environ.get('CAPENEXT_NO_JEMALLOC') or 'jemalloc' in os.environ.get('LD_PRELOAD', ''):
    return
  library = next((p for p in JEMALLOC_PATHS if os.path.exists(p)), None)
  if library is None:
    return
  env = dict(os.environ, LD_PRELOAD=' '.join(filter(None, [library, os.environ.get('LD_PRELOAD')])),
             MALLOC_CONF=os.environ.get('MALLOC_CONF', JEMALLOC_CONF))
  sys.stdout.flush()
  sys.stderr.flush()
  os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)

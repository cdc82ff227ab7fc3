"""Train CapeNext: `python train.py --workdir runs/x [--config configs/mp100.py:split=1]`.

The same program as the `capenext-train` command (capenext_jax/training/program.py, which
documents it); `--help` lists its flags.
"""
from capenext_jax import runtime

if __name__ == '__main__':   # the allocator's re-exec, before the imports it would repeat
  runtime.quiet_startup()
  runtime.tune_allocator()

from capenext_jax.training import program  # noqa: E402
from capenext_jax.training.program import main  # noqa: E402,F401 - tests parse and run it in-process

if __name__ == '__main__':
  program.run('train.py')
else:   # imported (the tests' in-process parses): the flags, as `run` defines them
  program.define_flags('train.py')

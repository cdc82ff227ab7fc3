"""Evaluate CapeNext with the official MP-100 protocol, or export / score its episodes:
`python eval.py --checkpoint runs/x [--annotations test.json --image_root images/]`.

The same program as the `capenext-eval` command (capenext_jax/evaluation/program.py, which
documents it); `--help` lists its flags.
"""
from capenext_jax import runtime

if __name__ == '__main__':   # the allocator's re-exec, before the imports it would repeat
  runtime.quiet_startup()
  runtime.tune_allocator()

from capenext_jax.evaluation import program  # noqa: E402
from capenext_jax.evaluation.program import main  # noqa: E402,F401 - tests run it in-process

if __name__ == '__main__':
  program.run('eval.py')
else:   # imported (the tests' in-process runs): the flags, as `run` defines them
  program.define_flags('eval.py')

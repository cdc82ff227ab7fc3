"""Evaluate CapeNext with the official MP-100 protocol, or export / score its episodes:
`python eval.py --checkpoint runs/x [--annotations test.json --image_root images/]`.

The same program as the `capenext-eval` command (capenext_jax/evaluation/program.py, which
documents it); `--help` lists its flags.
"""
from capenext_jax.evaluation import program
from capenext_jax.evaluation.program import main  # noqa: F401 - tests run it in-process

if __name__ == '__main__':
  program.run('eval.py')
else:   # imported (the tests' in-process runs): the flags, as `run` defines them
  program.define_flags('eval.py')

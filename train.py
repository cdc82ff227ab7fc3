"""Train CapeNext: `python train.py --workdir runs/x [--config configs/mp100.py:split=1]`.

The same program as the `capenext-train` command (capenext_jax/training/program.py, which
documents it); `--help` lists its flags.
"""
from capenext_jax.training import program

if __name__ == '__main__':
  program.run('train.py')

"""Train CapeNext: `python train.py --workdir runs/x [--config configs/mp100.py:split=1]`.

The default config is the synthetic CPU run (configs/synthetic.py). Override any field with
`--config.batch_size=16` etc. Several processes: pass --num_processes/--process_id and
--coordinator_address (or run where `jax.distributed.initialize()` detects the cluster and
pass --distributed).
"""
import os

from absl import app, flags, logging
from ml_collections import config_flags

from capenext_jax import cli

_HERE = os.path.dirname(os.path.abspath(__file__))
PROG = 'train.py'
cli.define_config_flag(PROG, os.path.join(_HERE, 'configs', 'synthetic.py'),
                       'ml_collections config file[:arg]', lock_config=True)
flags.DEFINE_string('workdir', None, 'checkpoints, TensorBoard logs, config.json', required=True)
cli.define_distributed_flags()
FLAGS = flags.FLAGS


def main(argv):
  del argv
  # Our progress lines go to stdout; orbax's per-save INFO lines would drown them (-v keeps them).
  if FLAGS.verbosity < 1:
    logging.set_verbosity(logging.WARNING)
  from capenext_jax.runtime import import_tensorflow_quietly
  import_tensorflow_quietly()
  cli.initialize_distributed()
  from capenext_jax.training.loop import train_and_evaluate
  from data_pipeline.splits import run_splits
  from capenext_jax.training.workdir import check_workdir_kind
  check_workdir_kind(FLAGS.workdir)   # before run_splits draws synthetic data into it
  os.makedirs(FLAGS.workdir, exist_ok=True)
  train_and_evaluate(FLAGS.config, FLAGS.workdir, run_splits(FLAGS.config, FLAGS.workdir),
                     source=config_source())


def config_source() -> str:
  """The --config file[:arg] (or the default file) and the --config.* overrides given."""
  import sys
  overrides = [a for a in sys.argv[1:] if a.startswith('--config.')]
  return ' '.join([config_flags.get_config_filename(FLAGS['config']), *overrides])


if __name__ == '__main__':
  from capenext_jax.runtime import quiet_startup, tune_allocator
  quiet_startup()
  tune_allocator()
  app.run(cli.guarded(PROG, main, verbose=cli.absl_verbose),
          flags_parser=cli.absl_flags_parser(PROG))

"""The training program: `capenext-train` and `train.py` (a thin wrapper) run `run()`.

    capenext-train --workdir runs/x --config mp100:split=1,root=data/mp100
    capenext-train --workdir runs/x --config configs/synthetic.py --config.batch_size=16

The default config is the synthetic CPU run (the `configs.synthetic` module). Several
processes: pass --num_processes/--process_id and --coordinator_address (or run where
`jax.distributed.initialize()` detects the cluster and pass --distributed). The data pipeline
and the training loop (TensorFlow and clu: the `train` extra) are imported here, inside `main`:
without that extra a run fails in one line that names it, and `--help` needs neither.
"""
from __future__ import annotations

import os
import sys

import jax
from absl import flags, logging
from ml_collections import config_flags

from capenext_jax import cli
from capenext_jax.models.capenext import CapeNextConfig
from capenext_jax.runtime import import_tensorflow_quietly
from capenext_jax.training.workdir import WorkdirLock, check_workdir_kind

DEFAULT_CONFIG = 'synthetic'
FLAGS = flags.FLAGS


def define_flags(prog: str) -> None:
  """The program's flags (once per process), all of them listed by --help."""
  cli.define_config_flag(prog, DEFAULT_CONFIG, lock_config=True)
  flags.DEFINE_string('workdir', None, 'checkpoints, TensorBoard logs, config.json; rerun on '
                      'the same workdir to resume', required=True)
  cli.define_distributed_flags()
  cli.show_in_help('config', 'workdir', 'distributed', 'coordinator_address', 'num_processes',
                   'process_id')


def main(argv) -> None:
  """The run of the parsed flags (returns nothing: app.run would exit with what it returns)."""
  del argv
  # Our progress lines go to stdout; orbax's per-save INFO lines would drown them (-v keeps them).
  if FLAGS.verbosity < 1:
    logging.set_verbosity(logging.WARNING)
  import_tensorflow_quietly()
  cli.initialize_distributed()
  # The `train` extra, imported only for a run: the loop's metric writers are clu's, the
  # pipeline is tf.data.
  from capenext_jax.training.loop import train_and_evaluate
  from data_pipeline.splits import run_splits
  config = FLAGS.config
  model_config = CapeNextConfig.from_dict(config.model.to_dict())   # the one parse of a run
  check_workdir_kind(FLAGS.workdir)   # before run_splits draws synthetic data into it
  os.makedirs(FLAGS.workdir, exist_ok=True)
  # Locked before anything is written: a second training on a held workdir stops here, before
  # it draws synthetic data into the running one's (the loop takes the lock again).
  with WorkdirLock(FLAGS.workdir, enabled=jax.process_index() == 0):
    data = run_splits(config, FLAGS.workdir, image_size=model_config.image_size)
    train_and_evaluate(config, FLAGS.workdir, data, source=config_source(),
                       model_config=model_config)


def config_source() -> str:
  """The --config file[:arg] (or the default file) and the --config.* overrides given."""
  overrides = [a for a in sys.argv[1:] if a.startswith('--config.')]
  return ' '.join([config_flags.get_config_filename(FLAGS['config']), *overrides])


def run(prog: str = 'capenext-train') -> None:
  """The console command (and train.py)."""
  cli.run_absl_program(prog, define_flags, main)

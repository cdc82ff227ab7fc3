"""The evaluation program: `capenext-eval` and `eval.py` (a thin wrapper) run `run()`.

Evaluate CapeNext with the official MP-100 protocol, or export / score its episodes:

  capenext-eval --checkpoint runs/synthetic                 # a train workdir (orbax)
  capenext-eval --checkpoint export_dir --annotations test.json --image_root images/
  capenext-eval --checkpoint split1_epoch_200.pth --annotations mp100_split1_test.json ...
  capenext-eval --annotations mp100_split1_test.json --shots 1 --export_episodes episodes.npz
  capenext-eval --annotations mp100_split1_test.json --score_predictions preds.json
  capenext-eval --checkpoint runs/split1 --descriptions synonyms   # text robustness (CapeX)
  capenext-eval --checkpoint runs/split1 --category_prompt wrong   # prompt names another one

Without --annotations the config's test split is used (for a workdir: the one it trained
with: its own data section, not --config's). Prints a per-category table and writes JSON
(--output, default <checkpoint or .>/eval_<split>.json). Several hosts: start one program per
host with --num_processes/--process_id/--coordinator_address (or --distributed), as for
training; every host evaluates its rows of each batch, the outputs are gathered once at the
end, and process 0 alone prints and writes the report, predictions and overlays. The episodes
.npz and predictions formats are described in evaluation/pairs.py (EPISODE_KEYS_DOC) and
evaluation/predictions.py.

The model's config comes from the checkpoint, parsed once (`loading.load`), and its input
side is passed to the pipeline and the Evaluator; the run config is never rewritten.
"""
from __future__ import annotations

import os

import jax
from absl import flags, logging

from capenext_jax import cli, loading
from capenext_jax.device import partition
from capenext_jax.device.step import make_predict_step, matmul_precision
from capenext_jax.evaluation import pairs as pairs_lib
from capenext_jax.evaluation import report as report_lib
from capenext_jax.evaluation.evaluator import Evaluator
from capenext_jax.evaluation.predict_fn import predict_fn
from capenext_jax.evaluation.visualize import write_overlays
from capenext_jax.mp100.text_variants import apply_text_options, description_table
from capenext_jax.progress import Progress
from capenext_jax.runtime import import_tensorflow_quietly

DEFAULT_CONFIG = 'synthetic'
FLAGS = flags.FLAGS


def define_flags(prog: str) -> None:
  """The program's flags (once per process), all of them listed by --help."""
  cli.define_config_flag(prog, DEFAULT_CONFIG, 'config (data, mesh, batch size); a workdir '
                         'brings its model and data. ' + cli.CONFIG_HELP)
  flags.DEFINE_string('checkpoint', None, 'train workdir, export, or official .pth/.npz')
  flags.DEFINE_integer('step', None, 'checkpoint step of a workdir (default: latest)',
                       lower_bound=0)
  flags.DEFINE_string('annotations', None, 'MP-100-style json (val or test split file)')
  flags.DEFINE_string('image_root', None, 'image folder for --annotations')
  flags.DEFINE_enum('split', 'test', ['val', 'test'], 'config split when no --annotations')
  flags.DEFINE_integer('shots', None, '1 or 5 (default: the config)', lower_bound=1)
  flags.DEFINE_integer('num_episodes', None, 'episodes per category (official: test 200, '
                       'val 100)', lower_bound=1)
  flags.DEFINE_integer('num_queries', None, 'queries per episode (official: 15)', lower_bound=1)
  flags.DEFINE_integer('batch_size', None, 'eval batch size (default: config.eval_batch_size)',
                       lower_bound=1)
  flags.DEFINE_string('export_episodes', None, 'write the pairs .npz here; no model, no images')
  flags.DEFINE_string('score_predictions', None, 'score this predictions json; no model')
  flags.DEFINE_string('predictions_out', None, 'also write our predictions in that format')
  flags.DEFINE_string('output', None, 'report JSON path')
  flags.DEFINE_integer('visualize', 0, 'write this many overlay PNGs per category (prediction '
                       'vs ground truth) to <report dir>/overlays', lower_bound=0)
  flags.DEFINE_string('descriptions', 'regular', 'keypoint descriptions: regular (the '
                      'official renaming), synonyms, typo, translate (the CapeX robustness '
                      'tables) or a JSON file mapping category id -> keypoint names')
  flags.DEFINE_enum('category_prompt', 'true', ['true', 'wrong'], 'wrong: "a photo of <name>" '
                    'names another category, drawn with --category_prompt_seed (the official '
                    'use_wrong_catName)')
  flags.DEFINE_integer('category_prompt_seed', 0, 'seed of the --category_prompt wrong draw')
  cli.define_distributed_flags()
  cli.show_in_help('config', 'checkpoint', 'step', 'annotations', 'image_root', 'split',
                   'shots', 'num_episodes', 'num_queries', 'batch_size', 'export_episodes',
                   'score_predictions', 'predictions_out', 'output', 'visualize',
                   'descriptions', 'category_prompt', 'category_prompt_seed', 'distributed',
                   'coordinator_address', 'num_processes', 'process_id')


def _flag(name: str, default):
  """A flag's value, or `default` when it was not given (0 is a value, not "not given")."""
  value = FLAGS[name].value
  return default if value is None else value


def protocol_and_files(config, data_config):
  """(EvalProtocol, annotations, image_root): the flags over `data_config`'s data section
  (a workdir's run config, else --config) and --config's eval batch size."""
  default = pairs_lib.EvalProtocol.from_config(data_config, FLAGS.split)
  protocol = pairs_lib.EvalProtocol(
      shots=_flag('shots', default.shots), num_episodes=_flag('num_episodes', default.num_episodes),
      num_queries=_flag('num_queries', default.num_queries),
      batch_size=_flag('batch_size', config.eval_batch_size))
  if FLAGS.annotations:
    return protocol, FLAGS.annotations, FLAGS.image_root or ''
  from data_pipeline.splits import data_files
  files = data_files(data_config, FLAGS.checkpoint or '.')
  return protocol, files[FLAGS.split], files['image_root']


def is_main_process() -> bool:
  """Process 0 writes everything (all processes hold the same gathered results)."""
  return jax.process_index() == 0


def report(scores, category_names, output, info):
  if not is_main_process():
    return
  report_lib.print_report(scores, category_names)
  report_lib.write_report(output, scores, category_names, info)
  print(f'wrote {output}')


def check_no_overwrite(annotations, outputs) -> None:
  """Before the work: no output (flag, path) is a file this run reads, or another output."""
  descriptions = FLAGS.descriptions if os.path.isfile(FLAGS.descriptions) else None
  cli.check_distinct_files(
      [('--annotations' if FLAGS.annotations else "the config's annotations", annotations),
       ('--checkpoint', FLAGS.checkpoint), ('--score_predictions', FLAGS.score_predictions),
       ('--descriptions', descriptions)], outputs)


def main(argv):
  del argv
  if FLAGS.verbosity < 1:   # orbax's INFO lines would drown the report (-v keeps them)
    logging.set_verbosity(logging.WARNING)
  cli.initialize_distributed()
  config = FLAGS.config
  run_config = None   # a workdir's config.json: its data section gives the defaults
  if FLAGS.checkpoint and loading.is_train_workdir(FLAGS.checkpoint):
    run_config = loading.read_run_config(FLAGS.checkpoint)
  data_config = run_config or config
  protocol, annotations, image_root = protocol_and_files(config, data_config)
  info = dict(annotations=annotations, shots=protocol.shots, num_episodes=protocol.num_episodes,
              num_queries=protocol.num_queries, checkpoint=FLAGS.checkpoint)

  if FLAGS.export_episodes:
    if not is_main_process():
      return
    cli.check_writable('--export_episodes', FLAGS.export_episodes)
    check_no_overwrite(annotations, [('--export_episodes', FLAGS.export_episodes)])
    n = pairs_lib.export_episodes(annotations, FLAGS.export_episodes, protocol)
    print(f'wrote {n} pairs to {FLAGS.export_episodes}')
    return
  if FLAGS.score_predictions:
    output = FLAGS.output or FLAGS.score_predictions + '.scores.json'
    cli.check_writable('--output', output)
    check_no_overwrite(annotations, [('--output', output)])
    pairs = pairs_lib.pairs_of_file(annotations, protocol)
    report(pairs.score_file(FLAGS.score_predictions), pairs.category_names, output,
           dict(info, predictions=FLAGS.score_predictions))
    return
  if not FLAGS.checkpoint:
    raise ValueError('--checkpoint is required (or --export_episodes / --score_predictions)')
  default = os.path.join(FLAGS.checkpoint if os.path.isdir(FLAGS.checkpoint) else '.',
                         f'eval_{os.path.splitext(os.path.basename(annotations))[0]}.json')
  output = FLAGS.output or default
  overlays = os.path.join(os.path.dirname(os.path.abspath(output)), 'overlays')
  cli.check_writable('--output', output)   # before the work, not after it
  cli.check_writable('--predictions_out', FLAGS.predictions_out)
  check_no_overwrite(annotations, [('--output', output),
                                   ('--predictions_out', FLAGS.predictions_out)])
  if FLAGS.visualize:
    cli.check_writable('overlays of --visualize', overlays, directory=True)
  if FLAGS.descriptions != 'regular':   # a bad name or file fails before the work
    description_table(FLAGS.descriptions)
  scores, category_names, text = run_model_eval(config, data_config, run_config, protocol,
                                                annotations, image_root, overlays)
  report(scores, category_names, output, dict(info, **text))


def run_model_eval(config, data_config, run_config, protocol, annotations, image_root, overlays):
  """(scores, category names, what the text tower was told) of the --checkpoint model on the
  official pairs; writes --predictions_out and --visualize overlays (into `overlays`) when
  asked. config: mesh, sharding and precision; data_config: the pipeline settings."""
  import_tensorflow_quietly()   # the eval data pipeline is tf.data (the `train` extra)
  from data_pipeline.splits import eval_split
  mesh = partition.make_mesh(config.mesh_shape)
  with jax.set_mesh(mesh):
    ckpt = loading.load(FLAGS.checkpoint, mesh=mesh, step=FLAGS.step, run_config=run_config)
  size = ckpt.config.image_size   # the model's input side: the pipeline's crops
  with jax.set_mesh(mesh), jax.default_matmul_precision(
      matmul_precision(config.precision, ckpt.config.dtype)):
    graphdef, state = loading.eval_state(
        ckpt, mesh, partition.rules_from_config(config.sharding_rules),
        config.get('fsdp_min_bytes', partition.FSDP_MIN_BYTES))
    data = eval_split(data_config, annotations, image_root, image_size=size)
    data.source.dataset, text = apply_text_options(
        data.dataset, FLAGS.descriptions, FLAGS.category_prompt, FLAGS.category_prompt_seed)
    evaluator = Evaluator(predict_fn(make_predict_step(graphdef, size), graphdef, data.dataset,
                                     mesh), data, protocol, mesh, image_size=size)
    progress = Progress(len(evaluator.pairs), 'eval', unit='pairs')
    # Every pair, gathered once from all processes (each ran its rows of every batch).
    pred = evaluator.predict(state, progress if is_main_process() else None)
  pairs = evaluator.pairs
  if FLAGS.predictions_out and is_main_process():
    pairs.write_predictions(FLAGS.predictions_out, pred)
  if FLAGS.visualize and is_main_process():
    paths = write_overlays(pred, pairs, data.dataset, overlays, FLAGS.visualize)
    print(f'wrote {len(paths)} overlays to {overlays}')
  return pairs.score(pred), pairs.category_names, text


def run(prog: str = 'capenext-eval') -> None:
  """The console command (and eval.py)."""
  cli.run_absl_program(prog, define_flags, main)

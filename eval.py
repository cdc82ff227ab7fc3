"""Evaluate CapeNext with the official MP-100 protocol, or export / score its episodes.

  eval.py --checkpoint runs/synthetic                       # a train.py workdir (orbax)
  eval.py --checkpoint export_dir --annotations test.json --image_root images/
  eval.py --checkpoint split1_epoch_200.pth --annotations mp100_split1_test.json ...
  eval.py --annotations mp100_split1_test.json --shots 1 --export_episodes episodes.npz
  eval.py --annotations mp100_split1_test.json --score_predictions preds.json

Without --annotations the config's test split is used (for a workdir: the one it trained
with). Prints a per-category table and writes JSON (--output, default <checkpoint or .>/
eval_<split>.json). The episodes .npz and predictions formats are described in
capenext_jax/evaluate.py (EPISODE_KEYS_DOC) and capenext_jax/predictions.py.
"""
import os
import pathlib

from absl import app, flags, logging
from ml_collections import config_flags

_HERE = os.path.dirname(os.path.abspath(__file__))
config_flags.DEFINE_config_file('config', os.path.join(_HERE, 'configs', 'synthetic.py'),
                                'config (data, mesh, batch size); a workdir brings its model')
flags.DEFINE_string('checkpoint', None, 'train.py workdir, export, or official .pth/.npz')
flags.DEFINE_integer('step', None, 'checkpoint step of a workdir (default: latest)')
flags.DEFINE_string('annotations', None, 'MP-100-style json (val or test split file)')
flags.DEFINE_string('image_root', None, 'image folder for --annotations')
flags.DEFINE_enum('split', 'test', ['val', 'test'], 'config split when no --annotations')
flags.DEFINE_integer('shots', None, '1 or 5 (default: the config)')
flags.DEFINE_integer('num_episodes', None, 'episodes per category (official: test 200, val 100)')
flags.DEFINE_integer('num_queries', None, 'queries per episode (official: 15)')
flags.DEFINE_integer('batch_size', None, 'eval batch size (default: config.eval_batch_size)')
flags.DEFINE_string('export_episodes', None, 'write the pairs .npz here; no model, no images')
flags.DEFINE_string('score_predictions', None, 'score this predictions json; no model')
flags.DEFINE_string('predictions_out', None, 'also write our predictions in that format')
flags.DEFINE_string('output', None, 'report JSON path')
flags.DEFINE_integer('visualize', 0, 'write this many overlay PNGs per category (prediction '
                     'vs ground truth) to <report dir>/overlays')
FLAGS = flags.FLAGS


def protocol(config):
  """(annotations, image_root, shots, episodes, queries) from the flags over the config."""
  from capenext_jax import experiment
  d = config.data
  shots = FLAGS.shots or d.shots
  episodes = FLAGS.num_episodes or (d.val_episodes if FLAGS.split == 'val' else d.test_episodes)
  if FLAGS.annotations:
    return FLAGS.annotations, FLAGS.image_root or '', shots, episodes, FLAGS.num_queries or d.num_queries
  files = experiment.data_files(config, FLAGS.checkpoint or '.')
  return files[FLAGS.split], files['image_root'], shots, episodes, FLAGS.num_queries or d.num_queries


def report(scores, annotations, output, info):
  from capenext_jax import report as report_lib
  from capenext_jax.mp100.annotations import load_annotations
  ds = load_annotations(annotations, '', drop_missing_images=False)
  names = {int(c): n for c, n in zip(ds.category_ids, ds.raw_category_names)}
  report_lib.print_report(scores, names)
  report_lib.write_report(output, scores, names, info)
  print(f'wrote {output}')


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  import ml_collections
  from capenext_jax import evaluate
  config = ml_collections.ConfigDict(FLAGS.config.to_dict())
  if FLAGS.checkpoint and evaluate.is_train_workdir(pathlib.Path(FLAGS.checkpoint)):
    saved = evaluate.load_train_config(FLAGS.checkpoint)
    config.data = saved.data
  annotations, image_root, shots, episodes, queries = protocol(config)
  info = dict(annotations=annotations, shots=shots, num_episodes=episodes,
              num_queries=queries, checkpoint=FLAGS.checkpoint)

  if FLAGS.export_episodes:
    n = evaluate.export_episodes(annotations, FLAGS.export_episodes, shots, episodes, queries)
    print(f'wrote {n} pairs to {FLAGS.export_episodes}')
    return
  if FLAGS.score_predictions:
    scores = evaluate.score_predictions_file(FLAGS.score_predictions, annotations, shots,
                                             episodes, queries)
    report(scores, annotations, FLAGS.output or FLAGS.score_predictions + '.scores.json',
           dict(info, predictions=FLAGS.score_predictions))
    return
  if not FLAGS.checkpoint:
    raise app.UsageError('--checkpoint is required (or --export_episodes / --score_predictions)')
  default = os.path.join(FLAGS.checkpoint if os.path.isdir(FLAGS.checkpoint) else '.',
                         f'eval_{os.path.splitext(os.path.basename(annotations))[0]}.json')
  output = FLAGS.output or default
  overlays = os.path.join(os.path.dirname(os.path.abspath(output)), 'overlays')
  scores = run_model_eval(config, annotations, image_root, shots, episodes, queries, overlays)
  report(scores, annotations, output, info)


def run_model_eval(config, annotations, image_root, shots, episodes, queries, overlays):
  """Scores of the --checkpoint model on the official pairs; writes --predictions_out and
  --visualize overlays (into `overlays`) when asked."""
  import jax
  from capenext_jax import evaluate, experiment
  from capenext_jax.training import partition
  from data_pipeline.pipeline import json_source
  config.data.shots, config.data.num_queries = shots, queries
  config.data.val_episodes = config.data.test_episodes = episodes
  if FLAGS.batch_size:
    config.eval_batch_size = FLAGS.batch_size
  experiment.set_precision(config)
  mesh = partition.make_mesh(config.mesh_shape)
  with jax.set_mesh(mesh):
    graphdef, state, config = evaluate.load_for_eval(FLAGS.checkpoint, config, mesh,
                                                     step=FLAGS.step)
    source = json_source(annotations, image_root, drop_missing_images=False,
                         on_bad_image=config.data.on_bad_image)
    cache = experiment.text_cache(graphdef, state, source.dataset, mesh)
    step = evaluate.make_eval_step(
        graphdef, experiment.make_forward(cache, config.model.swin.img_size))
    pred, arrays = evaluate.predict_pairs(step, state, source, config, mesh, 'test')
  if FLAGS.predictions_out:
    evaluate.write_predictions(FLAGS.predictions_out, pred, arrays)
  if FLAGS.visualize and jax.process_index() == 0:
    paths = evaluate.write_overlays(pred, arrays, source.dataset, overlays, FLAGS.visualize)
    print(f'wrote {len(paths)} overlays to {overlays}')
  return evaluate.score(pred, arrays)


if __name__ == '__main__':
  from capenext_jax.runtime import tune_allocator
  tune_allocator()
  app.run(main)

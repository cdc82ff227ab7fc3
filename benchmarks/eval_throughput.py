"""Evaluation throughput (pairs/s) of the real eval path on mp100_mini, random weights.

Times `Evaluator.predict`: the host pipeline (episode arrays, image decode + warp in
tf.data), sharded batches, the jitted eval step and the mapping back to image px, exactly as
eval.py runs it. The first pass compiles and is reported apart; the timed passes re-run the
same pairs. Prints one JSON line per measurement.

usage: python benchmarks/eval_throughput.py [--model tiny|full|both] [--batch 8]
         [--episodes 4] [--repeats 2] [--data ../shared/data/mp100_mini]
"""
import argparse
import json
import os
import platform
import sys
import time

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The repo root first: this folder's data_pipeline.py would shadow the data_pipeline package.
sys.path.insert(0, _REPO)

import jax  # noqa: E402

from capenext_jax.evaluation.evaluator import Evaluator  # noqa: E402
from capenext_jax.evaluation.pairs import EvalProtocol  # noqa: E402
from capenext_jax.models.capenext import image_size_of  # noqa: E402
from capenext_jax.runtime import tune_allocator  # noqa: E402
from capenext_jax.training import init, partition, schedule  # noqa: E402
from configs import mp100  # noqa: E402
from data_pipeline.splits import eval_split  # noqa: E402
MODELS = {'tiny': 'runlocal', 'full': 'backbone=swinv2_t'}


def eval_config(model: str, batch: int, episodes: int):
  """configs/mp100.py for `model` ('tiny': runlocal, 'full': the headline sizes), 1 shot,
  1 query per episode (mp100_mini test categories have 2 instances)."""
  c = mp100.get_config(MODELS[model])
  c.eval_batch_size = batch
  c.data.shots, c.data.num_queries, c.data.test_episodes = 1, 1, episodes
  return c


def measure(model: str, annotations: str, image_root: str, batch: int, episodes: int,
            repeats: int) -> list[dict]:
  """[compile pass, timed pass...] records of `Evaluator.predict` on the annotation file."""
  c = eval_config(model, batch, episodes)
  mesh = partition.make_mesh(c.mesh_shape)
  with jax.set_mesh(mesh), jax.default_matmul_precision(c.precision):
    t0 = time.perf_counter()
    tx = schedule.make_optimizer(c.optim, 1)
    graphdef, state, _ = init.init_state(c, tx, mesh)
    state = state.replace(opt_state=())   # eval needs no optimizer state
    evaluator = Evaluator(graphdef, eval_split(c, annotations, image_root),
                          EvalProtocol.from_config(c, 'test'), mesh,
                          image_size=image_size_of(c.model))
    setup_s = time.perf_counter() - t0
    out = []
    for i in range(repeats + 1):
      t0 = time.perf_counter()
      pred = evaluator.predict(state)
      seconds = time.perf_counter() - t0
      out.append(dict(benchmark='eval_throughput', model=model,
                      image_size=image_size_of(c.model), run='compile' if i == 0 else 'timed',
                      pairs=len(pred), batch=batch, seconds=round(seconds, 3),
                      pairs_per_s=round(len(pred) / seconds, 2),
                      setup_s=round(setup_s, 1), device=str(jax.devices()[0].platform),
                      devices=jax.device_count(), host=platform.node()))
  return out


def main():
  p = argparse.ArgumentParser()
  p.add_argument('--model', choices=('tiny', 'full', 'both'), default='both')
  p.add_argument('--batch', type=int, default=8)
  p.add_argument('--episodes', type=int, default=4, help='per category (4 test categories)')
  p.add_argument('--full_episodes', type=int, default=2, help='episodes for the full model')
  p.add_argument('--repeats', type=int, default=2)
  p.add_argument('--data', default=os.path.join(os.path.dirname(_REPO), 'shared', 'data',
                                                'mp100_mini'))
  args = p.parse_args()
  annotations = os.path.join(args.data, 'annotations', 'mini_test.json')
  for model in (('tiny', 'full') if args.model == 'both' else (args.model,)):
    episodes = args.full_episodes if model == 'full' else args.episodes
    for record in measure(model, annotations, os.path.join(args.data, 'images'), args.batch,
                          episodes, args.repeats):
      print(json.dumps(record), flush=True)


if __name__ == '__main__':
  tune_allocator()
  main()

"""The official evaluation (spec section 6): pairs, batched sharded inference, scores.

* `predict_pairs`: every official pair of a split through the jitted eval step (batches
  sharded over the mesh, the last one padded and masked), mapped back to original-image px.
* `score`: PCK@{0.05..0.25}, mPCK, NME, AUC, EPE with the official per-instance definitions,
  overall and per category.
* `export_episodes` / `score_predictions_file`: the same pairs and protocol with no model
  and no images, so other methods can be compared on exactly our pairs.
* `load_for_eval`: an orbax train checkpoint (a train.py workdir), an exported params
  directory / file, or an official `.pth` / `.npz` -> (graphdef, state on the mesh, config).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import jax
import ml_collections
import numpy as np
from flax import nnx

from capenext_jax import experiment, metrics, predictions
from capenext_jax.training import partition, step as step_lib
from capenext_jax.training.state import TrainState
from capenext_jax.mp100 import episodes as ep
from capenext_jax.mp100.annotations import MP100Dataset, load_annotations

EPISODE_KEYS_DOC = """Episodes .npz (one row per evaluation pair, official order):
  support_ann_ids int64 [N, k]   support annotation ids (k = shots)
  query_ann_id    int64 [N]      query annotation id
  bbox_thr        float64 [N]    max(w, h) of the query's cleaned bbox (PCK normaliser)
  mask            bool [N, 100]  query and every support visible (raw v > 0); padded slots False
  pairs           int64 [N, k+1] db indices (support..., query) in the json's annotation order
  category_id     int64 [N]      the query's category id
  gt_keypoints    float64 [N, 100, 2]  query keypoints in original-image px (padded 0)
  num_keypoints   int32 [N]      the category's K
"""


# ----------------------------------------------------------------------------- episodes
def episode_arrays(dataset: MP100Dataset, shots: int, num_episodes: int,
                   num_queries: int) -> dict[str, np.ndarray]:
  """The official pairs and what scoring needs (the layout of EPISODE_KEYS_DOC)."""
  e = ep.make_eval_episodes(dataset, shots, num_episodes, num_queries)
  q = e['pairs'][:, -1]
  return dict(support_ann_ids=e['support_ann_ids'], query_ann_id=e['query_ann_id'],
              bbox_thr=e['bbox_thr'], mask=e['mask'], pairs=e['pairs'],
              category_id=dataset.category_ids[dataset.category_index[q]].astype(np.int64),
              gt_keypoints=dataset.joints[q].astype(np.float64),
              num_keypoints=dataset.num_keypoints[q].astype(np.int32))


def export_episodes(annotations: str, path: str, shots: int, num_episodes: int,
                    num_queries: int) -> int:
  """Write the episodes .npz of `annotations` (no images read). Returns the pair count."""
  dataset = load_annotations(annotations, '', drop_missing_images=False)
  arrays = episode_arrays(dataset, shots, num_episodes, num_queries)
  np.savez(path, **arrays)
  return len(arrays['query_ann_id'])


def eval_pairs(arrays: dict[str, np.ndarray]) -> list[predictions.EvalPair]:
  """`episode_arrays` as the EvalPair records `predictions.score_predictions_file` takes."""
  return [predictions.EvalPair(
      support_ann_ids=tuple(int(s) for s in arrays['support_ann_ids'][i]),
      query_ann_id=int(arrays['query_ann_id'][i]), category_id=int(arrays['category_id'][i]),
      gt_keypoints=arrays['gt_keypoints'][i, :k], mask=arrays['mask'][i, :k],
      bbox_thr=float(arrays['bbox_thr'][i]))
      for i, k in enumerate(arrays['num_keypoints'])]


def score_predictions_file(predictions_path: str, annotations: str, shots: int,
                           num_episodes: int, num_queries: int) -> dict:
  """Score a predictions file (see `capenext_jax.predictions`) on the official pairs."""
  dataset = load_annotations(annotations, '', drop_missing_images=False)
  pairs = eval_pairs(episode_arrays(dataset, shots, num_episodes, num_queries))
  return predictions.score_predictions_file(predictions_path, pairs)


def score(pred: np.ndarray, arrays: dict[str, np.ndarray]) -> dict:
  """Official scores of predictions [N, 100, 2] in original-image px, aligned with `arrays`."""
  return metrics.score_pairs(pred, arrays['gt_keypoints'], arrays['mask'], arrays['bbox_thr'],
                             category_ids=arrays['category_id'])


def write_predictions(path: str, pred: np.ndarray, arrays: dict[str, np.ndarray]) -> None:
  """Our predictions in the documented file format (K keypoints per pair)."""
  predictions.write_predictions(path, [predictions.PredictionRecord(
      support_ann_ids=tuple(int(s) for s in arrays['support_ann_ids'][i]),
      query_ann_id=int(arrays['query_ann_id'][i]), keypoints=pred[i, :k],
      category_id=int(arrays['category_id'][i]))
      for i, k in enumerate(arrays['num_keypoints'])])


# ----------------------------------------------------------------------------- inference
def make_eval_step(graphdef: nnx.GraphDef, forward):
  """jitted `(state, batch) -> {'keypoints' [B,100,2] in [0,1], 'pair_index', 'valid'}`.

  pair_index / valid ride along through the device so the gathered output of every host
  carries its own bookkeeping (hosts hold different rows).
  """

  def reduced(model, batch):
    return {'keypoints': forward(model, batch)['keypoints'][-1],
            'pair_index': batch['pair_index'], 'valid': batch['valid']}

  return step_lib.make_eval_step(graphdef, forward=reduced)


def predict_pairs(eval_step, state: TrainState, source, config: ml_collections.ConfigDict,
                  mesh, split: str) -> tuple[np.ndarray, dict[str, np.ndarray]]:
  """Predictions of every official pair of `source` in original-image px, float32 [N, 100, 2],
  and the pairs' `episode_arrays`. split: 'val' or 'test' (sets the episode count)."""
  from data_pipeline.pipeline import make_eval_iterator
  d = config.data
  num_episodes = d.val_episodes if split == 'val' else d.test_episodes
  arrays = episode_arrays(source.dataset, d.shots, num_episodes, d.num_queries)
  batches = make_eval_iterator(source, config.eval_batch_size,
                               experiment.pipeline_config(config, train=False),
                               num_episodes=num_episodes, num_queries=d.num_queries)
  keys = experiment.DEVICE_KEYS + ('pair_index', 'valid')
  outputs = [eval_step(state, experiment.device_batch(b, mesh, keys)) for b in batches]
  out = experiment.to_host(outputs)   # one transfer at the end: no per-batch host sync
  valid = np.concatenate([o['valid'] for o in out])
  index = np.concatenate([o['pair_index'] for o in out])[valid]
  crop = np.concatenate([o['keypoints'] for o in out])[valid]
  if not np.array_equal(np.sort(index), np.arange(len(arrays['query_ann_id']))):
    raise RuntimeError('eval batches do not cover every pair exactly once')
  size = config.model.swin.img_size
  q = arrays['pairs'][:, -1]
  pred = np.empty((len(index), crop.shape[1], 2), np.float32)
  pred[index] = metrics.transform_preds(crop * size, source.dataset.center[q[index]],
                                        source.dataset.scale[q[index]], size)
  return pred, arrays


def write_overlays(pred: np.ndarray, arrays: dict[str, np.ndarray], dataset: MP100Dataset,
                   out_dir: str, per_category: int) -> list[str]:
  """PNG overlays (prediction dots, ground-truth rings) of the first `per_category` pairs of
  every category, named `<category>_<pair>.png` in `out_dir`. Returns the paths written.

  pred: [N, 100, 2] original-image px, aligned with `arrays` (see `predict_pairs`).
  """
  from capenext_jax.visualize import draw_overlay
  from capenext_jax.mp100.images import load_rgb
  os.makedirs(out_dir, exist_ok=True)
  q = arrays['pairs'][:, -1]
  paths = []
  for c in np.unique(arrays['category_id']):
    for i in np.flatnonzero(arrays['category_id'] == c)[:per_category]:
      row = dataset.category_index[q[i]]
      k = int(arrays['num_keypoints'][i])
      photo = load_rgb(dataset.image_path[q[i]], tuple(dataset.image_size[q[i]]))
      image = draw_overlay(photo, pred[i, :k],
                           dataset.skeletons[row], dataset.descriptions[row][:k],
                           gt=arrays['gt_keypoints'][i, :k], gt_visible=arrays['mask'][i, :k])
      name = dataset.raw_category_names[row].replace('/', '_').replace(' ', '_')
      paths.append(os.path.join(out_dir, f'{name}_{i}.png'))
      image.save(paths[-1])
  return paths


def pck_at(scores: dict, thr: float = 0.2) -> float:
  return float(scores[f'PCK@{thr}'])


# ----------------------------------------------------------------------------- loading
def is_train_workdir(path: Path) -> bool:
  return (path / 'config.json').is_file() and (path / 'checkpoints').is_dir()


def load_train_config(workdir: str | Path) -> ml_collections.ConfigDict:
  """The ConfigDict train.py saved as `<workdir>/config.json`."""
  return ml_collections.ConfigDict(json.loads((Path(workdir) / 'config.json').read_text()))


def load_for_eval(path: str, config: ml_collections.ConfigDict, mesh, *, step: int | None = None
                  ) -> tuple[nnx.GraphDef, TrainState, ml_collections.ConfigDict]:
  """(graphdef, state on `mesh`, config whose `model` matches the weights).

  path: a train.py workdir (its orbax checkpoint at `step`, default the latest), an export
  (directory / params file) or an official checkpoint. `config.model` is replaced by the
  weights' own sizes (the workdir's config.json, or the export / official model config).
  """
  from capenext_jax.training import checkpoint, schedule
  from capenext_jax.training.state import abstract_state
  p = Path(path)
  if is_train_workdir(p):
    saved = load_train_config(p)
    config = ml_collections.ConfigDict(config.to_dict())
    config.model, config.seed, config.init = saved.model, saved.seed, saved.init
    tx = schedule.make_optimizer(saved.optim, 1)
    graphdef, state, shardings = experiment.init_state(config, tx, mesh)
    ckpt = checkpoint.Checkpointer(str(p.absolute() / 'checkpoints'))
    state, _ = ckpt.restore(abstract_state(state, shardings).replace(frozen=state.frozen),
                            step=step)
    ckpt.close()
    return graphdef, state, config
  from capenext_jax.predict import load_model
  model = load_model(p)
  graphdef, trainable, frozen = partition.split_model(model)
  config = ml_collections.ConfigDict(config.to_dict())
  config.model = ml_collections.ConfigDict(model.config.to_dict())
  state = TrainState(trainable=trainable, frozen=frozen, opt_state=(), step=np.int32(0),
                     rng=np.zeros(2, np.uint32))
  shardings = partition.param_shardings(state, mesh, experiment.sharding_rules(config))
  return graphdef, jax.device_put(state, shardings), config

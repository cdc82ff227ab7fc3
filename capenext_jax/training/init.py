"""What a run builds before its first step: the train state of a run config, created already
sharded on the mesh, and its jitted train step (neither imports TensorFlow or clu)."""
from __future__ import annotations

import functools

import jax
import ml_collections
from flax import nnx

from capenext_jax import losses
from capenext_jax.convert.pretrained import init_from_pretrained
from capenext_jax.device import forward as forward_lib
from capenext_jax.device import partition, state as state_lib
from capenext_jax.device import step as step_lib
from capenext_jax.models.capenext import CapeNext, CapeNextConfig, abstract_model
from capenext_jax.models.layers import init_rngs


def check_pretrained(config: ml_collections.ConfigDict) -> None:
  """A training run starts from the pretrained backbone and CLIP (the official recipe), or says
  that it does not (`init.from_scratch`); ValueError naming the empty field otherwise."""
  if config.init.get('from_scratch', False):
    return
  backbone_path, clip_path = pretrained_paths(config)
  missing = [f'init.{k}' for k, v in (('backbone_path', backbone_path), ('clip_path', clip_path))
             if not v]
  if missing:
    raise ValueError(f'config.{" and config.".join(missing)} empty: the recipe starts from '
                     f'the ImageNet backbone and OpenAI CLIP weights (docs/MODEL.md §4); give '
                     f'their files (--config.{missing[0]}=...), or set '
                     f'--config.init.from_scratch=True to train from random weights')


def init_state(config: ml_collections.ConfigDict, optimizer, mesh, *,
               model_config: CapeNextConfig | None = None
               ) -> tuple[nnx.GraphDef, state_lib.TrainState, state_lib.TrainState]:
  """(graphdef, state, shardings) of `config.model`, seeded by `config.seed`.

  model_config: `config.model` as the program parsed it (parsed here when not given).

  The init runs under jit with `out_shardings`, so no device ever holds a full unsharded copy
  (abstract model -> shardings -> jit(init)). Pretrained backbone / CLIP weights, when configured
  (`config.init`), are then read on the host and placed with the same shardings.
  """
  if model_config is None:
    model_config = CapeNextConfig.from_dict(config.model.to_dict())

  def init(rng, param_shardings=None):
    model = CapeNext(model_config, rngs=init_rngs(config.seed))
    return state_lib.init_train_state(model, optimizer, rng, shardings=param_shardings)[1]

  rng = jax.random.PRNGKey(config.seed)
  graphdef, abstract = state_lib.abstract_train_state(abstract_model(model_config), optimizer,
                                                      rng)
  shardings = state_lib.state_shardings(
      abstract, optimizer, mesh, partition.rules_from_config(config.sharding_rules),
      config.get('fsdp_min_bytes', partition.FSDP_MIN_BYTES))
  # The optimizer's buffers are laid out for the params' shardings on this mesh (device/flat.py).
  state = jax.jit(functools.partial(init, param_shardings=shardings.trainable),
                  out_shardings=shardings)(rng)
  backbone_path, clip_path = pretrained_paths(config)
  if backbone_path or clip_path:
    model = nnx.merge(graphdef, *partition.to_host((state.trainable, state.batch_stats,
                                                    state.frozen)))
    init_from_pretrained(model, backbone_path, clip_path)
    _, trainable, batch_stats, frozen = partition.split_model(model)
    state = state.replace(trainable=jax.device_put(trainable, shardings.trainable),
                          batch_stats=jax.device_put(batch_stats, shardings.batch_stats),
                          frozen=jax.device_put(frozen, shardings.frozen))
  return graphdef, state, shardings


def pretrained_paths(config: ml_collections.ConfigDict) -> tuple[str | None, str | None]:
  """(backbone, CLIP) weight files of `config.init` (None where unset). Run configs written
  before backbones had a choice name the backbone file `swin_path`."""
  init = config.init
  return (init.get('backbone_path') or init.get('swin_path') or None,
          init.get('clip_path') or None)


def build_train_step(config: ml_collections.ConfigDict, size: int, graphdef, optimizer,
                     shardings):
  """The jitted, state-donating `train_step(state, batch, text_cache)` of `config` (model
  input side `size`): text from the cache (`replicated_text_cache`), official losses."""
  loss_fn = losses.batch_loss_fn(size, config.data.get('heatmap_size', 0))
  return step_lib.make_train_step(graphdef, loss_fn, optimizer,
                                  forward=forward_lib.make_forward(size),
                                  shardings=shardings)

"""The train state of a run config, created already sharded on the mesh."""
from __future__ import annotations

import jax
import ml_collections
from flax import nnx

from capenext_jax.models.capenext import CapeNext, CapeNextConfig
from capenext_jax.training import partition, state as state_lib


def check_pretrained(config: ml_collections.ConfigDict) -> None:
  """A training run starts from the pretrained backbone and CLIP (the official recipe), or says
  that it does not (`init.from_scratch`); ValueError naming the empty field otherwise."""
  if config.init.get('from_scratch', False):
    return
  missing = [f'init.{k}' for k in ('swin_path', 'clip_path') if not config.init.get(k)]
  if missing:
    raise ValueError(f'config.{" and config.".join(missing)} empty: the recipe starts from '
                     f'ImageNet Swin V2 and OpenAI CLIP weights (docs/MODEL.md §4); give '
                     f'their files (--config.{missing[0]}=...), or set '
                     f'--config.init.from_scratch=True to train from random weights')


def init_state(config: ml_collections.ConfigDict, optimizer, mesh
               ) -> tuple[nnx.GraphDef, state_lib.TrainState, state_lib.TrainState]:
  """(graphdef, state, shardings) of `config.model`, seeded by `config.seed`.

  The init runs under jit with `out_shardings`, so no device ever holds a full unsharded copy
  (eval_shape -> shardings -> jit(init)). Pretrained Swin / CLIP weights, when configured
  (`config.init`), are then read on the host and placed with the same shardings.
  """
  model_config = CapeNextConfig.from_dict(config.model.to_dict())

  def init(rng):
    model = CapeNext(model_config, rngs=nnx.Rngs(config.seed))
    return state_lib.init_train_state(model, optimizer, rng)[1]

  rng = jax.random.PRNGKey(config.seed)
  graphdef, _, _ = partition.split_model(nnx.eval_shape(
      lambda: CapeNext(model_config, rngs=nnx.Rngs(config.seed))))
  abstract = jax.eval_shape(init, rng)
  shardings = state_lib.state_shardings(abstract, optimizer, mesh,
                                        partition.rules_from_config(config.sharding_rules))
  state = jax.jit(init, out_shardings=shardings)(rng)
  if config.init.swin_path or config.init.clip_path:
    from capenext_jax.loading import init_from_pretrained
    model = nnx.merge(graphdef, *partition.to_host((state.trainable, state.frozen)))
    init_from_pretrained(model, config.init.swin_path or None, config.init.clip_path or None)
    _, trainable, frozen = partition.split_model(model)
    state = state.replace(trainable=jax.device_put(trainable, shardings.trainable),
                          frozen=jax.device_put(frozen, shardings.frozen))
  return graphdef, state, shardings

"""The train state: everything a jitted step reads and writes, as one pytree.

The graphdef (static structure of the model) is kept outside: `make_train_step` closes over
it, so the state holds arrays only and checkpoints/shards leaf by leaf.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from capenext_jax.device import flat as flat_lib, partition

# The fields a checkpoint holds. `frozen` is rebuilt by the run's init (pretrained CLIP and
# RNG streams), so it is not saved again every time.
CHECKPOINTED = ('trainable', 'batch_stats', 'opt_state', 'step', 'rng')


@struct.dataclass
class TrainState:
  trainable: Any       # pure nested dict of the trainable params (differentiated, optimised)
  batch_stats: Any     # pure nested dict of BatchNorm running statistics (set by the forward)
  frozen: Any          # pure nested dict of everything else: CLIP params, RNG streams
  opt_state: Any       # optax state over `trainable` only, its moments as `flat.Buffers`
                       # (per leaf with init_train_state(flat=False); per leaf in checkpoints)
  step: jax.Array      # int32 [], global iteration = number of updates applied
  rng: jax.Array       # uint32 [2], raw base key; step i uses fold_in(rng, i)


def init_train_state(model: nnx.Module, optimizer: optax.GradientTransformation, rng: jax.Array,
                     trainable: nnx.filterlib.Filter = partition.trainable_filter(), *,
                     shardings: Any = None, flat: bool = True
                     ) -> tuple[nnx.GraphDef, TrainState]:
  """Split `model` and build the optimizer state over its trainable part (host/default device).

  rng: raw uint32 [2] key (`jax.random.PRNGKey(seed)`), kept raw so it checkpoints as data.
  shardings: the trainable params' NamedShardings (`state_shardings(...).trainable`) when the
    state is created for a mesh: the moments' buffers follow them (`flat.Layout`); None: laid
    out as on one device. flat=False: optax's per-leaf state (for optimizers that are not
    elementwise, see flat.py).
  """
  graphdef, train_params, batch_stats, frozen = partition.split_model(model, trainable)
  opt_state = (flat_lib.init(optimizer, train_params, shardings) if flat
               else optimizer.init(train_params))
  state = TrainState(trainable=train_params, batch_stats=batch_stats, frozen=frozen,
                     opt_state=opt_state,
                     step=jnp.zeros((), jnp.int32), rng=jnp.asarray(rng, jnp.uint32))
  return graphdef, state


def abstract_train_state(model: nnx.Module, optimizer: optax.GradientTransformation,
                         rng: jax.Array) -> tuple[nnx.GraphDef, TrainState]:
  """(graphdef, TrainState of ShapeDtypeStructs) that `init_train_state(model, optimizer, rng)`
  gives, for a model whose arrays are ShapeDtypeStructs (`models.capenext.abstract_model`):
  only the optimizer's init is traced, nothing is computed."""
  graphdef, *parts = partition.split_model(model)
  state = jax.eval_shape(lambda parts, rng: init_train_state(
      nnx.merge(graphdef, *parts), optimizer, rng)[1], parts, rng)
  return graphdef, state


def state_shardings(state: TrainState, optimizer: optax.GradientTransformation, mesh: Mesh,
                    rules: partition.Rules = (),
                    min_shard_bytes: int = partition.FSDP_MIN_BYTES) -> TrainState:
  """A TrainState of NamedShardings (state may be abstract); step and rng are replicated.
  rules, min_shard_bytes: as `partition.param_shardings`.

  An optimizer state in buffers gets the shardings of the buffers laid out for this mesh
  (`flat.Layout.of(trainable, its shardings)`), which may differ from `state`'s own layout:
  `place` moves a state into them; `init_train_state(shardings=...)` creates it so."""
  replicated = NamedSharding(mesh, P())
  shard = lambda tree: partition.param_shardings(tree, mesh, rules, min_shard_bytes)  # noqa: E731
  train = shard(state.trainable)
  opt_shardings = (partition.opt_state_shardings if flat_lib.layout_of(state.opt_state) is None
                   else flat_lib.opt_state_shardings)
  return TrainState(
      trainable=train,
      batch_stats=shard(state.batch_stats),
      frozen=shard(state.frozen),
      opt_state=opt_shardings(optimizer, state.trainable, train),
      step=replicated, rng=replicated)


def place(state: TrainState, shardings: TrainState) -> TrainState:
  """`state` (host or device arrays) on the mesh of `shardings`, its optimizer state moved
  into their layout (`flat.put`)."""
  return jax.device_put(state.replace(opt_state=()), shardings.replace(opt_state=())).replace(
      opt_state=flat_lib.put(state.opt_state, shardings.opt_state))


def abstract_state(state: TrainState, shardings: TrainState) -> TrainState:
  """ShapeDtypeStructs carrying the target shardings (what a checkpoint restores into)."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      state, shardings)


def merge_model(graphdef: nnx.GraphDef, state: TrainState, trainable: Any = None) -> nnx.Module:
  """The model a train state holds (with `trainable` in place of its own when given)."""
  return nnx.merge(graphdef, state.trainable if trainable is None else trainable,
                   state.batch_stats, state.frozen)

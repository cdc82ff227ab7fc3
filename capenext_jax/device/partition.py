"""Which parameters train, and where every array lives on the device mesh.

* Trainable = every `nnx.Param` whose path has no frozen key ('clip' by default: the whole
  CLIP model is frozen, docs/MODEL.md §4). BatchNorm statistics (`nnx.BatchStat`) are their own
  part: written by the forward pass, not differentiated. Everything else (frozen params, RNG
  streams) is "frozen": never differentiated and given no optimizer state.
* The mesh has axes ('data', 'fsdp'). The batch is split over both axes together; params
  follow big_vision-style rules `(regex over the '/'-joined path, spec)`, first match wins.
  A spec is a `PartitionSpec` or the string 'fsdp': shard the largest dim divisible by the
  fsdp axis size (replicate when there is none, the fsdp axis has size 1, or the tensor is
  under `min_shard_bytes`, 4 MiB by default as big_vision: sharding small tensors saves
  little memory and costs a collective each). An implicit final rule applies 'fsdp' to
  everything.
* FSDP in the steps: parameters rest sharded (with their Adam moments) and are gathered where
  the step uses them (`gather`); activations keep the batch split over ('data', 'fsdp')
  (`constrain_batch`). Together they leave no all-to-all of activations in the compiled step
  (tests/test_train.py checks its HLO): left alone, GSPMD split activations like the weights
  they met and moved them back and forth.
"""
from __future__ import annotations

import functools
import math
import re
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ('data', 'fsdp')
BATCH_SPEC = P(MESH_AXES)
FSDP_MIN_BYTES = 4 * 2**20   # big_vision's fsdp threshold (4 MiB)
Rules = Sequence[tuple[str, 'P | str']]
PyTree = Any


def trainable_filter(frozen_keys: Sequence[str] = ('clip',)) -> nnx.filterlib.Filter:
  """`nnx.Param` whose path contains none of `frozen_keys` (as whole path elements)."""
  return nnx.All(nnx.Param, *(nnx.Not(nnx.PathContains(k)) for k in frozen_keys))


def split_model(model: nnx.Module, trainable: nnx.filterlib.Filter = trainable_filter()
                ) -> tuple[nnx.GraphDef, dict, dict, dict]:
  """`model -> (graphdef, trainable, batch_stats, frozen)`, the states as pure nested dicts.

  batch_stats: every `nnx.BatchStat` (BatchNorm running statistics): updated by the forward
  pass in training mode, never by the optimizer. frozen: everything else (frozen params, RNG
  streams). Pure dicts (no `Variable` wrappers) keep optimizer states and checkpoints plain;
  `nnx.merge(graphdef, trainable, batch_stats, frozen)` rebuilds the model.
  """
  graphdef, train_state, stats, frozen_state = nnx.split(model, trainable, nnx.BatchStat, ...)
  return (graphdef, nnx.to_pure_dict(train_state), nnx.to_pure_dict(stats),
          nnx.to_pure_dict(frozen_state))


def make_mesh(mesh_shape: Mapping[str, int], devices: Sequence[jax.Device] | None = None
              ) -> Mesh:
  """A ('data', 'fsdp') mesh from e.g. `{'data': -1, 'fsdp': 1}` (-1: the remaining devices).

  Axes are `AxisType.Auto` (GSPMD propagation from the shardings we put on jit inputs and
  outputs); jax >= 0.7 made `Explicit` the `make_mesh` default, so it is spelled out.
  """
  if set(mesh_shape) - set(MESH_AXES):
    raise ValueError(f'mesh_shape axes {sorted(mesh_shape)} must be among {MESH_AXES}')
  devices = list(jax.devices() if devices is None else devices)
  sizes = [int(mesh_shape.get(a, 1)) for a in MESH_AXES]
  known = int(np.prod([s for s in sizes if s != -1]))
  if sizes.count(-1) > 1 or len(devices) % known:
    raise ValueError(f'mesh_shape {dict(mesh_shape)} does not fit {len(devices)} devices')
  sizes = [len(devices) // known if s == -1 else s for s in sizes]
  if int(np.prod(sizes)) != len(devices):
    raise ValueError(f'mesh_shape {dict(mesh_shape)} does not fit {len(devices)} devices')
  auto = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
  return jax.make_mesh(tuple(sizes), MESH_AXES, axis_types=auto, devices=devices)


def path_name(path: tuple) -> str:
  """A jax key path as the '/'-joined name the rules match, e.g. 'head/layers/0/kernel'."""
  return '/'.join(str(getattr(k, 'key', getattr(k, 'idx', getattr(k, 'name', k))))
                  for k in path)


def fsdp_spec(shape: Sequence[int], fsdp_size: int) -> P:
  """Shard the largest dim divisible by `fsdp_size` over 'fsdp' (first one on ties)."""
  dims = [d for d, n in enumerate(shape) if fsdp_size > 1 and n % fsdp_size == 0]
  if not dims:
    return P()
  best = max(dims, key=lambda d: shape[d])
  return P(*(('fsdp' if d == best else None) for d in range(len(shape))))


def param_shardings(params: PyTree, mesh: Mesh, rules: Rules = (),
                    min_shard_bytes: int = FSDP_MIN_BYTES) -> PyTree:
  """A NamedSharding per leaf of `params` (arrays or ShapeDtypeStructs) by the first rule;
  'fsdp' replicates leaves under `min_shard_bytes`."""
  compiled = [(re.compile(rx), spec) for rx, spec in rules]

  def one(path, x):
    name = path_name(path)
    spec = next((s for rx, s in compiled if rx.fullmatch(name)), 'fsdp')
    if spec == 'fsdp':
      small = math.prod(x.shape) * x.dtype.itemsize < min_shard_bytes
      spec = P() if small else fsdp_spec(x.shape, mesh.shape['fsdp'])
    return NamedSharding(mesh, spec)

  return jax.tree_util.tree_map_with_path(one, params)


def opt_state_shardings(optimizer: optax.GradientTransformation, params: PyTree,
                        shardings: PyTree) -> PyTree:
  """Optimizer-state shardings: moments follow their param, counters are replicated."""
  mesh = jax.tree.leaves(shardings)[0].mesh
  abstract = jax.eval_shape(optimizer.init, params)
  return optax.tree_map_params(optimizer, lambda _, s: s, abstract, shardings,
                               transform_non_params=lambda _: NamedSharding(mesh, P()))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) dim split over every device: ('data', 'fsdp') together."""
  return NamedSharding(mesh, BATCH_SPEC)


def constrain_batch(tree: PyTree) -> PyTree:
  """Every array of `tree` with its leading (batch) axis split over ('data', 'fsdp'): inside a
  jitted step under `jax.set_mesh`; the identity without that mesh."""
  return _constrain(tree, BATCH_SPEC)


def gather(tree: PyTree) -> PyTree:
  """Every array of `tree` replicated (FSDP's all-gather of the parameters a step uses; their
  gradients are summed over the batch and go back to the parameters' sharded layout): inside
  a jitted step under `jax.set_mesh`; the identity without that mesh."""
  return _constrain(tree, P())


def _constrain(tree: PyTree, spec: P) -> PyTree:
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or set(mesh.axis_names) != set(MESH_AXES):
    return tree
  return jax.tree.map(lambda x: jax.lax.with_sharding_constraint(x, spec), tree)


def check_batch_size(name: str, batch_size: int, mesh: Mesh) -> None:
  """ValueError naming `name` and the mesh unless `batch_size` splits evenly over its devices
  and its processes (checked before anything is compiled)."""
  devices, hosts = mesh.devices.size, jax.process_count()
  if not isinstance(batch_size, int) or batch_size < 1:
    raise ValueError(f'{name}={batch_size!r}: must be a positive integer')
  if batch_size % devices or batch_size % hosts:
    raise ValueError(f'{name}={batch_size} does not split over the {devices} devices of the mesh '
                     f'{dict(mesh.shape)} ({hosts} process(es)): use a multiple of {devices}')


def shard_batch(batch: PyTree, mesh: Mesh) -> PyTree:
  """Host-local numpy batch (this process's rows) -> global jax arrays split over the mesh."""
  sharding = batch_sharding(mesh)
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), batch)


def rules_from_config(config_rules: Sequence[tuple[str, Any]]) -> list[tuple[str, Any]]:
  """A config's `sharding_rules` (regex, 'fsdp' or a tuple of axis names / None per dim) with
  the tuples turned into PartitionSpecs."""
  return [(rx, spec if spec == 'fsdp' else P(*spec)) for rx, spec in config_rules]


def to_host(tree: PyTree) -> PyTree:
  """Global arrays -> host values on every process (gathered across hosts when there are
  several). Typed PRNG keys (the dropout streams) travel as their raw key data."""
  def gather(x):
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
      return jax.random.wrap_key_data(gather(jax.random.key_data(x)),
                                      impl=jax.random.key_impl(x))
    if jax.process_count() > 1:
      return multihost_utils.process_allgather(x, tiled=True)
    return jax.device_get(x)
  return jax.tree.map(gather, tree)


def gather_batches(batches: Sequence[Mapping[str, jax.Array]], mesh: Mesh
                   ) -> dict[str, np.ndarray]:
  """Per-batch outputs (each a dict of global arrays [B, ...] split over the batch axis, every
  batch with the same shapes) -> {key: host array [len(batches) * B, ...]} on every process.

  One collective, whatever the number of batches and keys: the batches are stacked on device
  and every leaf is packed into one int32 [batches, B, words] array that is all-gathered once
  (a gather per leaf per batch costs a cross-host round trip each). Leaves must be bool or of
  a 4-byte dtype (they travel bit for bit).
  """
  keys = sorted(batches[0])
  layout = []   # (key, dtype, shape of one row, words per row)
  for key in keys:
    x = batches[0][key]
    if x.dtype != jnp.bool_ and x.dtype.itemsize != 4:
      raise TypeError(f'gather_batches: output {key!r} is {x.dtype}; expected bool or a '
                      '4-byte dtype')
    layout.append((key, x.dtype, x.shape[1:], math.prod(x.shape[1:])))
  packed = np.asarray(_packer(mesh)([[b[k] for k in keys] for b in batches])
                      .addressable_data(0))
  rows, out, start = packed.reshape(-1, packed.shape[-1]), {}, 0
  for key, dtype, shape, words in layout:
    chunk = np.ascontiguousarray(rows[:, start:start + words])
    chunk = chunk.astype(bool) if dtype == jnp.bool_ else chunk.view(dtype)
    out[key], start = chunk.reshape(-1, *shape), start + words
  return out


def _pack_words(batches: list[list[jax.Array]]) -> jax.Array:
  """[[leaf [B, ...]] per batch] -> int32 [batches, B, words] (bools as 0 / 1)."""
  def words(x):
    x = x.astype(jnp.int32) if x.dtype == jnp.bool_ else jax.lax.bitcast_convert_type(
        x, jnp.int32)
    return x.reshape(x.shape[0], -1)
  return jnp.stack([jnp.concatenate([words(x) for x in leaves], axis=1) for leaves in batches])


@functools.cache
def _packer(mesh: Mesh):
  """`_pack_words` jitted to a replicated output: the one all-gather of `gather_batches`."""
  return jax.jit(_pack_words, out_shardings=NamedSharding(mesh, P()))

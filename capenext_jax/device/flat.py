"""The optimizer over a few large buffers instead of one array per trainable parameter.

The headline model has ~470 trainable arrays; Adam and the global gradient norm over them, leaf
by leaf, are hundreds of tiny kernels per step (issue 23). Here the trainable leaves are
grouped and each group is one contiguous buffer (`Layout`), so Adam's moments are a few
buffers and one update of each is one elementwise pass.

Layout (`Layout.of(params, shardings)`), groups by dtype and by how a leaf rests on the mesh:
* replicated leaves (every leaf without a mesh, on one device, or under the FSDP threshold),
  raveled and concatenated: one 1-D buffer per dtype, replicated;
* leaves whose dim k is split over mesh axes A into n shards: `moveaxis(leaf, k, 0).reshape(n,
  -1)` (row i = shard i) concatenated along axis 1: one [n, C] buffer per (dtype, A), split
  over A along its rows. Each device's rows are its own shards, so flattening and unflattening
  move nothing between devices (tests/test_training_step.py counts the collectives);
* a leaf split along several dims keeps a buffer of its own (its shape and spec).

Where the buffers live: `TrainState.opt_state` holds the moments as `Buffers` in the layout of
the run's mesh, so a step reads and writes each moment once (flattening mu and nu inside the
step instead would add a concatenation and a split of both every step: 32 more bytes per
float32 parameter, where the moments' own update moves 16).
Checkpoints keep them per leaf as before (the checkpointer applies `to_leaves` on save and
`relayout` on restore): the layout depends on the mesh (its fsdp size picks the rows and the
groups), a checkpoint does not, and workdirs written before this layout resume unchanged. A
save costs one on-device split of mu and nu (transient copies), once per checkpoint.

The optimizer itself is unchanged (`training/schedule.make_optimizer`'s optax.adam): it runs on
the `Buffers` pytree as on any other, so its arithmetic per element is the per-leaf one.
That holds for elementwise optimizers (Adam, SGD, global-norm clipping); one that treats
leaves by their shape or name (Adafactor's factored moments, LAMB's per-leaf trust ratio,
masks by path) must keep per-leaf state (`state.init_train_state(flat=False)`). The global
norm sums squares per buffer instead of per leaf: another float32 summation order. Both are
sums of n non-negative terms, each within (n - 1) * 2**-24 of the exact sum relatively in any
order, and XLA's blocked reductions come to about log2(n) * 2**-24 (~1.5e-6 for 10**7 to
10**8 terms; the square root halves it). It is a logged metric and feeds no update (the recipe has no
gradient clipping). Params and moments: the same expression per element, but XLA:CPU's code
for it (vectorised loop and scalar tail, FMA contraction) depends on the array's length and the
element's place, so an element may round an ulp apart per step (tests/test_training_step.py).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import struct
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

PyTree = Any
REPLICATED, SHARDED, OWN = 'replicated', 'sharded', 'own'


@dataclasses.dataclass(frozen=True)
class Group:
  """One buffer: `kind` REPLICATED (shape [C]), SHARDED ([rows, C], rows split over `axes`)
  or OWN (one leaf's own shape and `spec`)."""
  kind: str
  dtype: str
  shape: tuple[int, ...]
  axes: tuple[str, ...] = ()           # SHARDED: the mesh axes its rows are split over
  spec: tuple[Any, ...] = ()           # OWN: the leaf's PartitionSpec entries

  def partition_spec(self) -> P:
    if self.kind == SHARDED:
      return P(self.axes, None)
    return P(*self.spec)


@dataclasses.dataclass(frozen=True)
class Slot:
  """Where one leaf sits: in group `group`, columns (SHARDED) or elements (REPLICATED)
  [start, start + size); `axis` is the leaf's sharded dim (moved to the front)."""
  group: int
  shape: tuple[int, ...]
  start: int = 0
  size: int = 0
  axis: int = 0


@dataclasses.dataclass(frozen=True)
class Layout:
  """Where every leaf of a params tree sits in the buffers (static and hashable: it is part of
  the `Buffers` pytree structure, so jit keys its caches on it)."""
  treedef: jax.tree_util.PyTreeDef
  groups: tuple[Group, ...]
  slots: tuple[Slot, ...]    # one per leaf, in `treedef` order

  @classmethod
  def of(cls, params: PyTree, shardings: PyTree | None = None) -> 'Layout':
    """The layout of `params` (arrays or ShapeDtypeStructs) resting with `shardings` (a tree of
    NamedShardings like `params`; None: everything replicated, as on one device)."""
    leaves, treedef = jax.tree.flatten(params)
    specs = ([None] * len(leaves) if shardings is None
             else treedef.flatten_up_to(shardings))
    keys: dict[tuple, int] = {}
    groups: list[dict] = []
    slots = []
    for i, (leaf, sharding) in enumerate(zip(leaves, specs)):
      shape, dtype = tuple(leaf.shape), jnp.dtype(leaf.dtype).name
      split = _split_dims(shape, sharding)
      if len(split) > 1:
        key = (OWN, dtype, i)
      elif split:
        key = (SHARDED, dtype, split[0][1], split[0][2])
      else:
        key = (REPLICATED, dtype)
      if key not in keys:
        keys[key] = len(groups)
        groups.append(dict(key=key, used=0, sharding=sharding))
      g = groups[keys[key]]
      size = math.prod(shape)
      if key[0] == SHARDED:
        axis, rows = split[0][0], key[3]
        slots.append(Slot(keys[key], shape, g['used'], size // rows, axis))
        g['used'] += size // rows
      else:
        slots.append(Slot(keys[key], shape, g['used'], size))
        g['used'] += size
    out = []
    for g in groups:
      kind, dtype = g['key'][:2]
      if kind == SHARDED:
        out.append(Group(kind, dtype, (g['key'][3], g['used']), axes=g['key'][2]))
      elif kind == REPLICATED:
        out.append(Group(kind, dtype, (g['used'],)))
      else:
        leaf = leaves[g['key'][2]]
        out.append(Group(kind, dtype, tuple(leaf.shape),
                         spec=tuple(_entries(g['sharding'], leaf.ndim))))
    return cls(treedef, tuple(out), tuple(slots))

  def flatten(self, tree: PyTree) -> 'Buffers':
    """A tree shaped like the params -> its `Buffers` (jittable)."""
    parts: list[list[jax.Array]] = [[] for _ in self.groups]
    for leaf, slot in zip(self.treedef.flatten_up_to(tree), self.slots):
      group = self.groups[slot.group]
      if group.kind == SHARDED:
        leaf = jnp.moveaxis(leaf, slot.axis, 0).reshape(group.shape[0], -1)
      elif group.kind == REPLICATED:
        leaf = jnp.ravel(leaf)
      parts[slot.group].append(leaf)
    return Buffers(tuple(p[0] if len(p) == 1 else jnp.concatenate(p, axis=-1) for p in parts),
                   self)

  def unflatten(self, buffers: 'Buffers') -> PyTree:
    """`Buffers` -> the tree shaped like the params (jittable; slices of the buffers)."""
    leaves = []
    for slot in self.slots:
      group, buffer = self.groups[slot.group], buffers.arrays[slot.group]
      if group.kind == OWN:
        leaves.append(buffer)
        continue
      part = jax.lax.slice_in_dim(buffer, slot.start, slot.start + slot.size, axis=-1)
      if group.kind == REPLICATED:
        leaves.append(part.reshape(slot.shape))
      else:
        rest = tuple(d for i, d in enumerate(slot.shape) if i != slot.axis)
        leaves.append(jnp.moveaxis(part.reshape(slot.shape[slot.axis], *rest), 0, slot.axis))
    return self.treedef.unflatten(leaves)

  def shardings(self, mesh: Mesh) -> 'Buffers':
    """`Buffers` of the NamedSharding of each buffer on `mesh`."""
    return Buffers(tuple(NamedSharding(mesh, g.partition_spec()) for g in self.groups), self)


@struct.dataclass
class Buffers:
  """A params-shaped tree as the few buffers of `layout` (a pytree: optax maps over it)."""
  arrays: tuple
  layout: Layout = struct.field(pytree_node=False)


def _entries(sharding, ndim: int) -> list:
  spec = list(getattr(sharding, 'spec', None) or ())
  return spec + [None] * (ndim - len(spec))


def _split_dims(shape: tuple[int, ...], sharding) -> list[tuple[int, tuple[str, ...], int]]:
  """(dim, mesh axes, shards) of each dim of a leaf that `sharding` splits (into > 1 shards)."""
  out = []
  for dim, entry in enumerate(_entries(sharding, len(shape))):
    if entry is None:
      continue
    axes = (entry,) if isinstance(entry, str) else tuple(entry)
    shards = math.prod(sharding.mesh.shape[a] for a in axes)
    if shards > 1:
      out.append((dim, axes, shards))
  return out


def is_buffers(x) -> bool:
  return isinstance(x, Buffers)


def layout_of(opt_state: PyTree) -> Layout | None:
  """The layout of an optimizer state's buffers; None for a per-leaf state (or one without
  moments, e.g. optax.identity's)."""
  return next((x.layout for x in jax.tree.leaves(opt_state, is_leaf=is_buffers)
               if is_buffers(x)), None)


def to_leaves(opt_state: PyTree) -> PyTree:
  """An optimizer state with its buffers split back into params-shaped trees (optax's own
  per-leaf state; unchanged when it is per leaf already). Jittable."""
  return jax.tree.map(lambda x: x.layout.unflatten(x) if is_buffers(x) else x, opt_state,
                      is_leaf=is_buffers)


def relayout(opt_state: PyTree, layout: Layout | None) -> PyTree:
  """An optimizer state (per leaf or in any layout) in `layout` (None: per leaf): every
  subtree shaped like the params becomes `layout`'s buffers. Jittable."""
  per_leaf = to_leaves(opt_state)
  if layout is None:
    return per_leaf
  like_params = lambda x: jax.tree.structure(x) == layout.treedef   # noqa: E731
  return jax.tree.map(lambda x: layout.flatten(x) if like_params(x) else x, per_leaf,
                      is_leaf=like_params)


def put(opt_state: PyTree, shardings: PyTree) -> PyTree:
  """`opt_state` (per leaf or in any layout, host or device arrays) in the layout of
  `shardings` (an optimizer state of NamedShardings, as `opt_state_shardings` gives), placed
  with them: converted on the device, compiled for each call (a restore, a placement)."""
  layout = layout_of(shardings)
  return jax.jit(lambda opt: relayout(opt, layout), out_shardings=shardings)(opt_state)


def init(optimizer: optax.GradientTransformation, params: PyTree,
         shardings: PyTree | None = None) -> PyTree:
  """`optimizer`'s state over the buffers of `Layout.of(params, shardings)`."""
  return optimizer.init(Layout.of(params, shardings).flatten(params))


def opt_state_shardings(optimizer: optax.GradientTransformation, params: PyTree,
                        shardings: PyTree) -> PyTree:
  """The NamedShardings of `init(optimizer, params, shardings)`: each buffer as its group
  (`Group.partition_spec`), counters replicated."""
  layout = Layout.of(params, shardings)
  mesh = jax.tree.leaves(shardings)[0].mesh
  abstract = jax.eval_shape(optimizer.init, jax.eval_shape(layout.flatten, params))
  return jax.tree.map(lambda x: layout.shardings(mesh) if is_buffers(x)
                      else NamedSharding(mesh, P()), abstract, is_leaf=is_buffers)


def per_leaf_target(opt_state: PyTree, params: PyTree) -> PyTree:
  """The per-leaf ShapeDtypeStructs of an abstract optimizer state (what a checkpoint holds):
  every moment shaped as its buffers unflatten and sharded as its param in `params`
  (ShapeDtypeStructs with shardings); the other leaves as they are."""
  def one(x):
    if not is_buffers(x):
      return x
    shapes = jax.eval_shape(x.layout.unflatten, x)
    return jax.tree.map(lambda s, p: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=p.sharding),
                        shapes, params)
  return jax.tree.map(one, opt_state, is_leaf=is_buffers)


def update(optimizer: optax.GradientTransformation, grads: PyTree, opt_state: PyTree,
           params: PyTree) -> tuple[PyTree, PyTree, jax.Array]:
  """One optimizer step: `(params, opt_state, grad_norm)` after `grads` (jittable).

  With a state in buffers, the grads and params are flattened into its layout, the optimizer
  and the global norm run over the buffers, and the new params are split back into leaves; a
  per-leaf state is stepped leaf by leaf as optax does.
  """
  layout = layout_of(opt_state)
  if layout is None:
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, global_norm(grads)
  flat_grads, flat_params = layout.flatten(grads), layout.flatten(params)
  updates, opt_state = optimizer.update(flat_grads, opt_state, flat_params)
  return (layout.unflatten(optax.apply_updates(flat_params, updates)), opt_state,
          global_norm(flat_grads))


def global_norm(tree: PyTree) -> jax.Array:
  """L2 norm over all leaves (optax.global_norm is deprecated, its successor is recent)."""
  return jnp.sqrt(sum(jnp.sum(jnp.square(x)) for x in jax.tree.leaves(tree)))


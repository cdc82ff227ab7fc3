"""Every source of weights -> (CapeNextConfig, params[, train state]), in one place.

    ckpt = load('runs/split1')              # a train.py workdir (orbax; latest or step=N)
    ckpt = load('export_dir/')              # our export (safetensors / msgpack / orbax)
    ckpt = load('split1_epoch_200.pth')     # an official CapeNext / CapeX checkpoint (.pth/.npz)
    ckpt = load('tiny_capenext.npz')        # a parity fixture (official weights + its config)
    model = load_model(path)                # any of them as a CapeNext in eval mode

and, for training from public releases, `init_from_pretrained(model, backbone_path, clip_path)`
(ImageNet backbones in their own layouts, OpenAI / Hugging Face CLIP).

Weight files are read by `convert.torch_io` (torch's weights-only unpickler for `.pth`, no
pickles for `.npz`, plain `.safetensors`); a file whose pickle would build anything but
tensors is refused with a ValueError before any of its code runs. An official checkpoint does
not say its sizes: the headline ones are assumed unless a config is given (`read_config`).
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from capenext_jax import artefacts, export
from capenext_jax.convert import official
from capenext_jax.convert.pretrained import init_from_pretrained, with_path  # noqa: F401 - API
from capenext_jax.convert.torch_io import load_state_dict
from capenext_jax.device import partition, state as state_lib
from capenext_jax.models.capenext import (CapeNext, CapeNextConfig, abstract_model,
                                          frozen_in_compute_dtype)

if TYPE_CHECKING:
  import ml_collections

OFFICIAL_SUFFIXES = ('.pth', '.pt', '.ckpt', '.bin', '.npz', '.safetensors')


@dataclasses.dataclass(frozen=True)
class Checkpoint:
  """What a weights source holds.

  kind: 'workdir', 'export', 'fixture' or 'official'. config: the model's sizes. params: the nested params pure dict (host
  arrays, int list indices) of every kind but 'workdir'. state: a workdir's restored
  `TrainState` (on the mesh given to `load`). run_config: a workdir's `config.json`.
  """
  kind: str
  config: CapeNextConfig
  params: dict | None = None
  state: Any = None
  run_config: ml_collections.ConfigDict | None = None


# ----------------------------------------------------------------------------- detection
def is_train_workdir(path: str | os.PathLike) -> bool:
  """`artefacts.is_train_workdir`: how every program recognises a workdir."""
  return artefacts.is_train_workdir(path)


def _is_fixture(path: Path) -> bool:
  """A parity-fixture npz (official weights listed in `state_dict_keys`, config inside)."""
  if path.suffix != '.npz' or not path.is_file():
    return False
  try:
    with np.load(path, allow_pickle=False) as z:
      return {'state_dict_keys', 'config_json'} <= set(z.files)
  except Exception:  # noqa: BLE001 - not a readable npz: the official reader names the problem
    return False


def kind_of(path: str | os.PathLike) -> str:
  """Which kind of `Checkpoint` `path` is; ValueError naming the path when it is none of them."""
  path = Path(path)
  if not path.exists():
    raise ValueError(f'{path}: no such checkpoint')
  if is_train_workdir(path):   # before 'export': a workdir also holds a config.json
    return 'workdir'
  if export.is_export(path):
    return 'export'
  if _is_fixture(path):
    return 'fixture'
  if path.is_file() and path.suffix in OFFICIAL_SUFFIXES:
    return 'official'
  raise ValueError(f'{path}: not a checkpoint this code reads (a train.py workdir, an export, '
                   f'an official {"/".join(OFFICIAL_SUFFIXES)} file or a parity fixture)')


# ----------------------------------------------------------------------------- configs
def read_config(path: str | os.PathLike) -> CapeNextConfig:
  """A model config JSON: `CapeNextConfig.to_dict()`, an export's config.json, a train.py
  workdir's (its `model` entry), or the export / workdir folder itself."""
  path = Path(path)
  if path.is_dir():
    path = path / 'config.json'
  d = json.loads(path.read_text())
  return CapeNextConfig.from_dict(d['config'] if 'config' in d else
                                  d['model'] if 'model' in d else d)


def read_run_config(workdir: str | os.PathLike) -> ml_collections.ConfigDict:
  """The run ConfigDict train.py saved as `<workdir>/config.json`."""
  import ml_collections
  return ml_collections.ConfigDict(json.loads((Path(workdir) / 'config.json').read_text()))


# ----------------------------------------------------------------------------- loading
def load(path: str | os.PathLike, *, config: CapeNextConfig | None = None, mesh=None,
         step: int | None = None, run_config: ml_collections.ConfigDict | None = None
         ) -> Checkpoint:
  """The weights and sizes at `path` (see the module docstring for the kinds).

  config: the sizes of an official checkpoint (default: the official size of its backbone
    architecture with the fusion variant its keys show, or CapeX when it has no fusion
    weights); refused for the kinds that carry their own.
  mesh, step: a workdir's checkpoint `step` (default: the latest) is restored sharded on
    `mesh` (default: the first device).
  run_config: a workdir's `config.json` when the caller has already read it.
  """
  path = Path(path)
  kind = kind_of(path)
  if config is not None and kind != 'official':
    raise ValueError(f'{path}: this {kind} carries its own model config; drop the config')
  if kind == 'workdir':
    return _load_workdir(path, mesh, step, run_config or read_run_config(path))
  if kind == 'export':
    model_config, params = export.read_export(path)
    return Checkpoint(kind, model_config, params=params)
  if kind == 'fixture':
    with np.load(path, allow_pickle=False) as z:
      state_dict = {str(k): z[str(k)] for k in z['state_dict_keys']}
      model_config = official.config_from_fixture(json.loads(str(z['config_json'])))
    return Checkpoint(kind, model_config, params=official.capenext_from_official(state_dict))
  state_dict = load_state_dict(str(path))
  return Checkpoint(kind, config or official.official_model_config(state_dict),
                    params=official.capenext_from_official(state_dict))


def _load_workdir(path: Path, mesh, step: int | None,
                  run_config: ml_collections.ConfigDict) -> Checkpoint:
  """The weights of a workdir's checkpoint `step` (trainable, batch statistics) and the
  frozen weights stored beside them, on `mesh` with the run's own shardings: no optimizer
  state is built and no pretrained file of `config.init` is read (the workdir is
  self-contained). A workdir written before the frozen weights were stored rebuilds them from
  its seed and `config.init.clip_path`, as its training did."""
  # Imported here: loading an export (load_pretrained) stays free of orbax and ml_collections.
  from capenext_jax.training import checkpoint
  model_config = CapeNextConfig.from_dict(run_config.model.to_dict())
  if mesh is None:
    mesh = partition.make_mesh({'data': 1, 'fsdp': 1}, jax.devices()[:1])
  rules = partition.rules_from_config(run_config.get('sharding_rules', ()))
  min_bytes = run_config.get('fsdp_min_bytes', partition.FSDP_MIN_BYTES)
  _, *parts = partition.split_model(abstract_model(model_config))
  target = {name: state_lib.abstract_state(
      part, partition.param_shardings(part, mesh, rules, min_bytes))
      for name, part in zip(('trainable', 'batch_stats', 'frozen'), parts)}
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  target['step'] = jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated)
  with jax.set_mesh(mesh):
    frozen = checkpoint.restore_frozen(path, target['frozen'])
    if frozen is None:
      frozen = _rebuilt_frozen(path, model_config, run_config, mesh)
    ckpt = checkpoint.Checkpointer(str(path.absolute() / 'checkpoints'))
    try:
      weights, _ = ckpt.restore_weights(target, step)
    except ValueError as e:
      raise ValueError(f'{path}: {e}') from None
    finally:
      ckpt.close()
  state = state_lib.TrainState(trainable=weights['trainable'],
                               batch_stats=weights['batch_stats'], frozen=frozen, opt_state=(),
                               step=weights['step'], rng=np.zeros(2, np.uint32))
  return Checkpoint('workdir', model_config, state=state, run_config=run_config)


def _rebuilt_frozen(path: Path, model_config: CapeNextConfig,
                    run_config: ml_collections.ConfigDict, mesh):
  """The frozen part of a run's initial state, rebuilt as its training built it (seed,
  `config.init`'s files), for workdirs written before `<workdir>/frozen` existed. No
  optimizer state: the identity optimizer has none."""
  clip_path = run_config.init.get('clip_path') or None
  print(f'warning: {path} has no stored frozen weights (written by an older version); '
        f'rebuilding them from its seed' + (f' and {clip_path}' if clip_path else ''),
        file=sys.stderr, flush=True)
  import optax

  from capenext_jax.training import init   # as _load_workdir's import of checkpoint
  _, state, _ = init.init_state(run_config, optax.identity(), mesh, model_config=model_config)
  return state.frozen


def model_params(ckpt: Checkpoint) -> dict:
  """The params pure dict of any checkpoint (a workdir's state gathered to the host)."""
  if ckpt.params is not None:
    return ckpt.params
  graphdef = _graphdef(ckpt.config)
  state = partition.to_host((ckpt.state.trainable, ckpt.state.batch_stats, ckpt.state.frozen))
  return export.model_params(nnx.merge(graphdef, *state))


def _graphdef(config: CapeNextConfig) -> nnx.GraphDef:
  """The train-state graphdef of `config` (of `abstract_model`: nothing is computed)."""
  return partition.split_model(abstract_model(config))[0]


def load_model(path: str | os.PathLike, config: CapeNextConfig | None = None, *,
               dtype=jnp.float32) -> CapeNext:
  """A CapeNext in eval mode from any weights source (`load`), params cast to `dtype`."""
  ckpt = load(path, config=config)
  try:
    return export.build_model(ckpt.config, model_params(ckpt), dtype=dtype)
  except ValueError as e:
    raise with_path(path, e) from e


def load_pretrained(path: str | os.PathLike, *, dtype=jnp.float32) -> CapeNext:
  """Rebuild an exported CapeNext (eval mode); any other source of `load` works too."""
  return load_model(path, dtype=dtype)


def eval_state(ckpt: Checkpoint, mesh, rules=(), min_shard_bytes: int | None = None):
  """(graphdef, TrainState on `mesh`) to evaluate `ckpt` with (no optimizer state needed).

  rules, min_shard_bytes: the sharding of the params over the mesh (`partition.param_shardings`;
  a run config's `sharding_rules` and `fsdp_min_bytes`); a workdir's state keeps its own.
  """
  graphdef = _graphdef(ckpt.config)
  # The frozen CLIP image tower held in the compute dtype, as a training run steps it: no
  # per-batch cast of its weights (a no-op in float32).
  in_compute_dtype = lambda state: state.replace(
      frozen=frozen_in_compute_dtype(state.frozen, ckpt.config.dtype))
  if ckpt.state is not None:
    return graphdef, in_compute_dtype(ckpt.state)
  _, trainable, batch_stats, frozen = partition.split_model(
      export.build_model(ckpt.config, ckpt.params))
  state = state_lib.TrainState(trainable=trainable, batch_stats=batch_stats, frozen=frozen,
                               opt_state=(), step=np.int32(0), rng=np.zeros(2, np.uint32))
  if min_shard_bytes is None:
    min_shard_bytes = partition.FSDP_MIN_BYTES
  return graphdef, in_compute_dtype(jax.device_put(
      state, partition.param_shardings(state, mesh, rules, min_shard_bytes)))

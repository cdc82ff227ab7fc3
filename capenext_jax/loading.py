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
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from capenext_jax import artefacts, export
from capenext_jax import params as params_lib
from capenext_jax.errors import first_line
from capenext_jax.models.capenext import CapeNext, CapeNextConfig
from capenext_jax.models.layers import init_rngs

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
  from capenext_jax.convert import official
  if kind == 'fixture':
    with np.load(path, allow_pickle=False) as z:
      state_dict = {str(k): z[str(k)] for k in z['state_dict_keys']}
      model_config = official.config_from_fixture(json.loads(str(z['config_json'])))
    return Checkpoint(kind, model_config, params=official.capenext_from_official(state_dict))
  from capenext_jax.convert.torch_io import load_state_dict
  state_dict = load_state_dict(str(path))
  return Checkpoint(kind, config or official.official_model_config(state_dict),
                    params=official.capenext_from_official(state_dict))


def _load_workdir(path: Path, mesh, step: int | None,
                  run_config: ml_collections.ConfigDict) -> Checkpoint:
  """Rebuilds the run's state (frozen CLIP from its seed / init paths) and restores it."""
  from capenext_jax.training import checkpoint, init, partition, schedule
  from capenext_jax.training.state import abstract_state
  if mesh is None:
    mesh = partition.make_mesh({'data': 1, 'fsdp': 1}, jax.devices()[:1])
  with jax.set_mesh(mesh):
    tx = schedule.make_optimizer(run_config.optim, 1)
    _, state, shardings = init.init_state(run_config, tx, mesh)
    ckpt = checkpoint.Checkpointer(str(path.absolute() / 'checkpoints'))
    target = abstract_state(state, shardings).replace(frozen=state.frozen)
    try:
      if step is None:
        restored = ckpt.restore_latest(target)
        if restored is None:
          raise ValueError(f'{path}: no checkpoint that restores in {path / "checkpoints"}')
        state = restored[0]
      elif step not in ckpt.all_steps():
        raise ValueError(f'{path}: no checkpoint step {step} (there are {ckpt.all_steps()})')
      else:
        try:
          state, _ = ckpt.restore(target, step=step)
        except Exception as e:  # noqa: BLE001 - a damaged step: name it
          raise ValueError(f'{path}: checkpoint step {step} does not restore '
                           f'({first_line(e)})') from None
    finally:
      ckpt.close()
  return Checkpoint('workdir', CapeNextConfig.from_dict(run_config.model.to_dict()),
                    state=state, run_config=run_config)


def model_params(ckpt: Checkpoint) -> dict:
  """The params pure dict of any checkpoint (a workdir's state gathered to the host)."""
  if ckpt.params is not None:
    return ckpt.params
  from capenext_jax.training.partition import to_host
  graphdef = _graphdef(ckpt.config)
  state = to_host((ckpt.state.trainable, ckpt.state.batch_stats, ckpt.state.frozen))
  return export.model_params(nnx.merge(graphdef, *state))


def _graphdef(config: CapeNextConfig) -> nnx.GraphDef:
  """The train-state graphdef of `config` (traced abstractly: nothing is computed)."""
  from capenext_jax.training import partition
  return partition.split_model(nnx.eval_shape(lambda: CapeNext(config, rngs=init_rngs(0))))[0]


def load_model(path: str | os.PathLike, config: CapeNextConfig | None = None, *,
               dtype=jnp.float32) -> CapeNext:
  """A CapeNext in eval mode from any weights source (`load`), params cast to `dtype`."""
  ckpt = load(path, config=config)
  try:
    return export.build_model(ckpt.config, model_params(ckpt), dtype=dtype)
  except ValueError as e:
    raise _naming(path, e) from e


def load_pretrained(path: str | os.PathLike, *, dtype=jnp.float32) -> CapeNext:
  """Rebuild an exported CapeNext (eval mode); any other source of `load` works too."""
  return load_model(path, dtype=dtype)


def eval_state(ckpt: Checkpoint, mesh, rules=(), min_shard_bytes: int | None = None):
  """(graphdef, TrainState on `mesh`) to evaluate `ckpt` with (no optimizer state needed).

  rules, min_shard_bytes: the sharding of the params over the mesh (`partition.param_shardings`;
  a run config's `sharding_rules` and `fsdp_min_bytes`); a workdir's state keeps its own.
  """
  from capenext_jax.training import partition
  from capenext_jax.training.state import TrainState
  graphdef = _graphdef(ckpt.config)
  if ckpt.state is not None:
    return graphdef, ckpt.state
  _, trainable, batch_stats, frozen = partition.split_model(
      export.build_model(ckpt.config, ckpt.params))
  state = TrainState(trainable=trainable, batch_stats=batch_stats, frozen=frozen, opt_state=(),
                     step=np.int32(0),
                     rng=np.zeros(2, np.uint32))
  if min_shard_bytes is None:
    min_shard_bytes = partition.FSDP_MIN_BYTES
  return graphdef, jax.device_put(state, partition.param_shardings(state, mesh, rules,
                                                                   min_shard_bytes))


# ----------------------------------------------------------------------------- pretrained parts
def init_from_pretrained(model: CapeNext, backbone_path: str | os.PathLike | None = None,
                         clip_path: str | os.PathLike | None = None) -> CapeNext:
  """Overwrite the backbone and / or CLIP weights of `model` in place; returns `model`.

  backbone_path: the public release of the model's backbone architecture, in its own layout
    (`convert/backbones.py`): Microsoft's Swin V2 (`swinv2_tiny_patch4_window16_256.pth`),
    torchvision's ResNet-50 (`resnet50-0676ba61.pth`), the HRNet-W32 ImageNet checkpoint
    (`hrnet_w32-36af842e.pth`; CapeNext's `conv_block1/2` keep their init), or any file with
    those names. Classifier heads are ignored.
  clip_path: CLIP ViT weights in the OpenAI layout (`.pt` state dict / `.npz`) or the Hugging
    Face layout (`model.safetensors`, or its directory with `config.json`).
  Raises ValueError naming the backbone, the file and the first key or shape that does not fit.
  """
  from capenext_jax.convert import backbones as backbone_convert
  from capenext_jax.convert import clip as clip_convert
  from capenext_jax.models import backbones
  if backbone_path is not None:
    arch = backbones.arch_of(model.config.backbone)
    converter = backbone_convert.CONVERTERS[arch]
    target = model.backbone
    if converter.release_part is not None:
      target = getattr(target, converter.release_part)
    try:   # the release readers name the file in their errors
      weights = converter.load_release(backbone_path, model.config.backbone)
    except ValueError as e:
      raise ValueError(f'{arch} backbone: {e}') from e
    _load_part(target, weights, f'{arch} backbone: {backbone_path}')
  if clip_path is not None:
    _, params = clip_convert.load_clip(clip_path, model.config.clip)
    _load_part(model.clip, params, clip_path)
  return model


def _load_part(module, params: dict, path) -> None:
  try:
    params_lib.load_into(module, params)
  except ValueError as e:
    raise _naming(path, e) from e


def _naming(path, error: ValueError) -> ValueError:
  """`error` with `path` in front, unless its message already starts with it."""
  message = str(error)
  return ValueError(message if message.startswith(str(path)) else f'{path}: {message}')

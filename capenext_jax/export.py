"""Params-only export of a CapeNext, and reading it back (`read_export`, `build_model`; the
entry point users call is `capenext_jax.load_pretrained`, in `loading.py`).

An export directory holds (docs/EXPORT.md describes the names for other projects):
  config.json          {"format": "capenext-jax", "version": 1, "dtype": ..., "config": {...},
                        "digest": {"config": sha256, "params": sha256}}
  params.safetensors   flat '/'-joined names ('backbone/layers/0/blocks/1/attn/qkv/kernel'),
                       the same JSON as the header's `capenext` metadata entry
  params.msgpack       the nested dict (string keys) through `flax.serialization`
  params.orbax/        the nested dict as an orbax StandardCheckpointer pytree

Written whole or not at all (`atomic.new_folder`: a temporary folder beside the destination,
renamed into place), and only after the params were checked against the config's abstract
model (`check_fits`): an export always loads. An old export is replaced whole, and only with
`overwrite=True`; a folder of another kind (a workdir, a dataset, other files) never.

The digests (of the canonical config JSON, and of the parameter names and shapes) make an
edited config.json fail loudly instead of building another architecture that happens to
accept the same arrays (e.g. `nhead` 4 -> 2). Exports written before digests load unchecked.

Only jax, flax, numpy and safetensors are imported here (orbax lazily, for that format
alone), so exported models load without TensorFlow, torch or our training code.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from capenext_jax import artefacts, atomic
from capenext_jax import params as params_lib
from capenext_jax.errors import first_line
from capenext_jax.models.capenext import CapeNext, CapeNextConfig, abstract_model

FORMAT_NAME, FORMAT_VERSION = 'capenext-jax', 1
CONFIG_FILE = 'config.json'
PARAM_FILES = {'safetensors': 'params.safetensors', 'msgpack': 'params.msgpack',
               'orbax': 'params.orbax'}
DTYPES = {'float32': np.float32, 'bfloat16': jnp.bfloat16}
METADATA_KEY = 'capenext'  # safetensors header entry holding the config JSON


# ----------------------------------------------------------------------------- names
def _string_keys(params: Mapping) -> dict:
  """Nested dict with str keys everywhere (msgpack / orbax want them)."""
  return {str(k): _string_keys(v) if isinstance(v, Mapping) else v for k, v in params.items()}


# ----------------------------------------------------------------------------- export
def model_params(model: CapeNext) -> dict:
  """The model's weights pure dict (params and BatchNorm statistics, `params_lib.WEIGHTS`;
  nested, int list indices), as host numpy arrays."""
  return jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, params_lib.WEIGHTS)))


def config_digest(config: dict) -> str:
  """sha256 of the canonical JSON of a config dict."""
  return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()


def params_digest(flat: Mapping[str, np.ndarray]) -> str:
  """sha256 of the sorted '/'-joined parameter names with their shapes."""
  text = '\n'.join(f'{k}:{tuple(np.shape(v))}' for k, v in sorted(flat.items()))
  return hashlib.sha256(text.encode()).hexdigest()


def _header(config: CapeNextConfig, dtype: str, flat: Mapping[str, np.ndarray],
            provenance: Mapping | None) -> dict:
  config_dict = config.to_dict()
  header = {'format': FORMAT_NAME, 'version': FORMAT_VERSION, 'dtype': dtype,
            'config': config_dict,
            'digest': {'config': config_digest(config_dict), 'params': params_digest(flat)}}
  if provenance:
    header['provenance'] = dict(provenance)
  return header


@functools.lru_cache(maxsize=16)   # a conversion checks one config several times
def abstract_weights(config: CapeNextConfig) -> dict:
  """The weights pure dict (`params_lib.WEIGHTS`) of `config`'s model as ShapeDtypeStructs
  (`abstract_model`: nothing is computed). Cached: treat the result as read-only."""
  return nnx.to_pure_dict(nnx.state(abstract_model(config), params_lib.WEIGHTS))


def check_fits(config: CapeNextConfig, params: Mapping) -> None:
  """ValueError naming the first parameter that `config`'s model lacks, does not expect or
  shapes otherwise."""
  try:
    params_lib.check_structure(abstract_weights(config), params)
  except ValueError as e:
    raise ValueError(f'the weights do not fit the model config ({e})') from None


def export_params(params: Mapping, config: CapeNextConfig, directory: str | os.PathLike, *,
                  formats: Iterable[str] = ('safetensors',), dtype: str = 'float32',
                  provenance: Mapping | None = None, overwrite: bool = False
                  ) -> dict[str, Path]:
  """Write `params` (our pure dict) and `config` as the export folder `directory`.

  formats: any of 'safetensors', 'msgpack', 'orbax'. dtype: 'float32' or 'bfloat16' (floating
  arrays are cast; the loader casts back to float32 by default). provenance: JSON-able facts
  about where the weights came from (`capenext-convert` records source, sha256, step, PCK).
  overwrite: replace an existing non-empty export (whole: no file of the old one stays).
  Raises ValueError when the params do not fit `config` or `directory` is not an export or a
  new / empty folder, OSError naming the file when writing fails (nothing is left behind).
  Returns {format or 'config': path written}.
  """
  formats = tuple(formats)
  unknown = [f for f in formats if f not in PARAM_FILES]
  if unknown or not formats:
    raise ValueError(f'formats {formats}: expected some of {sorted(PARAM_FILES)}')
  if dtype not in DTYPES:
    raise ValueError(f'dtype {dtype!r}: expected one of {sorted(DTYPES)}')
  directory = Path(directory)
  artefacts.check_output_folder(directory, artefacts.EXPORT, what='export_params')
  check_fits(config, params)
  flat = {k: _cast(v, DTYPES[dtype]) for k, v in params_lib.flatten(params).items()}
  header = json.dumps(_header(config, dtype, flat, provenance), indent=1)
  names = [CONFIG_FILE] + [PARAM_FILES[fmt] for fmt in formats]
  with atomic.new_folder(directory, overwrite=overwrite) as tmp:
    (tmp / CONFIG_FILE).write_text(header + '\n')
    for fmt in formats:
      _write_named(_WRITERS[fmt], flat, tmp / PARAM_FILES[fmt], directory / PARAM_FILES[fmt],
                   header)
  return {key: directory / name for key, name in zip(['config', *formats], names)}


def _write_named(writer, flat: dict, path: Path, final: Path, header: str) -> None:
  """`writer` into the temporary `path`; a failure (disk full) names the file it was for."""
  try:
    writer(flat, path, header)
  except Exception as e:  # noqa: BLE001 - each storage library fails in its own way
    raise atomic.WriteError(f'{final}: could not write it ({first_line(e)}); the export was '
                            f'not written') from e


def export_model(model: CapeNext, directory: str | os.PathLike, **kwargs) -> dict[str, Path]:
  """`export_params` of a live model (its own config)."""
  return export_params(model_params(model), model.config, directory, **kwargs)


def _cast(a: np.ndarray, dtype) -> np.ndarray:
  # np.array, not ascontiguousarray: that one turns 0-d scalars (logit_scale) into 1-d.
  return np.array(a, dtype=dtype if np.issubdtype(a.dtype, np.floating) else a.dtype, order='C')


def _write_safetensors(flat: dict, path: Path, header: str) -> None:
  from safetensors.numpy import save_file
  save_file(flat, str(path), metadata={METADATA_KEY: header})


def _write_msgpack(flat: dict, path: Path, header: str) -> None:
  from flax import serialization
  path.write_bytes(serialization.msgpack_serialize(_string_keys(params_lib.unflatten(flat))))


def _write_orbax(flat: dict, path: Path, header: str) -> None:
  import orbax.checkpoint as ocp  # lazy: only this format needs orbax
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(path.absolute(), _string_keys(params_lib.unflatten(flat)), force=True)
  checkpointer.wait_until_finished()


_WRITERS = {'safetensors': _write_safetensors, 'msgpack': _write_msgpack,
            'orbax': _write_orbax}


# ----------------------------------------------------------------------------- import
def is_export(path: str | os.PathLike) -> bool:
  """True for an export directory or one of its params files."""
  path = Path(path)
  if path.is_dir():
    return (path / CONFIG_FILE).is_file() or (
        path.name == PARAM_FILES['orbax'] and (path.parent / CONFIG_FILE).is_file())
  return path.name in PARAM_FILES.values() or path.suffix == '.safetensors' and (
      METADATA_KEY in _safetensors_metadata(path))


def read_export(path: str | os.PathLike) -> tuple[CapeNextConfig, dict]:
  """(config, nested params with int list indices, arrays as stored) of an export.

  path: an export directory (safetensors preferred, then msgpack, then orbax) or one params
  file in it; a lone `.safetensors` carries its config in its header.
  """
  path = Path(path)
  if path.is_dir() and path.name != PARAM_FILES['orbax']:
    found = [path / f for f in PARAM_FILES.values() if (path / f).exists()]
    if not found:
      raise ValueError(f'{path}: no {" / ".join(PARAM_FILES.values())} in this directory')
    path = found[0]
  if not path.exists():
    raise ValueError(f'{path}: no such file')
  header = _read_header(path)
  if header.get('format') != FORMAT_NAME:
    raise ValueError(f'{path}: not a {FORMAT_NAME} export (format {header.get("format")!r})')
  if header.get('version') != FORMAT_VERSION:
    raise ValueError(f'{path}: export version {header.get("version")} is not supported '
                     f'(this code reads version {FORMAT_VERSION})')
  digest = header.get('digest', {})
  if 'config' in digest and digest['config'] != config_digest(header['config']):
    raise ValueError(f'{_header_source(path)}: the model config was edited after export (its '
                     f'digest does not match): it no longer describes these weights; restore '
                     f'the exported config')
  fmt = _format_of(path)
  try:
    params = _READERS[fmt](path)
  except Exception as e:  # noqa: BLE001 - truncated / corrupt files fail in many ways
    raise ValueError(f'{path}: cannot read the {fmt} params ({first_line(e)})') from None
  if 'params' in digest and digest['params'] != params_digest(params_lib.flatten(params)):
    raise ValueError(f'{path}: the parameter names or shapes differ from the ones exported '
                     f'with {_header_source(path)} (digest mismatch)')
  return CapeNextConfig.from_dict(header['config']), params


def _header_source(path: Path) -> Path:
  """The file the export header was read from."""
  if path.suffix == '.safetensors' and METADATA_KEY in _safetensors_metadata(path):
    return path
  return path.parent / CONFIG_FILE


def _format_of(path: Path) -> str:
  if path.suffix == '.safetensors':
    return 'safetensors'
  by_name = {v: k for k, v in PARAM_FILES.items()}
  if path.name not in by_name:
    raise ValueError(f'{path}: not an export params file ({", ".join(PARAM_FILES.values())})')
  return by_name[path.name]


def _safetensors_metadata(path: Path) -> dict:
  from safetensors import safe_open
  try:
    with safe_open(str(path), framework='numpy') as f:
      return f.metadata() or {}
  except Exception as e:  # noqa: BLE001 - SafetensorError, OSError, ...
    raise ValueError(f'{path}: not a readable safetensors file ({first_line(e)})') from None


def _read_header(path: Path) -> dict:
  """The export JSON: from the safetensors header, else from config.json next to the file."""
  config_file = path.parent / CONFIG_FILE
  inside = None
  if path.suffix == '.safetensors':
    meta = _safetensors_metadata(path)
    if METADATA_KEY in meta:
      inside = json.loads(meta[METADATA_KEY])
  if not config_file.is_file():
    if inside is None:
      raise ValueError(f'{path}: no {CONFIG_FILE} next to it (and no config in the file)')
    return inside
  try:
    beside = json.loads(config_file.read_text())
  except ValueError as e:
    raise ValueError(f'{config_file}: not valid JSON ({e})') from None
  if inside is not None and inside.get('config') != beside.get('config'):
    raise ValueError(f'{config_file}: its model config differs from the one inside {path.name} '
                     f'(was config.json edited?); restore the exported config')
  return inside if inside is not None else beside


def _read_safetensors(path: Path) -> dict:
  from safetensors.numpy import load_file
  return params_lib.unflatten(load_file(str(path)))


def _read_msgpack(path: Path) -> dict:
  from flax import serialization
  return params_lib.unflatten(params_lib.flatten(serialization.msgpack_restore(path.read_bytes())))


def _read_orbax(path: Path) -> dict:
  import orbax.checkpoint as ocp  # lazy: only this format needs orbax
  restored = ocp.StandardCheckpointer().restore(path.absolute())
  return params_lib.unflatten(params_lib.flatten(jax.tree.map(np.asarray, restored)))


_READERS = {'safetensors': _read_safetensors, 'msgpack': _read_msgpack, 'orbax': _read_orbax}


def build_model(config: CapeNextConfig, params: Mapping, *, dtype=jnp.float32,
                seed: int = 0) -> CapeNext:
  """A CapeNext in eval mode holding `params` (cast to `dtype`), without a random init.

  The module tree is abstract (`abstract_model`), so nothing is computed for the ~200M
  parameters that get overwritten; only the dropout / drop-path RNG streams are made
  concrete, each from its own `fold_in(key(seed), i)`.
  """
  model = abstract_model(config)
  state = nnx.state(model, params_lib.WEIGHTS)
  params_lib.check_structure(nnx.to_pure_dict(state), params)
  params_lib.check_finite(params)
  state.replace_by_pure_dict(jax.tree.map(lambda a: jnp.asarray(a, dtype), params))
  rng_state = nnx.state(model, nnx.Not(params_lib.WEIGHTS))
  leaves, treedef = jax.tree.flatten(rng_state)
  nnx.update(model, state, jax.tree.unflatten(treedef, [
      _concrete(leaf, jax.random.fold_in(jax.random.key(seed), i))
      for i, leaf in enumerate(leaves)]))
  model.eval()
  return model


def _concrete(abstract: jax.ShapeDtypeStruct, key: jax.Array) -> jax.Array:
  """A real value for an abstract RNG variable: a key, or a zero counter."""
  if jax.dtypes.issubdtype(abstract.dtype, jax.dtypes.prng_key):
    return key
  return jnp.zeros(abstract.shape, abstract.dtype)

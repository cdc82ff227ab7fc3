"""capenext-convert: any weights source -> an export, or an export -> the official state dict.

  capenext-convert split1_epoch_200.pth my_capenext/          # official CapeNext / CapeX
  capenext-convert runs/split1 my_capenext/ --best            # a train.py workdir
  capenext-convert runs/split1 my_capenext/ --step 4000 --dtype bfloat16
  capenext-convert my_capenext/ capenext_official.pth         # back to PyTorch (needs [torch])
  capenext-convert my_capenext/ capenext_official.npz         # the same names, numpy only

SRC is anything `capenext_jax.loading` reads (a train.py workdir: its latest step, `--step N`
or `--best` val PCK; an export; an official `.pth` / `.npz`; a parity fixture). A DST ending
in `.pth` / `.npz` receives the official state dict (the names of the official code's
`state_dict()`, `{'state_dict': ...}` as mmcv saves it); any other DST is an export directory
(docs/EXPORT.md) whose config.json records where the weights came from (`provenance`).

Outputs are whole or absent (written under a temporary name beside DST, then renamed), and
checked before they are written: the weights must fit the model config (an abstract build),
DST must be new, empty, or (with `--overwrite`) an export / a state dict file to replace whole;
never SRC itself, a train.py workdir or a dataset folder. An official checkpoint's sizes come
from `--config`, else from the `.pth` meta we write (our own `.pth` files convert back without
flags), else from its shapes when exactly one named size fits them.
"""
from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from capenext_jax import artefacts, atomic, cli, export, loading
from capenext_jax.convert import official, torch_io
from capenext_jax.extras import require
from capenext_jax.models.capenext import CapeNextConfig
from capenext_jax.training.checkpoint import Checkpointer

OFFICIAL_OUTPUTS = ('.pth', '.npz')
# Keys of the `meta` dict of the .pth we write: the provenance, and the model config (JSON).
META_PROVENANCE, META_CONFIG = 'capenext_jax', 'capenext_jax_config'


# ----------------------------------------------------------------------------- provenance
def sha256_of(path: str | os.PathLike) -> str:
  """sha256 of a file, or of a directory's files (relative names and contents, sorted)."""
  path = Path(path)
  digest = hashlib.sha256()
  files = sorted(p for p in path.rglob('*') if p.is_file()) if path.is_dir() else [path]
  for f in files:
    if path.is_dir():
      digest.update(str(f.relative_to(path)).encode() + b'\0')
    with open(f, 'rb') as fh:
      for block in iter(lambda: fh.read(1 << 20), b''):
        digest.update(block)
  return digest.hexdigest()


def package_version() -> str:
  try:
    return importlib.metadata.version('capenext-jax')
  except importlib.metadata.PackageNotFoundError:   # run from a source tree, not installed
    return 'source'


def provenance(src: Path, ckpt: loading.Checkpoint, step: int | None,
               previous: dict | None = None) -> dict:
  """Where the weights came from: the source file (its normalised absolute path, and its
  sha256), and for a workdir its step, split (annotation files, or the synthetic set's
  settings), shots and the val / test PCK@0.2 known for that step (val: saved with the
  checkpoint; test: results.json when the run ended at that step). previous: the provenance
  the source carries (an export's, or the `meta` of a `.pth` we wrote), kept as
  `converted_from`."""
  src = Path(os.path.abspath(src))   # normalised: no '..', no trailing '/'
  out = {'source': str(src), 'kind': ckpt.kind, 'package_version': package_version()}
  if ckpt.kind != 'workdir':
    hashed = src
    if ckpt.kind == 'export' and src.is_dir():
      hashed = next(src / f for f in export.PARAM_FILES.values() if (src / f).exists())
    out.update(sha256=sha256_of(hashed), source_file=str(hashed))
    previous = _export_provenance(src) if ckpt.kind == 'export' else previous
    if previous:
      out['converted_from'] = previous
    return out
  step_dir = src / 'checkpoints' / str(step)
  data = ckpt.run_config.data
  out.update(step=step, sha256=sha256_of(step_dir), source_file=str(step_dir),
             split=_split_of(ckpt.run_config, src), shots=data.get('shots'))
  val_pck = _saved_metrics(src, step).get('pck')
  if val_pck is not None:
    out['val_pck'] = val_pck
  results_file = src / 'results.json'
  if results_file.is_file():
    results = json.loads(results_file.read_text())
    if results.get('step') == step and 'test_pck_end' in results:
      out['test_pck'] = results['test_pck_end']
  return out


def _split_of(run_config, workdir: Path) -> dict:
  """The run's annotation files by part; a synthetic run's are the files it drew (under
  `data.root`, or `<workdir>/data`, as data_pipeline/splits.py puts them) with the settings
  and seed they were drawn with."""
  data = run_config.data
  synthetic = data.get('synthetic')
  if synthetic is not None and synthetic.get('enabled'):
    root = Path(os.path.abspath(data.get('root') or workdir / 'data'))
    split = {part: str(root / 'annotations' / f'synthetic_{part}.json')
             for part in ('train', 'val', 'test')}
    settings = {k: v for k, v in synthetic.to_dict().items() if k != 'enabled'}
    return {**split, 'synthetic': {**settings, 'seed': run_config.get('seed')}}
  # Named by its annotation files (configs/mp100.py: mp100_split{n}_{part}.json).
  return {part: data.get(f'{part}_ann') or None for part in ('train', 'val', 'test')}


def _export_provenance(src: Path) -> dict | None:
  config_file = (src if src.is_dir() else src.parent) / export.CONFIG_FILE
  if config_file.is_file():
    return json.loads(config_file.read_text()).get('provenance')
  return None


def _saved_metrics(workdir: Path, step: int) -> dict:
  ckpt = Checkpointer(str(workdir.absolute() / 'checkpoints'))
  try:
    return ckpt.metrics(step)
  finally:
    ckpt.close()


def workdir_step(workdir: Path, step: int | None, best: bool) -> int:
  """The checkpoint step to convert: `step`, the best val PCK one, or the latest."""
  ckpt = Checkpointer(str(workdir.absolute() / 'checkpoints'))
  try:
    steps = ckpt.all_steps()
    if not steps:
      raise ValueError(f'{workdir}: no checkpoint in {workdir / "checkpoints"}')
    if best:
      chosen = ckpt.best_step()
      if chosen is None:
        raise ValueError(f'{workdir}: no checkpoint was saved with a val PCK (steps '
                         f'{steps}); give --step or drop --best')
      return chosen
    if step is not None and step not in steps:
      raise ValueError(f'{workdir}: no checkpoint at step {step} (kept: {steps})')
    return max(steps) if step is None else step
  finally:
    ckpt.close()


# ----------------------------------------------------------------------------- writers
def write_official(params: dict, path: Path, meta: dict, config: CapeNextConfig | None = None
                   ) -> Path:
  """The official state dict of `params` as `.pth` (torch.save of {'state_dict', 'meta'},
  what mmcv's `load_checkpoint` reads; `meta` and `config` go into its `meta` as JSON) or
  `.npz` (flat names, float32). Written whole (a temporary file, then renamed over `path`)."""
  state_dict = {k: np.asarray(v, np.float32)
                for k, v in official.capenext_to_official(params, config).items()}
  torch = (require('torch', 'torch', f'{path}: writing a PyTorch file')
           if path.suffix != '.npz' else None)
  with atomic.new_file(path) as tmp:
    if torch is None:
      np.savez(tmp, **state_dict)
    else:
      saved_meta = {META_PROVENANCE: json.dumps(meta)}
      if config is not None:
        saved_meta[META_CONFIG] = json.dumps(config.to_dict())
      torch.save({'state_dict': {k: torch.from_numpy(v) for k, v in state_dict.items()},
                  'meta': saved_meta}, tmp)
  return path


def check_destination(src: Path, dst: Path, *, overwrite: bool) -> None:
  """Before any work: DST is neither SRC nor inside it (nor holds it), and is new, empty, or
  (with `overwrite`) what this conversion writes (an export folder, a state dict file)."""
  a, b = Path(os.path.abspath(src)).resolve(), Path(os.path.abspath(dst)).resolve()
  if a == b or a in b.parents or b in a.parents:
    raise ValueError(f'{dst}: is the source {src}, or inside it, or holds it; write the '
                     f'conversion elsewhere')
  if dst.suffix in OFFICIAL_OUTPUTS:
    if dst.is_dir():
      raise ValueError(f'{dst}: is a folder; a {dst.suffix} state dict is a file')
    if dst.exists() and not overwrite:
      raise ValueError(f'{dst}: exists; pass --overwrite to replace it')
    return
  artefacts.check_output_folder(dst, artefacts.EXPORT, what='capenext-convert')
  if not overwrite and dst.is_dir() and not artefacts.is_empty_folder(dst):
    raise ValueError(f'{dst}: holds an export; pass --overwrite to replace it')


def read_model_config(path: str | os.PathLike) -> CapeNextConfig:
  """`--config` (`loading.read_config`: a model config JSON, an export's or a train.py
  workdir's config.json, or that folder), errors naming the flag and the file."""
  try:
    return loading.read_config(path)
  except (OSError, TypeError, ValueError, AttributeError) as e:
    raise ValueError(f'--config {path}: not a model config ({cli.one_line(e)})') from None


def load_official(src: Path, config_file: str | None) -> tuple[loading.Checkpoint, dict | None]:
  """(checkpoint, the provenance a `.pth` we wrote carries) of an official checkpoint, its
  sizes from --config, else our `.pth` meta, else its shapes (see the module docstring)."""
  state_dict = torch_io.load_state_dict(src)
  params = official.capenext_from_official(state_dict)
  meta = torch_io.load_meta(src)
  previous = json.loads(meta[META_PROVENANCE]) if META_PROVENANCE in meta else None
  if config_file:
    config, where = read_model_config(config_file), f'--config {config_file}'
  elif META_CONFIG in meta:
    config = CapeNextConfig.from_dict(json.loads(meta[META_CONFIG]))
    where = f'the model config in {src}'
  else:
    try:
      config = official.infer_model_config(state_dict, params)
    except ValueError as e:
      raise ValueError(f'{src}: {e} with --config') from None
    where = None
  if where is not None:
    try:
      export.check_fits(config, params)
    except ValueError as e:
      raise ValueError(f'{src}: {where}: {e}') from None
  return loading.Checkpoint('official', config, params=params), previous


def convert(src: str | os.PathLike, dst: str | os.PathLike, *, step: int | None = None,
            best: bool = False, dtype: str = 'float32', formats: Sequence[str] = ('safetensors',),
            config_file: str | None = None, overwrite: bool = False) -> dict:
  """Convert `src` into `dst` (see the module docstring); returns the provenance recorded."""
  src, dst = Path(src), Path(dst)
  kind = loading.kind_of(src)
  check_destination(src, dst, overwrite=overwrite)
  if kind != 'workdir' and (step is not None or best):
    raise ValueError(f'{src}: --step / --best choose a train.py workdir checkpoint; this is '
                     f'a {kind}')
  if dst.suffix in OFFICIAL_OUTPUTS and dtype != 'float32':
    raise ValueError(f'{dst}: the official state dict is float32 (drop --dtype {dtype})')
  if config_file and kind != 'official':
    raise ValueError(f'{src}: this {kind} carries its own model config; drop --config')
  previous = None
  if kind == 'official':
    ckpt, previous = load_official(src, config_file)
  else:
    if kind == 'workdir':
      step = workdir_step(src, step, best)
    ckpt = loading.load(src, step=step)
  params = loading.model_params(ckpt)
  record = provenance(src, ckpt, step, previous)
  if dst.suffix in OFFICIAL_OUTPUTS:
    export.check_fits(ckpt.config, params)
    write_official(params, dst, record, ckpt.config)
  else:
    export.export_params(params, ckpt.config, dst, formats=formats, dtype=dtype,
                         provenance=record, overwrite=overwrite)
  return record


def build_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog='capenext-convert', description=__doc__.split('\n\n')[0],
                              epilog=__doc__.split('\n\n', 1)[1],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('src', help='official .pth / .npz, train.py workdir, export, parity fixture')
  p.add_argument('dst', help='export directory, or an official state dict file (.pth / .npz)')
  which = p.add_mutually_exclusive_group()
  which.add_argument('--step', type=int, help='workdir: this checkpoint step (default: latest)')
  which.add_argument('--best', action='store_true', help='workdir: the best val PCK checkpoint')
  p.add_argument('--dtype', default='float32', choices=sorted(export.DTYPES),
                 help='export params dtype')
  p.add_argument('--formats', default='safetensors',
                 help=f'comma-separated export formats: {", ".join(export.PARAM_FILES)}')
  p.add_argument('--config', help='the model config of an official checkpoint whose sizes its '
                 'shapes do not tell: a config.json of an export or of a train.py workdir (or the '
                 'folder), or CapeNextConfig.to_dict() as JSON')
  p.add_argument('--overwrite', action='store_true',
                 help='replace an existing export / state dict file at DST (whole)')
  p.add_argument('-v', '--verbose', action='store_true', help='tracebacks for errors')
  return p


def main(argv: Sequence[str] | None = None) -> int:
  parser = build_parser()
  return cli.run_parsed(parser.prog, run, parser.parse_args(argv))[0]


def run(args) -> None:
  record = convert(args.src, args.dst, step=args.step, best=args.best, dtype=args.dtype,
                   formats=tuple(f for f in args.formats.split(',') if f),
                   config_file=args.config, overwrite=args.overwrite)
  what = f'step {record["step"]} of ' if 'step' in record else ''
  print(f'wrote {args.dst} from {what}{args.src} ({record["kind"]})')


if __name__ == '__main__':
  sys.exit(main())

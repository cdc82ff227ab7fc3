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

from capenext_jax import cli, export, loading
from capenext_jax.extras import require

OFFICIAL_OUTPUTS = ('.pth', '.npz')


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


def provenance(src: Path, ckpt: loading.Checkpoint, step: int | None) -> dict:
  """Where the weights came from: the source file (and its sha256), and for a workdir its
  step, split (annotation files), shots and the val / test PCK@0.2 known for that step (val:
  saved with the checkpoint; test: results.json when the run ended at that step)."""
  out = {'source': str(src.absolute()), 'kind': ckpt.kind, 'package_version': package_version()}
  if ckpt.kind != 'workdir':
    hashed = src
    if ckpt.kind == 'export' and src.is_dir():
      hashed = next(src / f for f in export.PARAM_FILES.values() if (src / f).exists())
    out.update(sha256=sha256_of(hashed), source_file=str(hashed.absolute()))
    previous = _export_provenance(src) if ckpt.kind == 'export' else None
    if previous:
      out['converted_from'] = previous
    return out
  step_dir = src / 'checkpoints' / str(step)
  data = ckpt.run_config.data
  # The split is named by its annotation files (configs/mp100.py: mp100_split{n}_{part}.json).
  split = {part: data.get(f'{part}_ann') or None for part in ('train', 'val', 'test')}
  out.update(step=step, sha256=sha256_of(step_dir), source_file=str(step_dir.absolute()),
             split=split, shots=data.get('shots'))
  val_pck = _saved_metrics(src, step).get('pck')
  if val_pck is not None:
    out['val_pck'] = val_pck
  results_file = src / 'results.json'
  if results_file.is_file():
    results = json.loads(results_file.read_text())
    if results.get('step') == step and 'test_pck_end' in results:
      out['test_pck'] = results['test_pck_end']
  return out


def _export_provenance(src: Path) -> dict | None:
  config_file = (src if src.is_dir() else src.parent) / export.CONFIG_FILE
  if config_file.is_file():
    return json.loads(config_file.read_text()).get('provenance')
  return None


def _saved_metrics(workdir: Path, step: int) -> dict:
  from capenext_jax.training.checkpoint import Checkpointer
  ckpt = Checkpointer(str(workdir.absolute() / 'checkpoints'))
  try:
    return ckpt.metrics(step)
  finally:
    ckpt.close()


def workdir_step(workdir: Path, step: int | None, best: bool) -> int:
  """The checkpoint step to convert: `step`, the best val PCK one, or the latest."""
  from capenext_jax.training.checkpoint import Checkpointer
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
def write_official(params: dict, path: Path, meta: dict) -> Path:
  """The official state dict of `params` as `.pth` (torch.save of {'state_dict', 'meta'},
  what mmcv's `load_checkpoint` reads) or `.npz` (flat names, float32)."""
  from capenext_jax.convert.official import capenext_to_official
  state_dict = {k: np.asarray(v, np.float32) for k, v in capenext_to_official(params).items()}
  path.parent.mkdir(parents=True, exist_ok=True)
  if path.suffix == '.npz':
    np.savez(path, **state_dict)
    return path
  torch = require('torch', 'torch', f'{path}: writing a PyTorch file')
  torch.save({'state_dict': {k: torch.from_numpy(v) for k, v in state_dict.items()},
              'meta': {'capenext_jax': json.dumps(meta)}}, path)
  return path


def convert(src: str | os.PathLike, dst: str | os.PathLike, *, step: int | None = None,
            best: bool = False, dtype: str = 'float32', formats: Sequence[str] = ('safetensors',),
            config_file: str | None = None) -> dict:
  """Convert `src` into `dst` (see the module docstring); returns the provenance recorded."""
  src, dst = Path(src), Path(dst)
  kind = loading.kind_of(src)
  if kind != 'workdir' and (step is not None or best):
    raise ValueError(f'{src}: --step / --best choose a train.py workdir checkpoint; this is '
                     f'a {kind}')
  if kind == 'workdir':
    step = workdir_step(src, step, best)
  config = loading.read_config(config_file) if config_file else None
  ckpt = loading.load(src, config=config, step=step)
  params = loading.model_params(ckpt)
  record = provenance(src, ckpt, step)
  if dst.suffix in OFFICIAL_OUTPUTS:
    if dtype != 'float32':
      raise ValueError(f'{dst}: the official state dict is float32 (drop --dtype {dtype})')
    write_official(params, dst, record)
  else:
    export.export_params(params, ckpt.config, dst, formats=formats, dtype=dtype,
                         provenance=record)
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
  p.add_argument('--config', help='model config JSON for an official checkpoint that is not '
                 'the headline size')
  p.add_argument('-v', '--verbose', action='store_true', help='tracebacks for errors')
  return p


def main(argv: Sequence[str] | None = None) -> int:
  parser = build_parser()
  return cli.run_parsed(parser.prog, run, parser.parse_args(argv))[0]


def run(args) -> None:
  record = convert(args.src, args.dst, step=args.step, best=args.best, dtype=args.dtype,
                   formats=tuple(f for f in args.formats.split(',') if f),
                   config_file=args.config)
  what = f'step {record["step"]} of ' if 'step' in record else ''
  print(f'wrote {args.dst} from {what}{args.src} ({record["kind"]})')


if __name__ == '__main__':
  sys.exit(main())

"""capenext-convert: official checkpoint -> export -> official .pth / .npz and back.

The weights are the tiny parity fixture's (official names from the official code's
`state_dict()`, official values). The workdir source is tested in test_eval.py on the workdir
that test trains; `--best` on a reopened Checkpointer in test_training_checkpoint.py.
"""
from __future__ import annotations

import json
import os
import re
import stat

import numpy as np
import pytest

from capenext_jax import atomic, export, loading
from capenext_jax import params as params_lib
from capenext_jax.convert import cli
from capenext_jax.extras import MissingExtra
from capenext_jax.models.capenext import CapeNextConfig
from conftest import FIXTURES, load_fixture

FIXTURE = FIXTURES / 'tiny_capenext.npz'
# Official keys the way back leaves out: buffers the official model rebuilds at construction,
# and modules it never calls (state_dict_keys.tsv: "buffer (recompute; ignore)", "unused").
NOT_WRITTEN = re.compile(r'relative_coords_table|relative_position_index|attn_mask|'
                         r'^backbone\.head\.|^additional_module\.non_linear\.')


@pytest.fixture(scope='module')
def official_state_dict():
  z = load_fixture('tiny_capenext.npz')
  return {str(k): z[str(k)] for k in z['state_dict_keys']}


def _same(a: dict, b: dict) -> bool:
  fa, fb = params_lib.flatten(a), params_lib.flatten(b)
  return fa.keys() == fb.keys() and all(np.array_equal(fa[k], fb[k]) for k in fa)


def test_official_to_export_to_official_round_trip(tmp_path, official_state_dict):
  import torch
  # The fixture's sizes are no named size: as a train.py workdir's config.json gives them.
  config_json = tmp_path / 'run' / 'config.json'
  config_json.parent.mkdir()
  config_json.write_text(json.dumps({'model': loading.load(FIXTURE).config.to_dict(),
                                     'optim': {'lr': 1e-5}, 'batch_size': 32}))
  # fixture npz -> export, with provenance
  assert cli.main([str(FIXTURE), str(tmp_path / 'exp')]) == 0
  header = json.loads((tmp_path / 'exp' / 'config.json').read_text())
  prov = header['provenance']
  assert prov['kind'] == 'fixture' and prov['sha256'] == cli.sha256_of(FIXTURE)
  assert prov['package_version']
  _, params = export.read_export(tmp_path / 'exp')
  # export -> official .pth: the official names and values, float32, under 'state_dict'
  assert cli.main([str(tmp_path / 'exp'), str(tmp_path / 'back.pth')]) == 0
  saved = torch.load(tmp_path / 'back.pth', map_location='cpu', weights_only=True)
  state_dict = saved['state_dict']
  expected = {k for k in official_state_dict if not NOT_WRITTEN.search(k)}
  assert set(state_dict) == expected
  assert len(expected) < len(official_state_dict)   # the pattern above did leave some out
  for k in expected:
    np.testing.assert_array_equal(state_dict[k].numpy(), official_state_dict[k], err_msg=k)
  pth_provenance = json.loads(saved['meta'][cli.META_PROVENANCE])
  assert pth_provenance['kind'] == 'export' and pth_provenance['converted_from'] == prov
  # .pth (our own: its meta holds the config, no flag needed; .npz: --config) -> export again:
  # the same params; the provenance chains back
  assert cli.main([str(tmp_path / 'back.pth'), str(tmp_path / 'exp2')]) == 0
  exp2_config, exp2_params = export.read_export(tmp_path / 'exp2')
  assert exp2_config == loading.load(FIXTURE).config and _same(exp2_params, params)
  exp2 = json.loads((tmp_path / 'exp2' / 'config.json').read_text())['provenance']
  assert exp2['converted_from'] == pth_provenance
  assert cli.main([str(tmp_path / 'exp'), str(tmp_path / 'back.npz')]) == 0
  with np.load(tmp_path / 'back.npz') as z:
    assert set(z.files) == expected
  assert cli.main([str(tmp_path / 'back.npz'), str(tmp_path / 'exp3'), '--dtype', 'bfloat16',
                   '--config', str(config_json)]) == 0
  exp3 = json.loads((tmp_path / 'exp3' / 'config.json').read_text())
  assert exp3['dtype'] == 'bfloat16' and exp3['provenance']['kind'] == 'official'
  # An export of an export remembers where the first one came from; its source path is
  # recorded normalised.
  assert cli.main([f'{tmp_path}/run/../exp/', str(tmp_path / 'exp4')]) == 0
  exp4 = json.loads((tmp_path / 'exp4' / 'config.json').read_text())['provenance']
  assert exp4['converted_from'] == prov and exp4['source'] == str(tmp_path / 'exp')


def test_refusals(tmp_path, capsys):
  assert cli.main([str(FIXTURE), str(tmp_path / 'x'), '--step', '3']) == 2
  assert '--step / --best choose a train.py workdir' in capsys.readouterr().err
  assert cli.main([str(FIXTURE), str(tmp_path / 'x.pth'), '--dtype', 'bfloat16']) == 2
  assert 'official state dict is float32' in capsys.readouterr().err
  assert cli.main([str(tmp_path / 'nothing'), str(tmp_path / 'x')]) == 2
  assert 'no such checkpoint' in capsys.readouterr().err


def test_pth_without_torch_names_the_extra(tmp_path, monkeypatch, capsys):
  """Without torch, reading or writing a .pth says which extra brings it."""
  assert cli.main([str(FIXTURE), str(tmp_path / 'exp')]) == 0
  (tmp_path / 'fake.pth').write_bytes(b'not read: torch is missing first')
  monkeypatch.setitem(__import__('sys').modules, 'torch', None)
  assert cli.main([str(tmp_path / 'exp'), str(tmp_path / 'back.pth')]) == 2
  err = capsys.readouterr().err
  assert 'pip install "capenext-jax[torch]"' in err and 'back.pth' in err
  with pytest.raises(MissingExtra, match=r'fake\.pth: reading a PyTorch file needs'):
    loading.load(tmp_path / 'fake.pth')


# ----------------------------------------------------------------------------- outputs
def _digests(*paths) -> dict:
  """{file: sha256} of every file under `paths` (folders walked), to show inputs unchanged."""
  out = {}
  for path in paths:
    files = sorted(p for p in path.rglob('*') if p.is_file()) if path.is_dir() else [path]
    out.update({str(f): cli.sha256_of(f) for f in files})
  return out


def _leftovers(folder) -> list:
  """Temporary names a conversion left beside its outputs."""
  return sorted(p.name for p in folder.iterdir() if p.name.startswith('.'))


@pytest.fixture(scope='module')
def small_export(tmp_path_factory):
  """(config, export folder) of a model of the 'tiny' named size (not the headline one) with
  random weights: an abstract build and numpy draws, no init computed."""
  config = CapeNextConfig.variant('tiny')
  rng = np.random.default_rng(0)
  params = {k: rng.normal(size=v.shape).astype(np.float32)
            for k, v in params_lib.flatten(export.abstract_weights(config),
                                           leaf=lambda a: a).items()}
  folder = tmp_path_factory.mktemp('small') / 'exp_a'
  export.export_params(params_lib.unflatten(params), config, folder)
  return config, folder


def test_small_model_round_trips_through_official_files_without_flags(tmp_path, small_export,
                                                                      capsys):
  """exp_a -> .pth -> exp_b needs no --config (our .pth carries it), .npz -> exp_c infers the
  named size from the shapes; a size no named one has is refused naming --config."""
  config, exp_a = small_export
  _, params = export.read_export(exp_a)
  pth, npz = tmp_path / 'small.pth', tmp_path / 'small.npz'
  assert cli.main([str(exp_a), str(pth)]) == 0 and cli.main([str(exp_a), str(npz)]) == 0
  before = _digests(exp_a, pth, npz)
  assert cli.main([str(pth), str(tmp_path / 'exp_b')]) == 0
  assert cli.main([str(npz), str(tmp_path / 'exp_c')]) == 0
  for name in ('exp_b', 'exp_c'):
    got_config, got = export.read_export(tmp_path / name)
    assert got_config == config and _same(got, params), name
  # The chain: exp_b's provenance holds the .pth's, which holds exp_a's.
  prov_b = json.loads((tmp_path / 'exp_b' / 'config.json').read_text())['provenance']
  assert prov_b['kind'] == 'official' and prov_b['source'] == str(pth)
  assert prov_b['converted_from']['kind'] == 'export'
  assert prov_b['converted_from']['source'] == str(exp_a)
  assert _digests(exp_a, pth, npz) == before
  # The fixture's sizes are no named size: its .npz is refused, nothing written.
  assert cli.main([str(FIXTURE), str(tmp_path / 'fix.npz')]) == 0
  capsys.readouterr()
  assert cli.main([str(tmp_path / 'fix.npz'), str(tmp_path / 'exp_d')]) == 2
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1 and 'fix.npz: no named swin_v2 model size fits' in err
  assert '--config' in err and not (tmp_path / 'exp_d').exists()
  # A wrong --config (the headline sizes, as a workdir's config.json) is named, not written.
  (tmp_path / 'run').mkdir()
  (tmp_path / 'run' / 'config.json').write_text(json.dumps(
      {'model': CapeNextConfig().to_dict(), 'optim': {}}))
  assert cli.main([str(npz), str(tmp_path / 'exp_e'), '--config',
                   str(tmp_path / 'run' / 'config.json')]) == 2
  err = capsys.readouterr().err
  assert 'small.npz: --config' in err and 'do not fit the model config' in err
  assert not (tmp_path / 'exp_e').exists() and _leftovers(tmp_path) == []


def test_destinations_refused_and_replaced_whole(tmp_path, small_export, capsys):
  """DST: never SRC, a workdir or a dataset; an existing export / file only with --overwrite,
  and then whole (no file of the old export stays); files get the umask's mode."""
  _, exp_a = small_export
  workdir = tmp_path / 'run'
  (workdir / 'checkpoints').mkdir(parents=True)
  (workdir / 'config.json').write_text('{"model": {}, "optim": {}}')
  dataset = tmp_path / 'data'
  (dataset / 'annotations').mkdir(parents=True)
  (dataset / 'annotations' / 'a.json').write_text('{}')
  state = lambda: _digests(exp_a, workdir, dataset)  # noqa: E731
  before = state()
  for src, dst, flags, message in (
      (exp_a, workdir, ['--overwrite'], 'run: is a train.py workdir, not an export'),
      (workdir, workdir, [], 'run: is the source'),
      (exp_a, dataset, ['--overwrite'], 'data: is a dataset folder'),
      (exp_a, exp_a, ['--overwrite'], 'exp_a: is the source'),
      (exp_a, exp_a / 'inner', [], 'inner: is the source'),
  ):
    assert cli.main([str(src), str(dst), *flags]) == 2, (src, dst)
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err
  assert state() == before
  # An export, then the same DST again: refused, then replaced whole with --overwrite.
  dst = tmp_path / 'exp'
  old_umask = os.umask(0o027)
  try:
    assert cli.main([str(exp_a), str(dst), '--formats', 'safetensors']) == 0
    assert cli.main([str(exp_a), str(tmp_path / 'w.pth')]) == 0
  finally:
    os.umask(old_umask)
  modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in (dst, *dst.iterdir(),
                                                          tmp_path / 'w.pth')}
  assert modes == {'exp': 0o750, 'config.json': 0o640, 'params.safetensors': 0o640,
                   'w.pth': 0o640}
  old = _digests(dst)
  assert cli.main([str(exp_a), str(dst), '--formats', 'msgpack']) == 2
  assert 'exp: holds an export; pass --overwrite' in capsys.readouterr().err
  assert cli.main([str(exp_a), str(tmp_path / 'w.pth')]) == 2
  assert 'w.pth: exists; pass --overwrite' in capsys.readouterr().err
  assert _digests(dst) == old
  assert cli.main([str(exp_a), str(dst), '--formats', 'msgpack', '--overwrite']) == 0
  assert sorted(p.name for p in dst.iterdir()) == ['config.json', 'params.msgpack']
  assert export.read_export(dst)[0] == export.read_export(exp_a)[0]
  assert _leftovers(tmp_path) == []


@pytest.mark.parametrize('fmt', ['safetensors', 'msgpack', 'npz'])
def test_disk_full_names_the_file_and_leaves_nothing(tmp_path, small_export, monkeypatch,
                                                     capsys, fmt):
  """A write that fails half-way (ENOSPC): exit 1, one line naming the file; an old export
  at DST is untouched, and no partial file or temporary folder is left."""
  import errno
  import pathlib

  import safetensors.numpy
  _, exp_a = small_export
  dst = tmp_path / ('w.npz' if fmt == 'npz' else 'exp')
  assert cli.main([str(exp_a), str(dst)] + ([] if fmt == 'npz' else ['--formats', 'msgpack'])
                  ) == 0
  old = _digests(dst)

  def full(path, data: bytes):
    with open(path, 'wb') as f:
      f.write(data[:len(data) // 2])
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

  if fmt == 'safetensors':
    monkeypatch.setattr(safetensors.numpy, 'save_file',
                        lambda tensors, path, metadata=None: full(path, b'x' * 4096))
  elif fmt == 'msgpack':
    monkeypatch.setattr(pathlib.Path, 'write_bytes', lambda self, data: full(self, data))
  else:
    monkeypatch.setattr(np, 'savez', lambda path, **arrays: full(path, b'x' * 4096))
  flags = [] if fmt == 'npz' else ['--formats', fmt]
  assert cli.main([str(exp_a), str(dst), '--overwrite', *flags]) == 1
  err = capsys.readouterr().err.strip()
  name = {'safetensors': 'exp/params.safetensors', 'msgpack': 'exp/params.msgpack',
          'npz': 'w.npz'}[fmt]
  assert len(err.splitlines()) == 1 and f'{name}: could not write it' in err, err
  assert 'No space left on device' in err
  assert _digests(dst) == old and _leftovers(tmp_path) == []


_KILLED = '''
import os, signal, sys
from capenext_jax import atomic, export
from capenext_jax.convert import cli
point, args = sys.argv[1], sys.argv[2:]
def kill(*a, **k):
  os.kill(os.getpid(), signal.SIGKILL)
if point == 'writing':     # the new params file written, the folder not yet in place
  write = export._WRITERS['msgpack']
  export._WRITERS['msgpack'] = lambda *a: (write(*a), kill())
else:                      # the new folder in place, the old one not yet deleted
  atomic.shutil.rmtree = kill
cli.main(args)
'''


def test_kill_9_leaves_the_old_or_the_new_export(tmp_path, small_export, monkeypatch):
  import subprocess
  import sys
  from conftest import REPO
  _, exp_a = small_export
  dst = tmp_path / 'exp'
  assert cli.main([str(exp_a), str(dst), '--formats', 'safetensors']) == 0
  old = {p.name: p.read_bytes() for p in dst.iterdir()}
  env = dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS='cpu')
  for point, expected in (('writing', ['config.json', 'params.safetensors']),
                          ('replaced', ['config.json', 'params.msgpack'])):
    run = subprocess.run([sys.executable, '-c', _KILLED, point, str(exp_a), str(dst),
                          '--formats', 'msgpack', '--overwrite'], env=env, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == -9, run.stderr[-2000:]
    assert sorted(p.name for p in dst.iterdir()) == expected, point
    if point == 'writing':
      assert {p.name: p.read_bytes() for p in dst.iterdir()} == old
    assert export.read_export(dst)[0] == export.read_export(exp_a)[0]
  # Each kill left its hidden temporary beside the export; the next conversion there (a new
  # process: atomic sweeps a folder at a process's first write) deletes both.
  assert len(_leftovers(tmp_path)) == 2
  monkeypatch.setattr(atomic, '_swept', set())
  assert cli.main([str(exp_a), str(dst), '--formats', 'safetensors', '--overwrite']) == 0
  assert _leftovers(tmp_path) == [] and sorted(p.name for p in dst.iterdir()) == [
      'config.json', 'params.safetensors']

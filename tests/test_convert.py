"""capenext-convert: official checkpoint -> export -> official .pth / .npz and back.

The weights are the tiny parity fixture's (official names from the official code's
`state_dict()`, official values). The workdir source is tested in test_eval.py on the workdir
that test trains; `--best` on a reopened Checkpointer in test_training_checkpoint.py.
"""
from __future__ import annotations

import json
import re

import numpy as np
import pytest

from capenext_jax import export, loading
from capenext_jax import params as params_lib
from capenext_jax.convert import cli
from capenext_jax.extras import MissingExtra
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
  config_json = tmp_path / 'sizes.json'
  config_json.write_text(json.dumps(loading.load(FIXTURE).config.to_dict()))
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
  assert json.loads(saved['meta']['capenext_jax'])['kind'] == 'export'
  # .pth (and .npz) -> export again: the same params; the provenance chains back
  assert cli.main([str(tmp_path / 'back.pth'), str(tmp_path / 'exp2'),
                   '--config', str(config_json)]) == 0
  assert _same(export.read_export(tmp_path / 'exp2')[1], params)
  assert cli.main([str(tmp_path / 'exp'), str(tmp_path / 'back.npz')]) == 0
  with np.load(tmp_path / 'back.npz') as z:
    assert set(z.files) == expected
  assert cli.main([str(tmp_path / 'back.npz'), str(tmp_path / 'exp3'), '--dtype', 'bfloat16',
                   '--config', str(config_json)]) == 0
  exp3 = json.loads((tmp_path / 'exp3' / 'config.json').read_text())
  assert exp3['dtype'] == 'bfloat16' and exp3['provenance']['kind'] == 'official'
  # An export of an export remembers where the first one came from.
  assert cli.main([str(tmp_path / 'exp'), str(tmp_path / 'exp4')]) == 0
  exp4 = json.loads((tmp_path / 'exp4' / 'config.json').read_text())['provenance']
  assert exp4['converted_from'] == prov


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

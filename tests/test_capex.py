"""Plain CapeX (fusion=None) against the official CapeXModel built with module_name None.

tests/fixtures/capex_tiny.npz (tests/fixtures/make_capex_fixture.py) holds what the unmodified
official code computed from the shared tiny fixture's weights without `additional_module.*`, on
its batch: outputs, decoded predictions, losses, d loss / d query image and every parameter
gradient (the largest as sketches). The model is built through the official converter, which
reads the missing fusion keys as CapeX, at the record's sizes (`config_json` without
`additional_module`: fusion=None; building refuses params of another layout); check_parity's rows
carry its tolerances.
"""
import json

import numpy as np
import pytest
from conftest import FIXTURES, REPO, load_fixture

from capenext_jax.convert import official
from capenext_jax.tools import check_parity

RECORD = REPO / 'tests' / 'fixtures' / 'capex_tiny.npz'


@pytest.fixture(scope='module')
def shared():
  return load_fixture('tiny_capenext.npz')


def test_converter_reads_a_state_dict_without_fusion_keys_as_capex(shared):
  state = {str(k): shared[str(k)] for k in shared['state_dict_keys']
           if not str(k).startswith('additional_module.')}
  assert official.official_model_config(state).fusion is None
  assert 'fusion' not in official.capenext_from_official(state)


def test_capex_matches_the_official_model(shared, capsys):
  record = np.load(RECORD, allow_pickle=False)
  # The record is CapeX's, not the fused model's: the fusion module moves every keypoint.
  assert np.abs(record['out_kpts'] - shared['out_kpts']).max() > 1e-3
  assert check_parity.main([str(FIXTURES / 'tiny_capenext.npz'), '--capex', str(RECORD)]) == 0
  out = capsys.readouterr().out
  rows = [line.split()[1] for line in out.splitlines() if line.startswith(('ok ', 'BAD'))]
  assert ' 0 failed' in out
  # Everything the record holds was compared (a row per array; the sketch bases are inputs).
  recorded = {k for k in record.files
              if not k.startswith('sketch_basis/') and k not in ('config_json',
                                                                   'grad_none_trainable')}
  assert recorded <= set(rows), sorted(recorded - set(rows))
  assert sum(k.startswith('grad_sketch/') for k in rows) == 16
  # Parameters the official CapeX gives no gradient (frozen CLIP, unused classifier) get exactly
  # zero from ours: check_parity adds a failing row otherwise; the record names them.
  assert {'backbone.head.weight', 'text_backbone.token_embedding.weight'} <= set(
      record['grad_none_trainable'])


def test_a_record_of_other_sizes_is_refused(tmp_path, capsys):
  record = dict(np.load(RECORD, allow_pickle=False))
  cfg = json.loads(str(record['config_json']))
  cfg['keypoint_head']['transformer']['d_model'] = 64
  record['config_json'] = np.array(json.dumps(cfg))
  np.savez(tmp_path / 'other.npz', **record)
  assert check_parity.main([str(FIXTURES / 'tiny_capenext.npz'), '--capex',
                            str(tmp_path / 'other.npz')]) == 2
  assert 'other.npz: recorded at other model sizes' in capsys.readouterr().err

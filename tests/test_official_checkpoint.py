"""Official checkpoints -> our params: every key consumed, safe loading, parity of the whole model."""
import csv

import jax
import numpy as np
import pytest
import torch
from conftest import FIXTURES, SHARED, load_fixture
from flax import nnx

from capenext_jax import params as params_lib
from capenext_jax.convert import official
from capenext_jax.models.capenext import CapeNext, CapeNextConfig
from capenext_jax.models.layers import init_rngs
from capenext_jax.tools import check_parity

TSV = SHARED / 'reference' / 'state_dict_keys.tsv'


def headline_state_dict(dtype_from_tsv=True) -> dict[str, np.ndarray]:
  """All 751 keys of the official checkpoint as zero arrays of their shapes (no memory used)."""
  sd = {}
  with open(TSV) as f:
    for row in csv.DictReader(f, delimiter='\t'):
      shape = tuple(int(d) for d in row['shape'].strip('()').split(',') if d.strip())
      dtype = np.dtype(row['dtype_in_official_ckpt']) if dtype_from_tsv else np.float32
      sd[row['key']] = np.broadcast_to(np.zeros((), dtype), shape)
  return sd


def abstract_headline_model():
  return nnx.eval_shape(lambda: CapeNext(CapeNextConfig(), rngs=init_rngs(0)))


def test_every_official_key_is_consumed_and_shapes_match_the_headline_model():
  sd = headline_state_dict()
  assert len(sd) == 751
  params = official.capenext_from_official(sd)
  expected = nnx.to_pure_dict(nnx.state(abstract_headline_model(), nnx.Param))
  params_lib.check_structure(expected, params)
  # fp16 tensors of GPU-saved checkpoints come out as float32.
  assert {np.asarray(x).dtype for x in jax.tree.leaves(params)} == {np.dtype(np.float32)}
  # The inverse recreates every used key with its official shape.
  back = official.capenext_to_official(params)
  unused = {k for k in sd if k.startswith(('backbone.head.', 'additional_module.non_linear.'))
            or k.endswith(('relative_coords_table', 'relative_position_index', 'attn_mask'))}
  assert set(back) == set(sd) - unused
  for k, v in back.items():
    assert v.shape == sd[k].shape, k


@pytest.mark.parametrize('mutate, message', [
    (lambda sd: sd.pop('keypoint_head.text_proj.bias'), 'text_proj.bias'),
    (lambda sd: sd.__setitem__('keypoint_head.surprise.weight', np.zeros(3)), 'surprise'),
    (lambda sd: sd.__setitem__('module.backbone.norm.weight', np.zeros(3)), 'module.backbone'),
])
def test_mismatched_keys_are_named(mutate, message):
  sd = dict(headline_state_dict())
  mutate(sd)
  with pytest.raises(ValueError, match=message):
    official.capenext_from_official(sd)


def test_wrong_shape_is_named_when_loading():
  z = load_fixture('tiny_capenext.npz')
  sd = {k: z[k] for k in z['state_dict_keys']}
  # The headline model's shapes (abstract: no weights are initialised), tiny weights. load_into
  # compares shapes before it writes anything, so the abstract model takes the same path.
  model = abstract_headline_model()
  with pytest.raises(ValueError, match=r'params/\w+.*shape'):
    params_lib.load_into(model, official.capenext_from_official(sd))


def test_mmcv_pth_loads_like_the_npz(tmp_path):
  z = load_fixture('tiny_capenext.npz')
  sd = {str(k): z[k] for k in z['state_dict_keys']}
  tensors = {str(k): torch.from_numpy(np.array(v)) for k, v in sd.items()}
  # A GPU-saved checkpoint keeps CLIP's matrices in fp16.
  tensors['text_backbone.text_projection'] = tensors['text_backbone.text_projection'].half()
  path = tmp_path / 'epoch_200.pth'
  torch.save({'meta': {'epoch': 200}, 'state_dict': tensors,
              'optimizer': {'state': {}, 'param_groups': [{'lr': 1e-7}]}}, path)
  from_pth = official.load_official(str(path))
  from_npz = official.capenext_from_official({str(k): v for k, v in sd.items()})
  flat_pth, flat_npz = (jax.tree.leaves_with_path(p) for p in (from_pth, from_npz))
  for (path_a, a), (path_b, b) in zip(flat_pth, flat_npz, strict=True):
    assert path_a == path_b
    tol = 1e-3 * np.abs(b).max() if 'text_projection' in jax.tree_util.keystr(path_a) else 0
    np.testing.assert_allclose(a, b, atol=tol)


def test_check_parity_passes_on_the_tiny_fixture(capsys):
  assert check_parity.main([str(FIXTURES / 'tiny_capenext.npz')]) == 0
  out = capsys.readouterr().out
  assert ' 0 failed' in out and 'grad/keypoint_head.text_proj.weight' in out


def test_check_parity_refuses_a_unit_fixture_by_name(capsys):
  path = FIXTURES / 'unit_swinv2_small.npz'
  assert check_parity.main([str(path)]) == 2
  assert f'{path}: not a whole-model parity fixture' in capsys.readouterr().err

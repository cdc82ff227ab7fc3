"""Weights in and out: params-only export / load_pretrained, pretrained imports, safe reading.

The Microsoft-layout Swin V2 round trip is tested in test_swin_v2.py
(test_microsoft_layout_round_trip) and the HF CLIP safetensors vs transformers check in
test_clip.py (test_hf_clip_matches_transformers); here we test what sits on top of them.
The model is the tiny parity fixture's (official weights, image size 64), built through
`export.build_model` (no random init, seconds).
"""
from __future__ import annotations

import dataclasses
import json
import os
import pickle
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import capenext_jax
from capenext_jax import export, loading
from capenext_jax import params as params_lib
from capenext_jax.convert import clip as clip_convert
from capenext_jax.convert import official
from capenext_jax.convert import swin as swin_convert
from capenext_jax.models.capenext import CapeNextConfig
from capenext_jax.tools.check_parity import fixture_batch
from conftest import REPO, load_fixture

# Imported by nothing that load_pretrained needs (optax is absent: flax.nnx itself imports it).
FORBIDDEN = ('tensorflow', 'torch', 'transformers', 'clu', 'ml_collections', 'PIL', 'orbax',
             'ftfy', 'regex', 'data_pipeline', 'tensorboard')


@pytest.fixture(scope='module')
def fixture():
  return load_fixture('tiny_capenext.npz')


@pytest.fixture(scope='module')
def tiny(fixture):
  """(config, params) of the fixture's official weights."""
  config = official.config_from_fixture(json.loads(str(fixture['config_json'])))
  state_dict = {str(k): fixture[str(k)] for k in fixture['state_dict_keys']}
  return config, official.capenext_from_official(state_dict)


_keypoints = nnx.jit(lambda m, b: m(
    b['query_image'], b['support_mask'], b['adjacency'], keypoint_tokens=b['keypoint_tokens'],
    category_tokens=b['category_tokens'])['keypoints'])


def _same_params(a, b) -> bool:
  fa, fb = params_lib.flatten(a), params_lib.flatten(b)
  return fa.keys() == fb.keys() and all(np.array_equal(fa[k], fb[k]) for k in fa)


def test_config_dict_round_trip():
  for config in (CapeNextConfig(), dataclasses.replace(CapeNextConfig(), fusion=None)):
    assert CapeNextConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
  with pytest.raises(ValueError, match='unknown fields'):
    CapeNextConfig.from_dict({'head': {'d_model': 8, 'bogus': 1}})


def test_flat_names(tiny):
  _, params = tiny
  flat = params_lib.flatten(params)
  assert 'backbone/layers/0/blocks/1/attn/qkv/kernel' in flat
  assert 'clip/text/transformer/resblocks/0/attn/q_proj/kernel' in flat
  assert _same_params(params_lib.unflatten(flat), params)
  assert 0 in params_lib.unflatten(flat)['backbone']['layers']  # int keys, as NNX has


def test_formats_and_dtypes_round_trip(tmp_path, tiny):
  config, params = tiny
  export.export_params(params, config, tmp_path / 'f32', formats=('safetensors', 'msgpack',
                                                                  'orbax'))
  for name in ('', 'params.safetensors', 'params.msgpack', 'params.orbax'):
    got_config, got = export.read_export(tmp_path / 'f32' / name)
    assert got_config == config and _same_params(got, params), name


def test_bfloat16_export(tmp_path, fixture, tiny):
  """A bf16 export stores exactly the round-to-nearest bf16 of every float32 param in each
  format; loaded as bf16 the model's keypoints stay close to the float32 model's."""
  config, params = tiny
  flat = params_lib.flatten(params)
  assert {v.dtype for v in flat.values()} == {np.dtype(np.float32)}  # all floating: all cast
  expected = {k: np.asarray(v).astype(jnp.bfloat16) for k, v in flat.items()}
  export.export_params(params, config, tmp_path, formats=tuple(export.PARAM_FILES),
                       dtype='bfloat16')
  batch = fixture_batch(fixture)
  keypoints = {}
  for fmt, name in export.PARAM_FILES.items():
    got_config, got = export.read_export(tmp_path / name)
    got = params_lib.flatten(got)
    assert got_config == config and got.keys() == expected.keys(), fmt
    for k, v in expected.items():
      assert got[k].dtype == v.dtype and got[k].shape == v.shape, (fmt, k)
      np.testing.assert_array_equal(got[k].view(np.uint16), v.view(np.uint16), f'{fmt} {k}')
    model = capenext_jax.load_pretrained(tmp_path / name, dtype=jnp.bfloat16)
    assert model.head.text_proj.kernel[...].dtype == jnp.bfloat16
    keypoints[fmt] = np.asarray(_keypoints(model, batch), np.float32)
  # The same weights whatever the format, so the same keypoints.
  for fmt in ('msgpack', 'orbax'):
    np.testing.assert_array_equal(keypoints[fmt], keypoints['safetensors'], fmt)
  # Against the official float32 model (ours matches it to 1e-5: test_export_loads_in_fresh_
  # process_without_tf); keypoints in [0, 1]: measured max 3.0e-3, 2e-2 leaves ~7x headroom.
  np.testing.assert_allclose(keypoints['safetensors'], fixture['out_kpts'], rtol=0, atol=2e-2)
  # Loaded with the default dtype: float32 holding exactly the bf16 values.
  got = params_lib.flatten(export.model_params(capenext_jax.load_pretrained(tmp_path)))
  for k, v in expected.items():
    assert got[k].dtype == np.float32, k
    np.testing.assert_array_equal(got[k], v.astype(np.float32), k)


def test_load_errors(tmp_path, tiny):
  config, params = tiny
  export.export_params(params, config, tmp_path / 'ok')
  header = json.loads((tmp_path / 'ok' / 'config.json').read_text())
  wrong = dataclasses.replace(config, head=dataclasses.replace(config.head, dim_feedforward=64))
  with pytest.raises(ValueError, match=r'do not fit the model config \(params/head/.*shape'):
    export.export_params(params, wrong, tmp_path / 'shape', formats=('msgpack',))
  assert not (tmp_path / 'shape').exists()
  # An export that does not fit (written by other means, digests consistent): the loader says so.
  export.export_params(params, config, tmp_path / 'shape', formats=('msgpack',))
  edited = json.loads((tmp_path / 'shape' / 'config.json').read_text())
  edited['config'] = wrong.to_dict()
  edited['digest']['config'] = export.config_digest(edited['config'])
  (tmp_path / 'shape' / 'config.json').write_text(json.dumps(edited))
  with pytest.raises(ValueError, match=r'params/head/.*shape'):
    capenext_jax.load_pretrained(tmp_path / 'shape')
  (tmp_path / 'ok' / 'params.safetensors').rename(tmp_path / 'lone.safetensors')
  assert export.read_export(tmp_path / 'lone.safetensors')[0] == config  # header carries it
  (tmp_path / 'ok' / 'config.json').write_text(json.dumps({**header, 'version': 99}))
  (tmp_path / 'ok' / 'params.msgpack').write_bytes(b'')
  with pytest.raises(ValueError, match='version 99'):
    export.read_export(tmp_path / 'ok')


def test_loader_kinds_and_refusals(tmp_path, tiny):
  """`loading.kind_of` names every weights source; a config is refused where one is stored."""
  from conftest import FIXTURES
  config, params = tiny
  export.export_params(params, config, tmp_path / 'export')
  (tmp_path / 'workdir' / 'checkpoints').mkdir(parents=True)
  (tmp_path / 'workdir' / 'config.json').write_text('{}')      # a workdir has both
  np.savez(tmp_path / 'official.npz', **official.capenext_to_official(params))
  (tmp_path / 'notes.txt').write_text('not weights')
  kinds = {name: loading.kind_of(tmp_path / name)
           for name in ('export', 'workdir', 'official.npz')}
  assert kinds == {'export': 'export', 'workdir': 'workdir', 'official.npz': 'official'}
  assert loading.kind_of(FIXTURES / 'tiny_capenext.npz') == 'fixture'
  with pytest.raises(ValueError, match=r'notes.txt: not a checkpoint'):
    loading.kind_of(tmp_path / 'notes.txt')
  with pytest.raises(ValueError, match=r'missing.pth: no such checkpoint'):
    loading.kind_of(tmp_path / 'missing.pth')
  with pytest.raises(ValueError, match=r'export: this export carries its own model config'):
    loading.load(tmp_path / 'export', config=config)
  # Official weights at the fixture's sizes: the same params as the export of them.
  got = loading.load(tmp_path / 'official.npz', config=config)
  assert got.kind == 'official' and got.config == config and _same_params(got.params, params)


_CHILD = textwrap.dedent('''
    import importlib.abc, sys
    FORBIDDEN, (export_dir, batch_file, out_file) = {forbidden!r}, sys.argv[1:]
    attempted = []

    class Refuse(importlib.abc.MetaPathFinder):
      def find_spec(self, name, path, target=None):
        if any(name == f or name.startswith(f + '.') for f in FORBIDDEN):
          attempted.append(name)
          raise ImportError(f'{{name}} is blocked in this test')

    sys.meta_path.insert(0, Refuse())
    import numpy as np
    import capenext_jax
    model = capenext_jax.load_pretrained(export_dir)
    from flax import nnx
    keypoints = nnx.jit(lambda m, b: m(
        b['query_image'], b['support_mask'], b['adjacency'], keypoint_tokens=b['keypoint_tokens'],
        category_tokens=b['category_tokens'])['keypoints'])
    np.save(out_file, np.asarray(keypoints(model, dict(np.load(batch_file)))))
    assert not attempted, attempted
    assert not any(m in sys.modules for m in FORBIDDEN), 'imported'
''')


def test_export_loads_in_fresh_process_without_tf(tmp_path, fixture, tiny):
  config, params = tiny
  export.export_params(params, config, tmp_path / 'export')
  batch = fixture_batch(fixture)
  np.savez(tmp_path / 'batch.npz', **{k: batch[k] for k in (
      'query_image', 'support_mask', 'adjacency', 'keypoint_tokens', 'category_tokens')})
  # Without the tests' shared compilation cache (conftest): a user's process has none, and
  # reading one imports TensorFlow's file system through etils when it is installed.
  env = {**os.environ, 'PYTHONPATH': str(REPO), 'JAX_PLATFORMS': 'cpu',
         'JAX_COMPILATION_CACHE_DIR': ''}
  run = subprocess.run([sys.executable, '-c', _CHILD.format(forbidden=FORBIDDEN),
                        str(tmp_path / 'export'), str(tmp_path / 'batch.npz'),
                        str(tmp_path / 'out.npy')],
                       capture_output=True, text=True, env=env, timeout=300)
  assert run.returncode == 0, run.stderr[-3000:]
  theirs = np.load(tmp_path / 'out.npy')
  # the official PyTorch model's keypoints on the same batch
  np.testing.assert_allclose(theirs, fixture['out_kpts'], atol=1e-5)
  ours = _keypoints(export.build_model(config, params), batch)
  np.testing.assert_array_equal(theirs, np.asarray(ours))


def test_init_from_pretrained(tmp_path, tiny):
  import torch
  config, params = tiny
  model = export.build_model(config, jax.tree.map(np.zeros_like, params))
  # Microsoft's release layout: {'model': state dict} with buffers and a classifier head
  swin_sd = swin_convert.swin_to_torch(params['backbone'])
  swin_sd.update(swin_convert.swin_buffers(config.backbone))
  swin_sd.update({'head.weight': np.zeros((10, 96), np.float32),
                  'head.bias': np.zeros(10, np.float32)})
  torch.save({'model': {k: torch.from_numpy(np.asarray(v)) for k, v in swin_sd.items()}},
             tmp_path / 'swinv2.pth')
  np.savez(tmp_path / 'clip.npz', **clip_convert.clip_to_openai(params['clip']))
  loading.init_from_pretrained(model, backbone_path=tmp_path / 'swinv2.pth',
                                  clip_path=tmp_path / 'clip.npz')
  got = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  assert _same_params(got['backbone'], params['backbone'])
  assert _same_params(got['clip'], params['clip'])
  assert not np.any(got['head']['text_proj']['kernel'])  # the rest is untouched
  del swin_sd['norm.weight']
  np.savez(tmp_path / 'broken.npz', **swin_sd)
  with pytest.raises(ValueError, match=r'broken\.npz.*norm\.weight'):
    loading.init_from_pretrained(model, backbone_path=tmp_path / 'broken.npz')


class _Evil:
  """Unpickling this would create the marker file."""

  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):
    return (open, (self.marker, 'w'))


def test_malicious_pickle_is_refused(tmp_path, tiny):
  import torch
  marker = tmp_path / 'MARKER'
  raw, zipped = tmp_path / 'raw.pth', tmp_path / 'zipped.pth'
  with open(raw, 'wb') as f:
    pickle.dump({'state_dict': {'w': _Evil(str(marker))}}, f)
  torch.save({'model': {'w': _Evil(str(marker))}}, zipped)
  model = export.build_model(*tiny)
  for path in (raw, zipped):
    with pytest.raises(ValueError, match='refused'):
      loading.init_from_pretrained(model, backbone_path=path)
    with pytest.raises(ValueError, match='refused'):
      official.load_official(path)
  assert not marker.exists()

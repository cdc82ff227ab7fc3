"""CLIP towers and converters: official fixture, Hugging Face CLIPModel, OpenAI round trip."""
from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from capenext_jax.convert import clip as convert
from capenext_jax.convert.torch_io import load_state_dict
from capenext_jax.models.clip import CLIP, CLIPConfig
from capenext_jax.models.layers import init_rngs
from capenext_jax.text.tokenizer import EOT_ID, tokenize
from conftest import load_fixture

ATOL = 1e-5


@pytest.fixture(scope='module')
def fixture():
  with load_fixture('unit_clip_tiny.npz') as z:
    return {k: z[k] for k in z.files}


@pytest.fixture(scope='module')
def openai_sd(fixture):
  return {k[2:]: v for k, v in fixture.items() if k.startswith('w.')}


def build(config: CLIPConfig, params: dict) -> CLIP:
  model = CLIP(config, rngs=nnx.Rngs(0))
  state = nnx.state(model, nnx.Param)
  state.replace_by_pure_dict(params)
  nnx.update(model, state)
  return model


@pytest.fixture(scope='module')
def model(fixture, openai_sd):
  config = CLIPConfig(**json.loads(str(fixture['config_json'])))
  return build(config, convert.clip_from_openai(openai_sd))


def assert_close(ours, ref, name):
  err = np.abs(np.asarray(ours) - ref).max()
  assert err <= ATOL, f'{name}: max |diff| {err:.3g}'


# ----------------------------------------------------------------------------- model / layout
def test_pure_dict_matches_model_state(fixture, openai_sd):
  config = CLIPConfig(**json.loads(str(fixture['config_json'])))
  expected = nnx.to_pure_dict(nnx.state(CLIP(config, rngs=nnx.Rngs(0)), nnx.Param))
  params = convert.clip_from_openai(openai_sd)
  assert jax.tree.structure(params) == jax.tree.structure(expected)
  assert jax.tree.leaves(jax.tree.map(lambda a, b: a.shape == b.shape, params, expected)) \
      == [True] * len(jax.tree.leaves(expected))
  assert all(a.dtype == np.float32 for a in jax.tree.leaves(params))


def test_vit_b32_parameter_count():
  model = nnx.eval_shape(lambda: CLIP(CLIPConfig(), rngs=init_rngs(0)))
  assert sum(p.size for p in jax.tree.leaves(nnx.state(model, nnx.Param))) == 151_277_313  # docs/MODEL.md §7


def test_config_from_openai(fixture, openai_sd):
  config = CLIPConfig(**json.loads(str(fixture['config_json'])))
  # Head counts are not in the shapes: OpenAI's build_model assumes head size 64.
  assert convert.config_from_openai(openai_sd) == CLIPConfig(**{
      **json.loads(str(fixture['config_json'])), 'transformer_heads': 1})
  assert config.vision_num_heads == 1


# ----------------------------------------------------------------------------- fixture parity
def test_text_tower_matches_fixture(fixture, model):
  tokens = tokenize(list(fixture['prompts']), truncate=True)
  np.testing.assert_array_equal(tokens, fixture['in_tokens'])
  features, inter = nnx.jit(lambda m, t: m.text(t, capture=True))(model, jnp.asarray(tokens))
  for i in range(model.config.transformer_layers):
    assert_close(inter[f'block{i}'], fixture[f'text_block{i}'].transpose(1, 0, 2), f'block{i}')
  assert_close(inter['ln_final'], fixture['text_ln_final'], 'ln_final')
  assert_close(features, fixture['out_text_features'], 'out_text_features')
  assert_close(model.encode_text(jnp.asarray(tokens)), fixture['out_text_features'],
               'encode_text')


def test_image_tower_matches_fixture(fixture, model):
  images = jnp.asarray(fixture['in_images'].transpose(0, 2, 3, 1))  # NCHW -> NHWC
  features, inter = nnx.jit(lambda m, x: m.vision(x, capture=True))(model, images)
  assert_close(inter['conv1'], fixture['image_conv1'].transpose(0, 2, 3, 1), 'conv1')
  assert_close(inter['ln_pre'], fixture['image_ln_pre'], 'ln_pre')
  for i in range(model.config.vision_layers):
    assert_close(inter[f'block{i}'], fixture[f'image_block{i}'].transpose(1, 0, 2), f'block{i}')
  assert_close(inter['ln_post'], fixture['image_ln_post'], 'ln_post')
  assert_close(features, fixture['out_image_features'], 'out_image_features')


def test_wrong_image_size_raises(model):
  with pytest.raises(ValueError, match='NHWC'):
    model.encode_image(jnp.zeros((1, 3, 224, 224)))


# ----------------------------------------------------------------------------- converters
def test_openai_round_trip(openai_sd):
  back = convert.clip_to_openai(convert.clip_from_openai(openai_sd))
  assert set(back) == set(openai_sd)
  for k, v in openai_sd.items():
    assert back[k].dtype == v.dtype and back[k].shape == v.shape, k
    np.testing.assert_array_equal(back[k], v, err_msg=k)


def test_round_trip_accepts_string_block_keys(openai_sd):
  params = convert.clip_from_openai(openai_sd)  # a fresh dict: safe to edit in place
  blocks = params['text']['transformer']['resblocks']
  params['text']['transformer']['resblocks'] = {str(k): v for k, v in blocks.items()}
  assert set(convert.clip_to_openai(params)) == set(openai_sd)


def test_unknown_and_missing_keys_raise(openai_sd):
  with pytest.raises(ValueError, match="'visual.extra'"):
    convert.clip_from_openai({**openai_sd, 'visual.extra': np.zeros(1, np.float32)})
  missing = dict(openai_sd)
  del missing['visual.ln_post.bias']
  with pytest.raises(ValueError, match="'visual.ln_post.bias'"):
    convert.clip_from_openai(missing)
  params = convert.clip_from_openai(openai_sd)
  with pytest.raises(ValueError, match="'vision/extra'"):
    convert.clip_to_openai({**params, 'vision': {**params['vision'], 'extra': np.zeros(1)}})


def test_load_clip_fp16_npz_and_pth(tmp_path, fixture, openai_sd):
  import torch
  half = {k: v.astype(np.float16) for k, v in openai_sd.items()}
  np.savez(tmp_path / 'clip.npz', **half)
  torch.save({'state_dict': {k: torch.from_numpy(v) for k, v in half.items()}},
             tmp_path / 'clip.pth')
  config = CLIPConfig(**json.loads(str(fixture['config_json'])))
  for name in ('clip.npz', 'clip.pth'):
    loaded_config, params = convert.load_clip(tmp_path / name, config)
    assert loaded_config == config
    leaves = jax.tree.leaves(params)
    assert all(a.dtype == np.float32 for a in leaves)
    np.testing.assert_array_equal(params['text']['text_projection'],
                                  half['text_projection'].astype(np.float32))
  with pytest.raises(ValueError, match='vision_width'):
    convert.load_clip(tmp_path / 'clip.npz', CLIPConfig(**{
        **json.loads(str(fixture['config_json'])), 'vision_width': 128}))


def test_load_state_dict_bf16_safetensors(tmp_path):
  import torch
  from safetensors.torch import save_file
  save_file({'w': torch.tensor([1.5, -2.0], dtype=torch.bfloat16)}, tmp_path / 'w.safetensors')
  sd = load_state_dict(tmp_path / 'w.safetensors')
  assert sd['w'].dtype == np.float32 and sd['w'].tolist() == [1.5, -2.0]


def test_load_state_dict_errors(tmp_path):
  with pytest.raises(ValueError, match='no such file'):
    load_state_dict(tmp_path / 'missing.pth')
  (tmp_path / 'w.txt').write_text('x')
  with pytest.raises(ValueError, match='unknown weight file type'):
    load_state_dict(tmp_path / 'w.txt')


# ----------------------------------------------------------------------------- Hugging Face
@pytest.fixture(scope='module')
def hf_model_dir(tmp_path_factory):
  """A small random transformers CLIPModel saved as safetensors (vision head size 16)."""
  import torch
  import transformers
  sizes = dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2,
               hidden_act='quick_gelu')
  config = transformers.CLIPConfig(
      text_config=dict(**sizes, num_attention_heads=2, vocab_size=49408,
                       max_position_embeddings=77),
      vision_config=dict(**sizes, num_attention_heads=4, image_size=64, patch_size=16),
      projection_dim=32)
  torch.manual_seed(0)
  model = transformers.CLIPModel._from_config(config, attn_implementation='eager').eval()
  with torch.no_grad():  # LayerNorms are 1/0 and biases 0 after init: make them matter
    for name, p in model.named_parameters():
      if p.ndim == 1 or name == 'logit_scale':
        p.add_(0.1 * torch.randn_like(p))
  path = tmp_path_factory.mktemp('hf_clip')
  model.save_pretrained(path)
  return model, path


def test_hf_clip_matches_transformers(hf_model_dir):
  import torch
  hf, path = hf_model_dir
  config, params = convert.load_clip(path)
  assert (config.vision_num_heads, config.transformer_heads, config.embed_dim) == (4, 2, 32)
  ours = build(config, params)

  tokens = tokenize(['left eye', 'a photo of a dog', '', 'Left Front Paw!!'])
  tokens[tokens == 0] = EOT_ID  # HF pads with EOT: the first-EOT pooling must not move
  images = np.random.RandomState(0).standard_normal((2, 3, 64, 64)).astype(np.float32)
  with torch.no_grad():
    text_ref = hf.get_text_features(input_ids=torch.from_numpy(tokens).long())
    image_ref = hf.get_image_features(pixel_values=torch.from_numpy(images))
  # transformers 5 returns model outputs whose pooler_output is the projected feature.
  text_ref = getattr(text_ref, 'pooler_output', text_ref).numpy()
  image_ref = getattr(image_ref, 'pooler_output', image_ref).numpy()
  assert_close(ours.encode_text(jnp.asarray(tokens)), text_ref, 'text features')
  assert_close(ours.encode_image(jnp.asarray(images.transpose(0, 2, 3, 1))), image_ref,
               'image features')
  np.testing.assert_allclose(params['logit_scale'], hf.logit_scale.detach().numpy())


def test_hf_unknown_key_raises(hf_model_dir):
  _, path = hf_model_dir
  sd = load_state_dict(path / 'model.safetensors')
  with pytest.raises(ValueError, match="'text_model.extra'"):
    convert.clip_from_hf({**sd, 'text_model.extra': np.zeros(1, np.float32)})

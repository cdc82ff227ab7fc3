"""Our CLIP BPE tokenizer against OpenAI's `SimpleTokenizer` and the official fixture."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from capenext_jax.text.tokenizer import EOT_ID, SOT_ID, tokenize
from conftest import load_fixture

TEXTS = [
    '', 'left eye', 'a photo of dog', 'Left Front Paw!!', 'ROOT  of\tthe\n tail',
    'café crème brûlée naïve', 'Zürich Straße', '東京タワーの写真', '猫の左耳', '한국어 텍스트',
    'emoji 🐶🐱 dog😀cat 👍🏽', 'fish &amp; chips &lt;b&gt; &amp;amp; &quot;x&quot; &#39;y&#39;',
    "it's don't we're I've I'm you'll he'd", 'a.b,c;d:e!f?g (h) [i] {j} <k> -- ... ---',
    '12345 3.14159 1e-3 #42 $5 100%', 'mojibake: cafÃ© â€œquotedâ€\x9d', 'x' * 300,
    'supercalifragilisticexpialidocious antidisestablishmentarianism',
    '<|startoftext|> literal <|endoftext|>', '   leading and trailing   ', 'tab\tand\u00a0nbsp',
    'Ω≈ç√∫˜µ≤≥÷ ¡™£¢∞§¶•ªº', 'the ' * 75, 'the ' * 76,  # 77 tokens fit, 78 do not
]


@pytest.fixture(scope='module')
def reference():
  """OpenAI's SimpleTokenizer, loaded by file path (clip/__init__ imports torchvision)."""
  spec = importlib.util.find_spec('clip')
  if spec is None or not spec.submodule_search_locations:
    raise ModuleNotFoundError("openai-clip (package 'clip') is a test dependency and is not "
                              'installed: pip install openai-clip')
  path = Path(list(spec.submodule_search_locations)[0]) / 'simple_tokenizer.py'
  if not path.is_file():
    raise FileNotFoundError(f'openai-clip is installed but {path} is missing')
  module_spec = importlib.util.spec_from_file_location('_openai_simple_tokenizer', path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.SimpleTokenizer()


def reference_tokenize(tok, text: str, context_length: int = 77) -> np.ndarray | None:
  """`clip.tokenize` for one text; None when it does not fit."""
  ids = [SOT_ID, *tok.encode(text), EOT_ID]
  if len(ids) > context_length:
    return None
  row = np.zeros(context_length, np.int32)
  row[:len(ids)] = ids
  return row


@pytest.mark.parametrize('text', TEXTS)
def test_matches_openai(reference, text):
  expected = reference_tokenize(reference, text)
  if expected is None:
    with pytest.raises(ValueError, match='more than the context length'):
      tokenize(text)
    expected = np.array([SOT_ID, *reference.encode(text)[:75], EOT_ID], np.int32)
    np.testing.assert_array_equal(tokenize(text, truncate=True)[0], expected)
  else:
    np.testing.assert_array_equal(tokenize(text)[0], expected)


def test_batch_shape_and_special_ids():
  out = tokenize(['', 'nose', 'left eye'])
  assert out.shape == (3, 77) and out.dtype == np.int32
  np.testing.assert_array_equal(out[0, :3], [SOT_ID, EOT_ID, 0])
  assert (out[:, 0] == SOT_ID).all()
  assert (out.argmax(-1) == [1, 2, 3]).all()  # first EOT; zero padding after it
  assert tokenize('nose').shape == (1, 77)
  assert tokenize('nose', context_length=5).shape == (1, 5)


def test_too_long_names_the_text():
  text = 'word ' * 80
  with pytest.raises(ValueError, match=r"'word word .*' is 82 tokens long"):
    tokenize(['fine', text])
  out = tokenize(['fine', text], truncate=True)
  assert out[1, -1] == EOT_ID and (out[1, 1:-1] != EOT_ID).all()


def test_matches_fixture_tokens():
  with load_fixture('unit_clip_tiny.npz') as z:
    np.testing.assert_array_equal(tokenize(list(z['prompts']), truncate=True), z['in_tokens'])

"""CLIP's byte-level BPE tokenizer, offline, identical in output to OpenAI's `clip.tokenize`.

The merges file `bpe_simple_vocab_16e6.txt.gz` (MIT, OpenAI) ships next to this module.
Text is cleaned as OpenAI does (ftfy, double html unescape, whitespace collapse, lower case),
split with OpenAI's regex, mapped to printable byte symbols and merged by BPE rank.
"""
from __future__ import annotations

import functools
import gzip
import html
import os
from collections.abc import Sequence
from pathlib import Path

import ftfy
import numpy as np
import regex

SOT_TOKEN, EOT_TOKEN = '<|startoftext|>', '<|endoftext|>'
SOT_ID, EOT_ID = 49406, 49407
CONTEXT_LENGTH = 77
DEFAULT_BPE_PATH = Path(__file__).with_name('bpe_simple_vocab_16e6.txt.gz')
_NUM_MERGES = 49152 - 256 - 2  # merges OpenAI keeps; vocab = 2 x 256 bytes + merges + 2 specials

_PATTERN = regex.compile(
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|"""
    r"""[^\s\p{L}\p{N}]+""", regex.IGNORECASE)
_WHITESPACE = regex.compile(r'\s+')


@functools.lru_cache(maxsize=None)
def bytes_to_unicode() -> dict[int, str]:
  """GPT-2's byte -> printable character table: printable Latin-1 bytes map to themselves,
  the others to code points 256+ (so BPE never sees whitespace or control characters)."""
  keep = [*range(ord('!'), ord('~') + 1), *range(ord('¡'), ord('¬') + 1),
          *range(ord('®'), ord('ÿ') + 1)]
  table = {b: chr(b) for b in keep}
  for n, b in enumerate(b for b in range(256) if b not in table):
    table[b] = chr(256 + n)
  return table  # insertion order (kept bytes, then the rest) fixes the vocabulary ids


def clean_text(text: str) -> str:
  """OpenAI's basic_clean + whitespace_clean + lower()."""
  text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
  return _WHITESPACE.sub(' ', text).strip().lower()


class Tokenizer:
  """Byte-level BPE with OpenAI's vocabulary; `encode` gives ids without SOT / EOT."""

  def __init__(self, bpe_path: str | os.PathLike = DEFAULT_BPE_PATH):
    with gzip.open(bpe_path, 'rt', encoding='utf-8') as f:
      lines = f.read().split('\n')
    merges = [tuple(line.split()) for line in lines[1:_NUM_MERGES + 1]]  # line 0: header
    byte_symbols = list(bytes_to_unicode().values())
    vocab = [*byte_symbols, *(s + '</w>' for s in byte_symbols), *(''.join(m) for m in merges),
             SOT_TOKEN, EOT_TOKEN]
    self.encoder = {s: i for i, s in enumerate(vocab)}
    self.byte_encoder = bytes_to_unicode()
    self.bpe_ranks = {m: i for i, m in enumerate(merges)}
    # Literal special-token strings in the text encode as the special ids, as in OpenAI.
    self._cache = {SOT_TOKEN: (SOT_ID,), EOT_TOKEN: (EOT_ID,)}

  def _bpe(self, word: str) -> list[str]:
    """Merge the symbols of one pre-token (byte symbols, `</w>` on the last) by rank."""
    symbols = [*word[:-1], word[-1] + '</w>']
    while len(symbols) > 1:
      pairs = set(zip(symbols, symbols[1:]))
      best = min(pairs, key=lambda p: self.bpe_ranks.get(p, float('inf')))
      if best not in self.bpe_ranks:
        break
      merged, i = [], 0
      while i < len(symbols):  # merge every occurrence, left to right
        if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == best:
          merged.append(symbols[i] + symbols[i + 1])
          i += 2
        else:
          merged.append(symbols[i])
          i += 1
      symbols = merged
    return symbols

  def _encode_word(self, word: str) -> tuple[int, ...]:
    ids = self._cache.get(word)
    if ids is None:
      symbols = ''.join(self.byte_encoder[b] for b in word.encode('utf-8'))
      ids = self._cache[word] = tuple(self.encoder[s] for s in self._bpe(symbols))
    return ids

  def encode(self, text: str) -> list[int]:
    """BPE ids of `text` (cleaned, lower-cased), without SOT / EOT."""
    return [i for word in _PATTERN.findall(clean_text(text)) for i in self._encode_word(word)]

  def __call__(self, texts: str | Sequence[str], context_length: int = CONTEXT_LENGTH,
               truncate: bool = False) -> np.ndarray:
    """`clip.tokenize`: int32 [N, context_length] rows `SOT ids EOT 0 ...`.

    A text longer than context_length (SOT and EOT included) raises ValueError naming it,
    unless `truncate`, which keeps the first context_length - 1 tokens and puts EOT last.
    """
    if isinstance(texts, str):
      texts = [texts]
    out = np.zeros((len(texts), context_length), np.int32)
    for row, text in zip(out, texts):
      ids = [SOT_ID, *self.encode(text), EOT_ID]
      if len(ids) > context_length:
        if not truncate:
          raise ValueError(f'text {str(text)!r} is {len(ids)} tokens long, more than the context '
                           f'length {context_length}')
        ids = ids[:context_length - 1] + [EOT_ID]
      row[:len(ids)] = ids
    return out


@functools.lru_cache(maxsize=1)
def default_tokenizer() -> Tokenizer:
  """The shared tokenizer on the shipped vocabulary (loaded once, ~0.5 s)."""
  return Tokenizer()


def tokenize(texts: str | Sequence[str], context_length: int = CONTEXT_LENGTH,
             truncate: bool = False) -> np.ndarray:
  """`clip.tokenize(texts, context_length, truncate)` as int32 [N, context_length]."""
  return default_tokenizer()(texts, context_length, truncate)

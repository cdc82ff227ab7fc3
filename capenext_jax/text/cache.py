"""Frozen text-embedding cache.

CLIP's text tower is frozen and its inputs (a category's keypoint descriptions and the prompt
"a photo of {name}") do not change during training, yet it is ~75% of the official step's FLOPs.
We encode each category once and gather rows by `category_index` inside the jitted step.

Each description is its own CLIP sequence, so encoding all of a category's descriptions and
masking afterwards equals the official per-episode encoding of the visible ones (docs/MODEL.md §1.2).
"""
from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from capenext_jax.device.partition import to_host
from capenext_jax.text.tokenizer import tokenize

NUM_SLOTS = 100


def category_prompt(name: str) -> str:
  """The official prompt: category name with '_' as spaces (docs/MODEL.md §1.4)."""
  return 'a photo of ' + name.replace('_', ' ')


@dataclasses.dataclass(frozen=True)
class CategoryText:
  """What the text tower sees of one category."""
  name: str
  descriptions: Sequence[str]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TextCache:
  """keypoint [C, 100, E] (zero rows past each category's keypoints), category [C, E].

  A pytree, so the jitted steps take it as an argument (forward.make_forward)."""
  keypoint: jax.Array
  category: jax.Array

  def lookup(self, category_index: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Rows for a batch: category_index int [B] -> ([B, 100, E], [B, E])."""
    return self.keypoint[category_index], self.category[category_index]


def tokenize_categories(categories: Sequence[CategoryText]) -> tuple[np.ndarray, np.ndarray]:
  """Tokens of every description and prompt: ([C, 100, 77], [C, 77]) int32, zero-padded."""
  kpt = np.zeros((len(categories), NUM_SLOTS, 77), np.int32)
  for c, cat in enumerate(categories):
    if len(cat.descriptions) > NUM_SLOTS:
      raise ValueError(f'category {cat.name!r} has {len(cat.descriptions)} keypoint '
                       f'descriptions; at most {NUM_SLOTS} are supported')
    if cat.descriptions:
      kpt[c, :len(cat.descriptions)] = tokenize(list(cat.descriptions))
  prompts = tokenize([category_prompt(cat.name) for cat in categories])
  return kpt, prompts


def build_text_cache(model: nnx.Module, categories: Sequence[CategoryText],
                     batch_size: int = 256) -> TextCache:
  """Encode every category once with `model.encode_text` (a CapeNext).

  Sequences are encoded in fixed-size chunks so that one compiled function serves any number
  of categories.
  """
  kpt_tokens, prompt_tokens = tokenize_categories(categories)
  graphdef, state = nnx.split(model)

  def encode_all(tokens: np.ndarray) -> jax.Array:
    n = tokens.shape[0]
    padded = np.zeros((-(-n // batch_size) * batch_size, tokens.shape[1]), np.int32)
    padded[:n] = tokens
    chunks = [_encode_text(graphdef, state, padded[i:i + batch_size])
              for i in range(0, len(padded), batch_size)]
    return jnp.concatenate(chunks)[:n]

  flat = kpt_tokens.reshape(-1, kpt_tokens.shape[-1])
  used = flat.any(axis=-1)  # padding slots are not encoded; their rows stay 0
  kpt = jnp.zeros((flat.shape[0], model.config.clip.embed_dim), jnp.float32)
  kpt = kpt.at[np.flatnonzero(used)].set(encode_all(flat[used]))
  return TextCache(keypoint=kpt.reshape(len(categories), NUM_SLOTS, -1),
                   category=encode_all(prompt_tokens))


@functools.partial(jax.jit, static_argnums=0)
def _encode_text(graphdef: nnx.GraphDef, state: nnx.State, tokens: jax.Array) -> jax.Array:
  """Text-tower features [N, D] of tokens [N, 77]. One jit for every call: caches built later
  (a Predictor meeting new categories, the model loaded again) reuse the compiled program of
  their model structure and chunk size."""
  return nnx.merge(graphdef, state).encode_text(tokens)


def category_texts(dataset) -> list[CategoryText]:
  """The text-tower inputs of every category of an `MP100Dataset`, in category-table order."""
  return [CategoryText(name, list(desc[:int(k)])) for name, desc, k in zip(
      dataset.prompt_names or dataset.raw_category_names, dataset.descriptions,
      dataset.category_num_keypoints)]


def replicated_text_cache(graphdef: nnx.GraphDef, state, dataset, mesh) -> TextCache:
  """The text cache of `dataset`'s categories from a train state, replicated over `mesh`.

  Encoded from a host copy of the model so the same code serves one or several processes;
  this runs once per dataset, not per step.
  """
  model = nnx.merge(graphdef, *to_host((state.trainable, state.batch_stats, state.frozen)))
  cache = build_text_cache(model, category_texts(dataset))
  replicated = NamedSharding(mesh, P())

  def place(a):
    a = np.asarray(a)
    return jax.make_array_from_callback(a.shape, replicated, lambda index: a[index])

  return TextCache(place(cache.keypoint), place(cache.category))

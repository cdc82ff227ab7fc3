"""Keypoint text descriptions: the official "regular_test" renaming table (docs/MODEL.md §5.2).

The table ships as package data (``regular_descriptions.json``): ``branch_order`` lists the
rules in the order the official code tests them (``supercategory==X``, ``name==X``, ``id==N``),
``lists`` maps each rule to its ordered description list. The first matching rule wins.

The table is MP-100's: it applies only to MP-100's own categories, a category whose id AND name
are those of an MP-100 category (the 100 listed in ``description_variants.json``). Every other
category (a user's "okapi" with id 18, a "table" or a "vehicle" of their own) keeps its own
keypoint names with ``_`` replaced by a space. On real MP-100 files this is the official result
(their categories all carry MP-100 ids and names).

Every description must fit CLIP's text context (77 tokens with its start and end tokens) and
say something: :func:`check_descriptions` is the one check the reader runs for every program.
"""
from __future__ import annotations

import functools
import json
import os

from capenext_jax.text.tokenizer import CONTEXT_LENGTH, default_tokenizer

_HERE = os.path.dirname(os.path.abspath(__file__))
_TABLE_PATH = os.path.join(_HERE, 'regular_descriptions.json')
VARIANTS_PATH = os.path.join(_HERE, 'description_variants.json')
OWN_NAMES = 'the category\'s "keypoints" names'


@functools.lru_cache(maxsize=1)
def _table():
  with open(_TABLE_PATH, encoding='utf-8') as f:
    table = json.load(f)
  rules = []
  for rule in table['branch_order']:
    field, _, value = rule.partition('==')
    if field not in ('supercategory', 'name', 'id'):
      raise ValueError(f'{_TABLE_PATH}: unknown rule {rule!r}')
    rules.append((field, int(value) if field == 'id' else value, tuple(table['lists'][rule])))
  return tuple(rules)


@functools.lru_cache(maxsize=1)
def description_variants() -> dict:
  """The shipped CapeX variant tables: variant -> category id (str) -> {name, supercategory,
  keypoints}, for all 100 MP-100 categories."""
  with open(VARIANTS_PATH, encoding='utf-8') as f:
    return json.load(f)


def mp100_category_names() -> dict[int, str]:
  """The 100 MP-100 categories: id -> name (from the shipped variant tables)."""
  return {int(cid): c['name'] for cid, c in description_variants()['synonyms_test'].items()}


def is_mp100_category(category: dict) -> bool:
  """Whether a COCO category dict is one of MP-100's own: same id and same name."""
  cid = category.get('id')
  return isinstance(cid, int) and mp100_category_names().get(cid) == category.get('name')


def matching_rule(category: dict) -> str | None:
  """The renaming rule that applies to a COCO category dict, or None (its own names)."""
  if not is_mp100_category(category):
    return None
  for field, value, _ in _table():
    if category.get(field) == value:
      return f'{field}=={value}'
  return None


def description_source(category: dict) -> str:
  """Where a category's descriptions come from, for reports: the MP-100 rule or its names."""
  rule = matching_rule(category)
  return f'MP-100 description table ({rule})' if rule else OWN_NAMES


def regular_descriptions(category: dict) -> list[str]:
  """Ordered keypoint descriptions of a category (dict with id, name, supercategory, keypoints)."""
  rule = matching_rule(category)
  for field, value, names in _table():
    if rule == f'{field}=={value}':
      return list(names)
  return [str(k).replace('_', ' ') for k in category.get('keypoints', [])]


def check_descriptions(descriptions, source: str) -> list[str]:
  """Problems of the descriptions a category uses (its first K), each naming the keypoint index
  and `source` (where the names come from): empty names and names longer than CLIP's context."""
  problems = []
  for index, text in enumerate(descriptions):
    if not str(text).strip():
      problems.append(f'{source}: keypoint {index} has an empty name')
      continue
    length = len(default_tokenizer().encode(str(text))) + 2   # + start and end tokens
    if length > CONTEXT_LENGTH:
      problems.append(f'{source}: keypoint {index} name {str(text)[:40]!r}... is {length} CLIP '
                      f'tokens long, more than CLIP\'s {CONTEXT_LENGTH}')
  return problems

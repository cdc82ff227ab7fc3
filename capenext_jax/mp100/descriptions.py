"""Keypoint text descriptions: the official "regular_test" renaming table (docs/MODEL.md §5.2).

The table ships as package data (``regular_descriptions.json``): ``branch_order`` lists the
rules in the order the official code tests them (``supercategory==X``, ``name==X``, ``id==N``),
``lists`` maps each rule to its ordered description list. The first matching rule wins; when
none matches, the category's own keypoint names are used with ``_`` replaced by a space.
"""
from __future__ import annotations

import functools
import json
import os

_TABLE_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'regular_descriptions.json')


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


def matching_rule(category: dict) -> str | None:
  """The renaming rule that applies to a COCO category dict, or None (fallback to its names)."""
  for field, value, _ in _table():
    if category.get(field) == value:
      return f'{field}=={value}'
  return None


def regular_descriptions(category: dict) -> list[str]:
  """Ordered keypoint descriptions of a category (dict with id, name, supercategory, keypoints)."""
  for field, value, names in _table():
    if category.get(field) == value:
      return list(names)
  return [str(k).replace('_', ' ') for k in category.get('keypoints', [])]

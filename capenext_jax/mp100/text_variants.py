"""What the text tower is told, varied for the robustness evaluations.

* Keypoint descriptions (`apply_descriptions`): 'regular' (the official renaming,
  `descriptions.py`), the CapeX text-robustness tables 'synonyms', 'typo', 'translate' (shipped in
  ``description_variants.json``, taken with their attribution from matanr/capex; CapeNext's
  `configs/clip_synonyms` / `clip_typo` select the first two), or a user JSON file mapping
  category id -> list of keypoint names.
* The category prompt (`wrong_category_prompts`): the official detector's `use_wrong_catName`
  switch replaces each query's category name in "a photo of {name}" by a random other MP-100
  category. Ours draws, with a seed, one wrong name per category for the whole evaluation (the
  official draw is per sample and per batch, unseeded; as shipped it also crashes, since the
  list it draws from, `self.category_names`, is never set).
"""
from __future__ import annotations

import dataclasses
import os

import numpy as np

from capenext_jax.mp100.annotations import MP100Dataset
from capenext_jax.mp100.descriptions import (VARIANTS_PATH, check_descriptions,
                                             description_variants, mp100_category_names)
from capenext_jax.mp100.json_files import read_json

DESCRIPTION_VARIANTS = ('regular', 'synonyms', 'typo', 'translate')
CATEGORY_PROMPTS = ('true', 'wrong')


def description_table(descriptions: str) -> tuple[dict[int, list[str]], str]:
  """(category id -> keypoint names, where they come from) of a variant name or a JSON file.

  A user file is a JSON object {"<category id>": ["name of keypoint 0", ...], ...}.
  """
  if descriptions in DESCRIPTION_VARIANTS[1:]:
    table = description_variants()[f'{descriptions}_test']
    return ({int(cid): list(c['keypoints']) for cid, c in table.items()},
            f'{descriptions} ({VARIANTS_PATH})')
  if not os.path.isfile(descriptions):
    raise ValueError(f'descriptions {descriptions!r}: expected one of '
                     f'{", ".join(DESCRIPTION_VARIANTS)} or a JSON file')
  raw = read_json(descriptions)
  if not isinstance(raw, dict):
    raise ValueError(f'{descriptions}: expected a JSON object category id -> keypoint names')
  table = {}
  for cid, names in raw.items():
    if not (str(cid).lstrip('-').isdigit() and isinstance(names, list)
            and all(isinstance(n, str) for n in names)):
      raise ValueError(f'{descriptions}: entry {cid!r} must map an integer category id to a '
                       f'list of strings')
    table[int(cid)] = names
  return table, descriptions


def apply_descriptions(dataset: MP100Dataset, descriptions: str) -> tuple[MP100Dataset, dict]:
  """`dataset` with every category's keypoint descriptions from `descriptions` (see
  `description_table`; 'regular' leaves it as loaded; a user file must give exactly K names per
  category, a shipped table at least K), and a record of what it did:
  {'descriptions': source, 'changed': {category id: number of names that differ from the
  regular ones}, 'not_in_table': [ids of categories the table lacks; they keep the regular
  descriptions], 'sources': {category id: where its descriptions come from}}."""
  sources = {int(c): s for c, s in zip(dataset.category_ids, dataset.description_sources)}
  if descriptions == 'regular':
    return dataset, {'descriptions': 'regular', 'changed': {}, 'not_in_table': [],
                     'sources': sources}
  table, source = description_table(descriptions)
  shipped = descriptions in DESCRIPTION_VARIANTS
  new, changed, missing = [], {}, []
  for cid, name, k, old in zip(dataset.category_ids, dataset.raw_category_names,
                               dataset.category_num_keypoints, dataset.descriptions):
    cid, k = int(cid), int(k)
    if cid not in table:
      missing.append(cid)
      new.append(old)
      continue
    names = table[cid]
    # The shipped tables, like the official regular one, may list more names than keypoints
    # (fly: 33 for K=32); the official code uses the first K. A user file must match exactly.
    if len(names) < k or (len(names) != k and not shipped):
      raise ValueError(f'{source}: category {cid} ({name!r}) has {len(names)} keypoint names, '
                       f'its annotations {k} keypoints')
    names = names[:k]
    problems = check_descriptions(names, f'{source}: category {cid} ({name!r})')
    if problems:
      raise ValueError('; '.join(problems))
    new.append(list(names))
    changed[cid] = sum(a != b for a, b in zip(names, old[:k]))
    sources[cid] = source
  return dataclasses.replace(dataset, descriptions=new), {
      'descriptions': source, 'changed': changed, 'not_in_table': missing, 'sources': sources}


def wrong_category_prompts(dataset: MP100Dataset, seed: int) -> tuple[MP100Dataset, dict]:
  """`dataset` whose prompts name another category, drawn uniformly (seeded) from the MP-100
  categories and the dataset's own, never the category itself; and {category id: name used}."""
  pool = sorted(set(mp100_category_names().values()) | set(dataset.raw_category_names))
  rng = np.random.default_rng(seed)
  used = {}
  for cid, name in zip(dataset.category_ids, dataset.raw_category_names):
    others = [n for n in pool if n != name]
    used[int(cid)] = others[int(rng.integers(len(others)))]
  names = [used[int(c)] for c in dataset.category_ids]
  return dataclasses.replace(dataset, prompt_names=names), used


def apply_text_options(dataset: MP100Dataset, descriptions: str = 'regular',
                       category_prompt: str = 'true', seed: int = 0
                       ) -> tuple[MP100Dataset, dict]:
  """Both options at once; the record is JSON-ready for a report's info (category ids as
  strings): {'descriptions', 'descriptions_changed', 'descriptions_not_in_table',
  'description_sources' (where each category's descriptions came from), 'category_prompt',
  and with 'wrong' 'category_prompt_seed', 'category_prompt_names'}."""
  if category_prompt not in CATEGORY_PROMPTS:
    raise ValueError(f'category_prompt {category_prompt!r}: expected one of '
                     f'{", ".join(CATEGORY_PROMPTS)}')
  dataset, done = apply_descriptions(dataset, descriptions)
  record = {'descriptions': done['descriptions'],
            'descriptions_changed': {str(c): n for c, n in done['changed'].items()},
            'descriptions_not_in_table': done['not_in_table'],
            'description_sources': {str(c): s for c, s in done['sources'].items()},
            'category_prompt': category_prompt}
  if category_prompt == 'wrong':
    dataset, used = wrong_category_prompts(dataset, seed)
    record.update(category_prompt_seed=seed,
                  category_prompt_names={str(c): n for c, n in used.items()})
  return dataset, record

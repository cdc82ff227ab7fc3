"""Keypoint-description variants and wrong category prompts (capenext_jax/mp100/text_variants)."""
import json

import pytest

from capenext_jax.mp100 import descriptions, text_variants
from capenext_jax.mp100.annotations import load_annotations
from conftest import MP100_MINI

TEST_ANN = MP100_MINI / 'annotations' / 'mini_test.json'


@pytest.fixture(scope='module')
def mini():
  return load_annotations(str(TEST_ANN), str(MP100_MINI / 'images'))


def test_shipped_tables_cover_mp100_with_attribution():
  with open(descriptions.VARIANTS_PATH, encoding='utf-8') as f:
    raw = json.load(f)
  assert 'matanr/capex' in raw['_source'] and 'Apache-2.0' in raw['_source']
  names = text_variants.mp100_category_names()
  assert len(names) == 100 and names[66] == 'fly'
  for variant in ('synonyms', 'typo', 'translate'):
    table, source = text_variants.description_table(variant)
    assert set(table) == set(names) and source.startswith(variant)


def test_typo_table_replaces_descriptions(mini):
  ds, done = text_variants.apply_descriptions(mini, 'typo')
  fly = list(ds.category_ids).index(66)
  assert ds.descriptions[fly][:2] == ['heead', 'lefft eye']
  assert done['changed'][66] > 0 and done['not_in_table'] == [102, 103]
  assert ds.descriptions[list(ds.category_ids).index(102)] == (
      mini.descriptions[list(mini.category_ids).index(102)])
  same, none = text_variants.apply_descriptions(mini, 'regular')
  assert same is mini and none['changed'] == {}


def test_user_file(mini, tmp_path):
  path = tmp_path / 'names.json'
  path.write_text(json.dumps({'103': [f'point {i}' for i in range(8)]}))
  ds, done = text_variants.apply_descriptions(mini, str(path))
  assert ds.descriptions[list(ds.category_ids).index(103)][7] == 'point 7'
  assert done['changed'] == {103: 8} and 66 in done['not_in_table']
  path.write_text(json.dumps({'103': ['only', 'three', 'names']}))
  with pytest.raises(ValueError, match=r"category 103 \('full_body_clothes'\) has 3 keypoint "
                                       r"names, its annotations 8"):
    text_variants.apply_descriptions(mini, str(path))
  path.write_text(json.dumps({'fly': ['a']}))
  with pytest.raises(ValueError, match="entry 'fly' must map an integer category id"):
    text_variants.apply_descriptions(mini, str(path))
  with pytest.raises(ValueError, match="'synonym': expected one of regular, synonyms"):
    text_variants.apply_descriptions(mini, 'synonym')


def test_wrong_prompts_are_seeded_and_never_the_true_name(mini):
  a, used = text_variants.wrong_category_prompts(mini, seed=0)
  again, _ = text_variants.wrong_category_prompts(mini, seed=0)
  other, _ = text_variants.wrong_category_prompts(mini, seed=1)
  assert a.prompt_names == again.prompt_names != other.prompt_names
  assert all(w != n for w, n in zip(a.prompt_names, mini.raw_category_names))
  assert a.raw_category_names == mini.raw_category_names    # reports keep the true names
  assert list(used) == [int(c) for c in mini.category_ids]
  with pytest.raises(ValueError, match="category_prompt 'false'"):
    text_variants.apply_text_options(mini, category_prompt='false')

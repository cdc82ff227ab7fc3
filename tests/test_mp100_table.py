"""capenext_jax.tools.mp100_table on hand-made eval.py reports."""
import json
import pathlib

import pytest

from capenext_jax.tools import mp100_table


def write(tmp_path, split, shots, pck, name=None):
  overall = {'PCK@0.2': pck, 'mPCK': pck - 0.1, 'NME': 0.1 * split, 'AUC': 0.5, 'EPE': 2.0 * split}
  path = tmp_path / (name or f's{split}_{shots}.json')
  path.write_text(json.dumps({'info': {'annotations': f'/d/mp100_split{split}_test.json',
                                       'shots': shots}, 'overall': overall,
                              'per_category': []}))
  return str(path)


def test_means_and_missing_split(tmp_path, capsys):
  one = [write(tmp_path, s, 1, p) for s, p in zip((1, 2, 3, 4, 5), (0.90, 0.80, 0.85, 0.70, 0.75))]
  five = [write(tmp_path, s, 5, 0.9) for s in (1, 2, 4, 5)]    # split 3 missing
  out_json, out_md = tmp_path / 't.json', tmp_path / 't.md'
  assert mp100_table.main([*one, *five, '--json', str(out_json), '--markdown', str(out_md)]) == 0
  summary = json.loads(out_json.read_text())
  mean = summary['1-shot']['mean']
  assert mean['PCK@0.2'] == pytest.approx(0.80)     # (90 + 80 + 85 + 70 + 75) / 5
  assert mean['NME'] == pytest.approx(0.3) and mean['EPE'] == pytest.approx(6.0)
  assert summary['5-shot']['missing_splits'] == [3] and summary['5-shot']['mean'] is None
  text = capsys.readouterr().out
  assert text == out_md.read_text()
  rows = {line.split('|')[1].strip(): [c.strip() for c in line.split('|')[2:-1]]
          for line in text.splitlines() if line.startswith('| ') and 'shot' in line}
  assert rows['1-shot'][:6] == ['90.00', '80.00', '85.00', '70.00', '75.00', '80.00']
  assert rows['1-shot'][6:] == ['70.00', '0.3000', '50.00', '6.00']
  assert rows['5-shot'][2] == 'missing' and set(rows['5-shot'][5:]) == {'missing'}
  assert 'Note: 5-shot: split(s) 3 missing, so no means.' in text


def test_errors_name_the_file(tmp_path, capsys):
  a = write(tmp_path, 1, 1, 0.9)
  b = write(tmp_path, 1, 1, 0.8, name='again.json')
  assert mp100_table.main([a, b]) == 2
  assert f'{b}: split 1 1-shot is also given by {a}' in capsys.readouterr().err
  odd = tmp_path / 'odd.json'
  odd.write_text(json.dumps({'info': {'annotations': 'mine.json', 'shots': 1},
                             'overall': {}}))
  assert mp100_table.main([str(odd)]) == 2
  assert 'cannot tell the split' in capsys.readouterr().err
  summary = mp100_table.summarize(mp100_table.collect([f'{write(tmp_path, 2, 1, 0.5)}@4']))
  assert list(summary['1-shot']['splits']) == ['4']
  lacking = json.loads(pathlib.Path(a).read_text())
  del lacking['overall']['EPE']
  (tmp_path / 'lacking.json').write_text(json.dumps(lacking))
  assert mp100_table.main([str(tmp_path / 'lacking.json')]) == 2
  assert 'lacking.json: the report has no EPE' in capsys.readouterr().err
  (tmp_path / 'bad.json').write_text('[]')
  assert mp100_table.main([str(tmp_path / 'bad.json')]) == 2
  assert 'not an eval.py report' in capsys.readouterr().err

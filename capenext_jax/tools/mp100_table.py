"""The paper's MP-100 table from eval.py reports: PCK@0.2 per split and the mean, per shot count.

  python -m capenext_jax.tools.mp100_table runs/*/eval_*.json [--markdown table.md] [--json t.json]

Each report is an eval.py JSON (`evaluation/report.py`); its split comes from the annotation
file it names (`mp100_split{N}_...`; or give it as PATH@N) and its shot
count from `info.shots`. Rows: 1-shot and 5-shot; columns: PCK@0.2 of splits 1-5 and their mean
(in percent, as the paper), then the split means of mPCK, NME, AUC and EPE. A missing split is
shown as missing and its row has no means: nothing is averaged over fewer than 5 splits.
"""
from __future__ import annotations

import argparse
import json
import re
import sys

from capenext_jax import cli

SPLITS = (1, 2, 3, 4, 5)
SHOTS = (1, 5)
EXTRA = ('mPCK', 'NME', 'AUC', 'EPE')
_PERCENT = {'PCK@0.2', 'mPCK', 'AUC'}


def _split_of(path: str, info: dict) -> int:
  found = re.search(r'split(\d+)', str(info.get('annotations', '')))
  if not found:
    raise ValueError(f'{path}: cannot tell the split from info.annotations '
                     f'{info.get("annotations")!r}; name it as {path}@N')
  return int(found.group(1))


def collect(paths: list[str]) -> dict:
  """{shots: {split: (path, overall scores)}} of eval.py reports `paths` (PATH or PATH@SPLIT)."""
  table: dict = {s: {} for s in SHOTS}
  for arg in paths:
    path, _, forced = arg.partition('@')
    with open(path, encoding='utf-8') as f:
      report = json.load(f)
    if not isinstance(report, dict) or 'overall' not in report or 'info' not in report:
      raise ValueError(f'{path}: not an eval.py report (no "info" / "overall")')
    info = report['info']
    split = int(forced) if forced else _split_of(path, info)
    shots = info.get('shots')
    if split not in SPLITS or shots not in SHOTS:
      raise ValueError(f'{path}: split {split}, shots {shots}: expected split 1-5 and 1 or 5 '
                       'shots')
    lacking = [k for k in ('PCK@0.2', *EXTRA) if k not in report['overall']]
    if lacking:
      raise ValueError(f'{path}: the report has no {", ".join(lacking)}')
    if split in table[shots]:
      raise ValueError(f'{path}: split {split} {shots}-shot is also given by '
                       f'{table[shots][split][0]}')
    table[shots][split] = (path, report['overall'])
  return table


def summarize(table: dict) -> dict:
  """JSON-ready: per shots, the per-split metrics, the missing splits and the 5-split means
  (None while a split is missing)."""
  out = {}
  for shots in SHOTS:
    rows = table[shots]
    missing = [s for s in SPLITS if s not in rows]
    keys = ('PCK@0.2', *EXTRA)
    out[f'{shots}-shot'] = {
        'splits': {str(s): {'report': rows[s][0], **{k: rows[s][1][k] for k in keys}}
                   for s in SPLITS if s in rows},
        'missing_splits': missing,
        'mean': None if missing else {k: sum(rows[s][1][k] for s in SPLITS) / len(SPLITS)
                                      for k in keys}}
  return out


def _cell(key: str, value: float | None) -> str:
  if value is None:
    return 'missing'
  if key in _PERCENT:
    return f'{100 * value:.2f}'
  return f'{value:.4f}' if key == 'NME' else f'{value:.2f}'


def markdown(summary: dict) -> str:
  """The table: PCK@0.2 (%) per split, their mean, then the split means of the other metrics."""
  head = ['Setting', *(f'Split {s}' for s in SPLITS), 'Mean PCK@0.2', *EXTRA]
  lines = ['| ' + ' | '.join(head) + ' |', '|' + '---|' * len(head)]
  notes = []
  for setting, row in summary.items():
    splits, mean = row['splits'], row['mean'] or {}
    cells = [_cell('PCK@0.2', splits[str(s)]['PCK@0.2'] if str(s) in splits else None)
             for s in SPLITS]
    cells += [_cell(k, mean.get(k)) for k in ('PCK@0.2', *EXTRA)]
    lines.append(f'| {setting} | ' + ' | '.join(cells) + ' |')
    if row['missing_splits']:
      notes.append(f'{setting}: split(s) {", ".join(map(str, row["missing_splits"]))} missing, '
                   'so no means')
  return '\n'.join(lines + [''] + [f'Note: {n}.' for n in notes]).rstrip() + '\n'


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(
      prog='python -m capenext_jax.tools.mp100_table',
      description='The paper MP-100 table (PCK@0.2 per split and mean, 1- and 5-shot) from '
                  'eval.py reports.')
  parser.add_argument('reports', nargs='+', help='eval.py report JSONs (PATH or PATH@SPLIT)')
  parser.add_argument('--markdown', help='also write the markdown table here')
  parser.add_argument('--json', help='write the JSON summary here')
  args = parser.parse_args(argv)
  try:
    cli.check_writable('--markdown', args.markdown)
    cli.check_writable('--json', args.json)
    summary = summarize(collect(args.reports))
  except cli.INPUT_ERRORS as e:
    print(f'{parser.prog}: error: {cli.one_line(e)}', file=sys.stderr)
    return 2
  text = markdown(summary)
  print(text, end='')
  if args.markdown:
    with open(args.markdown, 'w', encoding='utf-8') as f:
      f.write(text)
  if args.json:
    with open(args.json, 'w', encoding='utf-8') as f:
      json.dump(summary, f, indent=2)
      f.write('\n')
  return 0


if __name__ == '__main__':
  sys.exit(main())

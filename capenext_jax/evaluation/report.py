"""Human-readable metric tables and JSON reports for the output of `metrics.score_pairs`.

The table shows PCK, mPCK and AUC in percent (the paper reports PCK@0.2 x 100), NME as a
fraction of the bbox size and EPE in original-image pixels. The JSON report keeps the raw values
(fractions, pixels) so nothing is rounded away.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping

from capenext_jax.atomic import new_file
from capenext_jax.metrics import METRIC_KEYS, PCK_THRESHOLDS

_PERCENT = {f'PCK@{t}' for t in PCK_THRESHOLDS} | {'mPCK', 'AUC'}
_NAME_WIDTH = 22


def _cell(key: str, value: float) -> str:
  if key in _PERCENT:
    return f'{100.0 * value:9.2f}'
  return f'{value:9.4f}' if key == 'NME' else f'{value:9.2f}'


def _row(label: str, name: str, s: dict) -> str:
  cells = ''.join(_cell(k, s[k]) for k in METRIC_KEYS)
  return f'{label:>6} {name[:_NAME_WIDTH]:<{_NAME_WIDTH}} {s["num_pairs"]:>7}{cells}'


def format_table(scores: dict, category_names: Mapping[int, str] | None = None) -> str:
  """One row per category (id, name) when `scores` has them, then the overall row."""
  names = category_names or {}
  header = f'{"id":>6} {"category":<{_NAME_WIDTH}} {"pairs":>7}' + ''.join(
      f'{k:>9}' for k in METRIC_KEYS)
  lines = [header, '-' * len(header)]
  for cid, s in scores.get('per_category', {}).items():
    lines.append(_row(str(cid), names.get(cid, ''), s))
  if len(lines) > 2:
    lines.append('-' * len(header))
  lines.append(_row('all', 'mean over pairs', scores))
  lines.append(f'pairs without any valid keypoint (scored 0): {scores["num_empty_pairs"]}')
  return '\n'.join(lines)


def print_report(scores: dict, category_names: Mapping[int, str] | None = None,
                 file=None) -> None:
  """Print `format_table` to `file` (default: the current sys.stdout)."""
  print(format_table(scores, category_names), file=file)


def report_dict(scores: dict, category_names: Mapping[int, str] | None = None,
                info: Mapping | None = None) -> dict:
  """JSON-ready report: {'info', 'overall', 'per_category': [{'category_id', 'name', ...}]}."""
  names = category_names or {}
  overall = {k: v for k, v in scores.items() if k != 'per_category'}
  per_category = [{'category_id': cid, 'name': names.get(cid), **s}
                  for cid, s in scores.get('per_category', {}).items()]
  return {'info': dict(info or {}), 'overall': overall, 'per_category': per_category}


def write_report(path, scores: dict, category_names: Mapping[int, str] | None = None,
                 info: Mapping | None = None) -> None:
  """Write `report_dict(...)` as indented JSON; `info` carries provenance (checkpoint, split).
  The text is made first and written whole (temporary name, then rename): a value JSON cannot
  hold fails before `path` is touched."""
  text = json.dumps(report_dict(scores, category_names, info), indent=2, allow_nan=False)
  with new_file(Path(path)) as tmp:
    tmp.write_text(text + '\n', encoding='utf-8')

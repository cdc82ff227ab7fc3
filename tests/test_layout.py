"""The docs against the tree, and the package's import graph against DESIGN.md's layers.

Pure Python (file names and an AST scan): nothing is imported, so it runs in well under a
second.
  * DESIGN.md's layout block names every module of capenext_jax/ and data_pipeline/, and only
    files that exist;
  * every package __init__ index (its `  name.py  what` lines) lists exactly the package's
    modules;
  * imports run only downward through DESIGN.md's layers; the module graph has no cycle; below
    the programs no module imports another of the package inside a function (such imports hid
    the old cycles; `DEFERRED` names the exceptions and why); data_pipeline / TensorFlow (the `train` extra) only inside a function of
    a program.
"""
from __future__ import annotations

import ast
import pathlib
import re
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]
PKG = REPO / 'capenext_jax'
DESIGN = REPO / 'docs' / 'DESIGN.md'
PACKAGES_WITHOUT_INDEX = {'models'}   # documented in DESIGN.md's layout (GPU: being split)
# Function-local imports of the package below the programs, each downward, with its reason.
DEFERRED = {
    ('loading.py', 'training/checkpoint.py'):
        'orbax: load_pretrained of an export imports no orbax (test_export)',
    ('loading.py', 'training/init.py'):
        'ml_collections: only workdirs from before the frozen weights were stored',
}


def modules(root: pathlib.Path) -> set[str]:
  """Every .py file under `root` but sub-package __init__s, as 'sub/name.py'."""
  return {p.relative_to(root).as_posix() for p in root.rglob('*.py')
          if (p.name != '__init__.py' or p.parent == root) and '__pycache__' not in p.parts}


def fenced(text: str, after: str, tag: str = '') -> str:
  """The first ``` block (```tag) after the heading `after`."""
  start = text.index(after)
  m = re.search(r'^```' + tag + r'\n(.*?)^```', text[start:], re.S | re.M)
  return m.group(1)


def layout_files(block: str) -> dict[str, set[str]]:
  """{'capenext_jax': {...}, 'data_pipeline': {...}} from the layout block's first column
  ('convert/swin.py, clip.py,' names convert/clip.py too)."""
  out, top = {}, None
  for line in block.splitlines():
    if not line.strip():
      continue
    if not line.startswith(' '):
      top = line.split('/')[0]
      out.setdefault(top, set())
      continue
    column = re.split(r'\s{2,}', line.strip())[0]
    folder = ''
    for name in (n.strip() for n in column.split(',')):
      if not name.endswith('.py'):
        continue
      if '/' in name:
        folder = name.rsplit('/', 1)[0] + '/'
        out[top].add(name)
      else:
        out[top].add(folder + name)
  return out


def test_design_layout_names_every_module():
  listed = layout_files(fenced(DESIGN.read_text(), '## Layout'))
  for top in ('capenext_jax', 'data_pipeline'):
    files = modules(REPO / top) if top == 'capenext_jax' else {
        p.name for p in (REPO / top).glob('*.py') if p.name != '__init__.py'}
    assert files - listed[top] == set(), f'DESIGN.md layout omits these {top} modules'
    assert listed[top] - files == set(), f'DESIGN.md layout names files {top} lacks'


def index_entries(init: pathlib.Path) -> set[str] | None:
  """The `  name.py  what` lines of a package __init__'s docstring, or None when it has none."""
  doc = ast.get_docstring(ast.parse(init.read_text()), clean=False) or ''
  names = {m.group(1) for m in re.finditer(r'^\s{2,}([\w/]+\.py)\b', doc, re.M)}
  return names or None


def test_package_indexes_list_their_modules():
  for init in sorted(PKG.rglob('__init__.py')):
    package = init.parent
    if package == PKG:
      continue
    name = package.relative_to(PKG).as_posix()
    files = {p.name for p in package.glob('*.py') if p.name != '__init__.py'}
    listed = index_entries(init)
    if listed is None:
      assert name in PACKAGES_WITHOUT_INDEX, f'{init}: no index of its modules'
      continue
    assert listed == files, (f'{init}: index lists {sorted(listed - files)} that do not exist, '
                             f'omits {sorted(files - listed)}')


# ----------------------------------------------------------------------------- import graph
def layers() -> list[tuple[str, list[str]]]:
  """DESIGN.md's layers, bottom first: [(name, [file or folder/ of capenext_jax])]."""
  rows = []
  for line in fenced(DESIGN.read_text(), '## Layers', 'layers').splitlines():
    if line.startswith(' '):   # a continuation of the layer above
      rows[-1][1].extend(line.split())
    elif line.strip():
      rows.append((line.split()[0], line.split()[1:]))
  return rows[::-1]


def layer_of(path: str, table) -> int:
  """The index of the layer whose most specific entry (a file, else the longest folder
  prefix) matches `path` ('device/step.py')."""
  best = None
  for i, (_, entries) in enumerate(table):
    for entry in entries:
      if entry == path:
        return i
      if entry.endswith('/') and path.startswith(entry):
        if best is None or len(entry) > best[1]:
          best = (i, len(entry))
  assert best is not None, f'capenext_jax/{path} is in no layer of DESIGN.md'
  return best[0]


def module_path(dotted: str) -> str | None:
  """'capenext_jax.device.step' -> 'device/step.py' (a package -> its __init__.py); None when
  no such file (an attribute: resolved by its parent)."""
  parts = dotted.split('.')[1:]
  for cut in range(len(parts), -1, -1):
    stem = '/'.join(parts[:cut])
    if (PKG / f'{stem}.py').is_file():
      return f'{stem}.py'
    if (PKG / stem / '__init__.py').is_file():
      return f'{stem}/__init__.py' if stem else '__init__.py'
  return None


def imports(path: pathlib.Path):
  """(imported module, line, inside a function) of every import of a file, `from a import b`
  as 'a.b' (a module or an attribute)."""
  tree = ast.parse(path.read_text())
  local = {id(node) for fn in ast.walk(tree) if isinstance(fn, (ast.FunctionDef,
                                                                 ast.AsyncFunctionDef))
           for node in ast.walk(fn)}
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      names = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
      names = [f'{node.module}.{a.name}' for a in node.names]
    else:
      continue
    for name in names:
      yield name, node.lineno, id(node) in local


def import_graph():
  """{module path: {imported module path: (line, function-local)}} within capenext_jax, and
  every function-local import of anything else as (module path, line, name)."""
  graph, outside = {}, []
  for file in sorted(PKG.rglob('*.py')):
    if '__pycache__' in file.parts:
      continue
    here = file.relative_to(PKG).as_posix()
    edges = graph.setdefault(here, {})
    for name, line, local in imports(file):
      if name.split('.')[0] == 'capenext_jax':
        target = module_path(name)
        if target and target != here:
          edges.setdefault(target, (line, local))
      elif local:
        outside.append((here, line, name))
  return graph, outside


def cycles(graph: dict[str, dict]) -> list[list[str]]:
  """Strongly connected components of more than one module (Tarjan)."""
  index, low, stack, on, out = {}, {}, [], set(), []
  sys.setrecursionlimit(max(10000, sys.getrecursionlimit()))

  def visit(v):
    index[v] = low[v] = len(index)
    stack.append(v)
    on.add(v)
    for w in graph.get(v, ()):
      if w not in index:
        visit(w)
        low[v] = min(low[v], low[w])
      elif w in on:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      component = []
      while True:
        w = stack.pop()
        on.discard(w)
        component.append(w)
        if w == v:
          break
      if len(component) > 1:
        out.append(sorted(component))

  for v in list(graph):
    if v not in index:
      visit(v)
  return out


def test_imports_run_downward_without_cycles():
  table = layers()
  programs = len(table) - 1
  assert table[programs][0] == 'programs'
  graph, _ = import_graph()
  upward, hidden = [], []
  for source, edges in graph.items():
    if not edges:
      continue   # e.g. a package __init__ that only documents its modules
    src = layer_of(source, table)
    for target, (line, local) in edges.items():
      dst = layer_of(target, table)
      if dst > src:
        upward.append(f'capenext_jax/{source}:{line} imports {target} '
                      f'({table[src][0]} -> {table[dst][0]})')
      if (local and src < programs and not source.endswith('__init__.py')
          and (source, target) not in DEFERRED):
        hidden.append(f'capenext_jax/{source}:{line} imports {target} inside a function')
  assert upward == [], 'imports that run upward:\n' + '\n'.join(upward)
  assert hidden == [], 'function-local imports of the package below the programs:\n' + \
      '\n'.join(hidden)
  assert cycles(graph) == [], 'import cycles'


def test_function_local_imports_are_never_of_data_pipeline_below_the_programs():
  """The library never imports data_pipeline (TensorFlow) except in the programs, and then
  only inside a function (the `train` extra)."""
  table = layers()
  programs = len(table) - 1
  for file in sorted(PKG.rglob('*.py')):
    here = file.relative_to(PKG).as_posix()
    for name, line, local in imports(file):
      if name.split('.')[0] in ('data_pipeline', 'tensorflow'):
        assert local and layer_of(here, table) == programs, (
            f'capenext_jax/{here}:{line} imports {name}')


def test_the_checks_catch_what_they_check(tmp_path):
  """The scanners see an upward import, a cycle and a hidden import (so the tests above can
  fail)."""
  table = [('low', ['a.py']), ('programs', ['b.py'])]
  assert layer_of('a.py', table) == 0 and layer_of('b.py', table) == 1
  assert cycles({'a': {'b': 0}, 'b': {'a': 0}, 'c': {'a': 0}}) == [['a', 'b']]
  f = tmp_path / 'm.py'
  f.write_text('import os\n\ndef f():\n  from capenext_jax.device import step\n')
  assert list(imports(f)) == [('os', 1, False), ('capenext_jax.device.step', 4, True)]
  assert module_path('capenext_jax.device.step.make_predict_step') == 'device/step.py'
  assert module_path('capenext_jax.device') == 'device/__init__.py'
  assert layout_files('capenext_jax/\n  convert/swin.py, clip.py,   what\n  x.py  y\n') == {
      'capenext_jax': {'convert/swin.py', 'convert/clip.py', 'x.py'}}

"""The docs against the tree, and the package's import graph against DESIGN.md's layers.

Pure Python (file names and an AST scan): nothing is imported, so it runs in well under a
second.
  * DESIGN.md's layout block names every module of capenext_jax/ and data_pipeline/, and only
    files that exist;
  * every package __init__ index (its `  name.py  what` lines) lists exactly the package's
    modules;
  * imports run only downward through DESIGN.md's layers; the module graph has no cycle;
  * no module of the package, eval.py or train.py imports the package inside a function (such
    imports hid the old cycles), except a module that needs an optional extra
    (`OPTIONAL_EXTRAS`) and the exceptions `DEFERRED` names with their reasons; the optional
    extras themselves are imported only inside functions, data_pipeline / TensorFlow only by
    the programs.
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
SCRIPTS = ('eval.py', 'train.py')
# The optional extras (pyproject.toml's optional-dependencies) by the module names they bring,
# and the package's modules that import one at module level: imported only inside a function,
# so that the core install imports everything else and names the missing extra in one line.
OPTIONAL_EXTRAS = {
    'tensorflow': 'data', 'tensorflow_datasets': 'data', 'data_pipeline': 'data',
    'clu': 'train', 'tensorboard': 'train', 'torch': 'torch', 'safetensors.torch': 'torch',
    'transformers': 'hf', 'gradio': 'demo',
    'capenext_jax.training.loop': 'train (clu\'s metric writers, at import)',
}
# Function-local imports of the package that are no optional extra, each with its reason.
DEFERRED = {
    ('__init__.py', 'loading.py'):
        'load_pretrained on first use: eval.py / train.py re-exec for the allocator before jax',
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
  graph, _ = import_graph()
  upward = []
  for source, edges in graph.items():
    if not edges:
      continue   # e.g. a package __init__ that only documents its modules
    src = layer_of(source, table)
    for target, (line, _) in edges.items():
      dst = layer_of(target, table)
      if dst > src:
        upward.append(f'capenext_jax/{source}:{line} imports {target} '
                      f'({table[src][0]} -> {table[dst][0]})')
  assert upward == [], 'imports that run upward:\n' + '\n'.join(upward)
  assert cycles(graph) == [], 'import cycles'


def is_optional_extra(name: str) -> bool:
  """`name` ('torch.nn', 'capenext_jax.training.loop.train') is, or is inside, an optional
  extra's module."""
  return any(name == m or name.startswith(m + '.') for m in OPTIONAL_EXTRAS)


def python_files() -> dict[str, pathlib.Path]:
  """{'device/step.py' (under capenext_jax/) or 'eval.py': file} of the package and scripts."""
  files = {p.relative_to(PKG).as_posix(): p for p in sorted(PKG.rglob('*.py'))
           if '__pycache__' not in p.parts}
  return files | {name: REPO / name for name in SCRIPTS}


def hidden_imports(files: dict[str, pathlib.Path]) -> list[str]:
  """Function-local imports of the package that are neither an optional extra nor `DEFERRED`."""
  out = []
  for here, file in files.items():
    for name, line, local in imports(file):
      if (local and name.split('.')[0] == 'capenext_jax' and not is_optional_extra(name)
          and (here, module_path(name)) not in DEFERRED):
        out.append(f'{here}:{line} imports {name} inside a function')
  return out


def extras_at_module_level(files: dict[str, pathlib.Path]) -> list[str]:
  """Module-level imports of an optional extra (`extras.require` is a call, not seen here)."""
  return [f'{here}:{line} imports {name}' for here, file in files.items()
          for name, line, local in imports(file) if not local and is_optional_extra(name)]


def test_function_local_imports_only_for_optional_extras():
  files = python_files()
  assert hidden_imports(files) == [], (
      'function-local imports of the package (move them to module level, or name the extra '
      'in OPTIONAL_EXTRAS / the reason in DEFERRED):\n' + '\n'.join(hidden_imports(files)))
  assert extras_at_module_level(files) == [], 'optional extras imported at module level'
  for source, target in DEFERRED:   # each exception still exists
    assert (target, True) in [(module_path(n), local) for n, _, local in imports(PKG / source)]


def test_data_pipeline_only_in_the_programs():
  """The library never imports data_pipeline (TensorFlow) except in the programs (and there
  only inside a function: the test above)."""
  table = layers()
  programs = len(table) - 1
  for file in sorted(PKG.rglob('*.py')):
    here = file.relative_to(PKG).as_posix()
    for name, line, _ in imports(file):
      if name.split('.')[0] in ('data_pipeline', 'tensorflow'):
        assert layer_of(here, table) == programs, f'capenext_jax/{here}:{line} imports {name}'


def test_the_checks_catch_what_they_check(tmp_path):
  """The scanners see an upward import, a cycle, a hidden import and an extra at module level
  (so the tests above can fail)."""
  table = [('low', ['a.py']), ('programs', ['b.py'])]
  assert layer_of('a.py', table) == 0 and layer_of('b.py', table) == 1
  assert cycles({'a': {'b': 0}, 'b': {'a': 0}, 'c': {'a': 0}}) == [['a', 'b']]
  f = tmp_path / 'm.py'
  f.write_text('import os\n\ndef f():\n  from capenext_jax.device import step\n')
  assert list(imports(f)) == [('os', 1, False), ('capenext_jax.device.step', 4, True)]
  assert module_path('capenext_jax.device.step.make_predict_step') == 'device/step.py'
  assert module_path('capenext_jax.device') == 'device/__init__.py'
  program = tmp_path / 'program.py'   # a program module: the rule holds in every layer
  program.write_text('import torch\n\ndef main():\n  from capenext_jax import loading\n'
                     '  from capenext_jax.training.loop import train_and_evaluate\n'
                     '  import gradio\n  from data_pipeline.splits import run_splits\n')
  assert hidden_imports({'predict.py': program}) == [
      'predict.py:4 imports capenext_jax.loading inside a function']
  assert extras_at_module_level({'predict.py': program}) == ['predict.py:1 imports torch']
  assert hidden_imports({'loading.py': PKG / 'loading.py'}) == []   # DEFERRED, by file
  assert hidden_imports({'predict.py': PKG / 'loading.py'}) != []
  assert layout_files('capenext_jax/\n  convert/swin.py, clip.py,   what\n  x.py  y\n') == {
      'capenext_jax': {'convert/swin.py', 'convert/clip.py', 'x.py'}}

"""Every shell command in README.md and docs/*.md is run by a test, so none of them rots.

Each documented command is listed in COVERAGE with what runs it:
  ('guide', ...)  docs/CUSTOM_DATA.md's commands, run here as written (the installed programs on
                  PATH) from a data folder outside the repository holding a json the test writes
  ('test', id)    a test that runs the same program and flags on small data (the fixture's
                  official weights for `split1_epoch_200.pth`, mp100_mini for /data/mp100);
                  the test must exist, and every command's flags are parsed here by the
                  program's own parser (a renamed flag or config field fails)
  ('ci', what)    installs, run by .ci/run (its test command must be the README's)
  ('none', why)   cannot run on a CPU machine without network (said in the README)
A command added to the docs without an entry here, or an entry whose command left the docs,
fails `test_every_documented_command_is_covered`.
"""
from __future__ import annotations

import ast
import json
import os
import re
import shlex
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO

DOCS = [REPO / 'README.md', *sorted((REPO / 'docs').glob('*.md'))]
ENV = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=f'{REPO}:{REPO}/tests')

COVERAGE = {
    # README
    'python3 -m venv .venv && .venv/bin/pip install -e ".[train]" && .venv/bin/python train.py '
    '--workdir runs/synthetic':
        ('test', 'tests/test_train.py::test_resume_and_two_devices_equal_one_run'),
    '.venv/bin/pip install -e ".[test]" && .venv/bin/python -m pytest -q -n 2 --dist worksteal '
    '--durations=30':
        ('ci', 'the README test command'),
    'python3 -m venv .venv && .venv/bin/pip install -e .': ('ci', 'the lean-install step'),
    '.venv/bin/pip install -e ".[train]" "jax[cuda12]"': ('none', 'needs a GPU and network'),
    '.venv/bin/pip install -e ".[train]" "jax[tpu]"': ('none', 'needs a TPU VM and network'),
    '.venv/bin/python -m capenext_jax.tools.check_parity ../shared/fixtures/tiny_capenext.npz':
        ('test', 'tests/test_official_checkpoint.py::test_check_parity_passes_on_the_tiny_fixture'),
    '.venv/bin/python -m capenext_jax.tools.check_parity ../shared/fixtures/tiny_capenext.npz '
    '--capex tests/fixtures/capex_tiny.npz':
        ('test', 'tests/test_capex.py::test_capex_matches_the_official_model'),
    '.venv/bin/python train.py --workdir runs/synthetic':
        ('test', 'tests/test_train.py::test_resume_and_two_devices_equal_one_run'),
    '.venv/bin/python train.py --workdir runs/split1 --config '
    'configs/mp100.py:split=1,shots=1,root=/data/mp100 '
    '--config.init.backbone_path=swinv2_tiny_patch4_window16_256.pth '
    '--config.init.clip_path=clip-vit-base-patch32/model.safetensors':
        ('test', 'tests/test_eval.py::test_mp100_mini_train_then_eval_with_overlays'),
    '.venv/bin/python eval.py --checkpoint runs/split1 --config '
    'configs/mp100.py:split=1,root=/data/mp100':
        ('test', 'tests/test_eval.py::test_mp100_mini_train_then_eval_with_overlays'),
    '.venv/bin/python eval.py --checkpoint split1_epoch_200.pth --annotations '
    'mp100_split1_test.json --image_root /data/mp100 --shots 1 --num_episodes 200 '
    '--num_queries 15 --visualize 3':
        ('test',
         'tests/test_eval.py::test_eval_official_fixture_checkpoint_on_one_and_two_processes'),
    'capenext-convert split1_epoch_200.pth my_capenext/':
        ('test', 'tests/test_convert.py::test_official_to_export_to_official_round_trip'),
    'capenext-convert runs/split1 my_capenext/ --best':
        ('test', 'tests/test_train.py::test_loop_validates_keeps_best_and_tests'),
    'capenext-convert my_capenext/ capenext_official.pth':
        ('test', 'tests/test_convert.py::test_official_to_export_to_official_round_trip'),
    'capenext-demo --checkpoint my_capenext/ --categories mp100_split1_test.json':
        ('test', 'tests/test_demo.py::test_demo_in_headless_chromium'),
    'ROOT=/data/mp100 ; INIT="--config.init.backbone_path=swinv2_tiny_patch4_window16_256.pth ; '
    '--config.init.clip_path=clip-vit-base-patch32/model.safetensors" ; for shots in 1 5; do '
    'for split in 1 2 3 4 5; do ; run=runs/paper/split${split}_${shots}shot ; .venv/bin/python '
    'train.py --workdir $run $INIT --config '
    'configs/mp100.py:split=$split,shots=$shots,root=$ROOT ; .venv/bin/python eval.py '
    '--checkpoint $run --output $run/eval_test.json ; done; done ; .venv/bin/python -m '
    'capenext_jax.tools.mp100_table runs/paper/*/eval_test.json --markdown runs/paper/table.md '
    '--json runs/paper/table.json':
        ('test', 'tests/test_mp100_table.py::test_means_and_missing_split'),
    '.venv/bin/python eval.py --checkpoint $run --descriptions synonyms':
        ('test', 'tests/test_oracles.py::test_eval_text_options_change_only_their_cache_rows'),
    '.venv/bin/python eval.py --checkpoint $run --descriptions my_names.json':
        ('test', 'tests/test_oracles.py::test_eval_text_options_change_only_their_cache_rows'),
    '.venv/bin/python eval.py --checkpoint $run --category_prompt wrong '
    '--category_prompt_seed 0':
        ('test', 'tests/test_oracles.py::test_eval_text_options_change_only_their_cache_rows'),
    # docs/EXPORT.md
    'capenext-convert runs/split1 my_capenext_bf16/ --step 4000 --dtype bfloat16':
        ('test', 'tests/test_eval.py::test_mp100_mini_train_then_eval_with_overlays'),
    'capenext-predict photo.jpg --checkpoint my_capenext/ --category "tiger" --keypoints '
    '"left ear,right ear,nose,tail" --skeleton "0-2,1-2" --bbox 40,60,800,500':
        ('test', 'tests/test_predict.py::test_single_image_cli'),
    'capenext-predict --coco annotations.json --image_root images/ --checkpoint ckpt.pth '
    '--output predictions.json --overlay_dir overlays/':
        ('test', 'tests/test_predict.py::test_batch_mode_with_export'),
    # docs/CUSTOM_DATA.md
    'python -m capenext_jax.tools.split_categories my_keypoints.json --image_root '
    'images --val lynx --test okapi,heron --out_dir annotations': ('guide', 'split'),
    'capenext-train --workdir runs/mine --config mp100:runlocal,root=. '
    '--config.data.train_ann=annotations/my_keypoints_train.json '
    '--config.data.val_ann=annotations/my_keypoints_val.json '
    '--config.data.test_ann=annotations/my_keypoints_test.json --config.data.image_root=images':
        ('guide', 'train'),
    'capenext-eval --checkpoint runs/mine --num_episodes 5 --num_queries 1':
        ('guide', 'eval'),
    'capenext-convert runs/mine my_capenext/': ('guide', 'export'),
    'mkdir -p out': ('guide', 'predict'),
    'capenext-predict images/okapi_0.jpg --checkpoint my_capenext/ --category okapi --keypoints '
    '"nose,left ear,right ear,tail" --skeleton "0-1,0-2" --output out/okapi_0.json':
        ('guide', 'predict'),
    'capenext-predict --coco annotations/my_keypoints_test.json --image_root images '
    '--checkpoint my_capenext/ --output out/test_predictions.json --overlay_dir out/overlays':
        ('guide', 'predict'),
}


def documented_commands() -> dict[str, str]:
  """{command (continuations joined, whitespace collapsed): doc file} of every ```bash block;
  a block holding a shell loop is one script (its lines joined with ' ; ')."""
  out = {}
  for doc in DOCS:
    for block in re.findall(r'```bash\n(.*?)```', doc.read_text(), re.S):
      commands = []
      for command in re.sub(r'\\\n', ' ', block).splitlines():
        command = re.sub(r'\s+#.*$', '', command).strip()   # trailing comments
        if command and not command.startswith('#'):
          commands.append(' '.join(command.split()))
      if any(c.startswith('for ') for c in commands):
        commands = [' ; '.join(commands)]
      out.update((c, doc.name) for c in commands)
  return out


def test_every_documented_command_is_covered():
  documented = documented_commands()
  assert sorted(set(documented) - set(COVERAGE)) == [], 'documented but not covered'
  assert sorted(set(COVERAGE) - set(documented)) == [], 'covered but no longer documented'
  for command, (how, what) in COVERAGE.items():
    if how == 'test':
      path, name = what.split('::')
      tree = ast.parse((REPO / path).read_text())
      assert name in {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}, what
  ci = (REPO / '.ci' / 'run').read_text()
  readme_tests = next(c for c in COVERAGE if 'pytest' in c).split(' && ')[1]
  assert readme_tests in ci


# The README's shell variables, as its paper script sets them.
SHELL_VARIABLES = {'$run': 'runs/paper/split1_1shot'}


def _argv(command: str) -> list[str]:
  """The arguments after the program, of a command that runs one of ours."""
  for name, value in SHELL_VARIABLES.items():
    command = command.replace(name, value)
  words = shlex.split(command.split(' && ')[-1])
  return words[2:] if words[0].endswith('python') else words[1:]


# ml_collections registers the --config.* override flags from sys.argv when the config flag is
# defined (at import), so each command is parsed in its own process with its own sys.argv.
PARSE_ABSL = """
import json, sys
sys.argv = json.loads(sys.argv[1])
import {module}
from absl import flags
flags.FLAGS(sys.argv)
flags.FLAGS.config      # the config file ran and every --config.* override found its field
"""


@pytest.mark.parametrize('program', ['train', 'eval'])
def test_documented_absl_flags_parse(program):
  """train.py / eval.py commands: the program's flags and its config (file, arg, overrides)."""
  # (the paper script's loop runs the same programs with the README's other flags)
  argvs = [_argv(c) for c in COVERAGE
           if re.search(rf'\b{program}\.py\b', c) and not c.startswith('ROOT=')]
  assert argvs
  procs = [subprocess.Popen([sys.executable, '-c', PARSE_ABSL.format(module=program),
                             json.dumps([f'{program}.py', *argv])], env=ENV, cwd=REPO,
                            stderr=subprocess.PIPE, text=True) for argv in argvs]
  for argv, proc in zip(argvs, procs):
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, (argv, err[-3000:])


def test_documented_cli_flags_parse():
  """capenext-convert / -predict / -demo commands through their own argparse parsers."""
  from capenext_jax import demo, predict
  from capenext_jax.convert import cli
  parsers = {'capenext-convert': cli.build_parser(), 'capenext-predict': predict.build_parser(),
             'capenext-demo': demo.build_parser()}
  for command in COVERAGE:
    program = command.split()[0]
    if program in parsers:
      parsers[program].parse_args(_argv(command))


# ----------------------------------------------------------------------------- the guide
def write_my_keypoints(root) -> dict:
  """Six animal categories of 5 instances on 80x60 noise photos, 3-5 named keypoints each
  (0-based skeletons): `my_keypoints.json` and `images/` under `root`."""
  from PIL import Image
  rng = np.random.default_rng(0)
  ears = ['nose', 'left ear', 'right ear']
  cats = [('fox', ears + ['tail base', 'tail tip'], [[0, 1], [0, 2], [3, 4]]),
          ('lynx', ears + ['tail'], [[0, 1], [0, 2]]), ('okapi', ears + ['tail'], [[0, 1], [0, 2]]),
          ('heron', ['beak tip', 'head', 'left foot', 'right foot'], [[0, 1]]),
          ('wolf', ears + ['tail base', 'tail tip'], [[0, 1], [0, 2], [3, 4]]),
          ('hare', ears, [[0, 1], [0, 2]])]
  coco = {'images': [], 'annotations': [], 'categories': []}
  (root / 'images').mkdir(parents=True)
  for c, (name, names, skeleton) in enumerate(cats, 1):
    coco['categories'].append({'id': c, 'name': name, 'supercategory': 'animal',
                               'keypoints': names, 'skeleton': skeleton})
    for n in range(5):
      iid, file_name = c * 100 + n, f'{name}_{n}.jpg'
      Image.fromarray(rng.integers(0, 255, (60, 80, 3), np.uint8)).save(root / 'images' / file_name)
      coco['images'].append({'id': iid, 'file_name': file_name, 'width': 80, 'height': 60})
      xy = rng.uniform([10, 10], [70, 50], (len(names), 2)).round(1)
      coco['annotations'].append({
          'id': iid, 'image_id': iid, 'category_id': c, 'iscrowd': 0, 'bbox': [5, 5, 70, 50],
          'num_keypoints': len(names),
          'keypoints': np.concatenate([xy, np.full((len(names), 1), 2)], 1).ravel().tolist()})
  (root / 'my_keypoints.json').write_text(json.dumps(coco))
  return coco


# The guide's user has the environment CapeNext is installed in on PATH: `python` and the
# console scripts are the ones next to this interpreter (PYTHONPATH keeps this checkout's code).
GUIDE_ENV = dict(ENV, PATH=os.pathsep.join([os.path.dirname(sys.executable),
                                            os.environ.get('PATH', '')]))


def run_documented(command: str, cwd) -> str:
  """A documented command exactly as written, run from the data folder `cwd`."""
  proc = subprocess.run(shlex.split(command), cwd=cwd, env=GUIDE_ENV, capture_output=True,
                        text=True, timeout=600)
  assert proc.returncode == 0, f'{command}\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}'
  return proc.stdout + proc.stderr


def guide(step: str) -> list[str]:
  return [c for c, (how, what) in COVERAGE.items() if how == 'guide' and what == step]


def _only_one_lynx(d):
  d['annotations'] = [a for a in d['annotations'] if a['category_id'] != 2 or a['id'] == 200]


def _latin1_name(d):
  d['categories'][0]['keypoints'][0] = 'museau (café)'


# How each row of the guide's error table is met (None: its --val / --test name).
GUIDE_ERRORS = [
    lambda d: d['categories'][0]['skeleton'].append([1, 5]),
    lambda d: [c.update(skeleton=[[1, 2]]) for c in d['categories']],
    lambda d: d['annotations'][0].update(keypoints=d['annotations'][0]['keypoints'][:-3]),
    lambda d: d['categories'][1].update(keypoints=['nose']),
    lambda d: d['annotations'][0]['keypoints'].__setitem__(5, -1),
    _latin1_name,
    _only_one_lynx,
    lambda d: d['images'][0].update(file_name='fox_9.jpg'),
    None,
]


def test_custom_data_guide_checks_and_splits(tmp_path):
  """Section 2 as written from a data folder outside the repository, and each error of its
  table on a file broken that way (the input file unchanged)."""
  data = tmp_path / 'my data'
  assert REPO not in data.parents
  coco = write_my_keypoints(data)
  out = run_documented(guide('split')[0], data)
  assert 'fox: K=5, 5 instances' in out
  for split, names in (('train', {'fox', 'wolf', 'hare'}), ('val', {'lynx'}),
                       ('test', {'okapi', 'heron'})):
    written = json.loads((data / 'annotations' / f'my_keypoints_{split}.json').read_text())
    assert {c['name'] for c in written['categories']} == names
  table = re.findall(r'^\| `(.*?)` \|', (REPO / 'docs' / 'CUSTOM_DATA.md').read_text(), re.M)
  assert len(table) == len(GUIDE_ERRORS)
  for message, breaking in zip(table, GUIDE_ERRORS):
    broken = json.loads(json.dumps(coco))
    args = ['--image_root', 'images']
    if breaking is None:
      args += ['--val', 'otter']
    else:
      breaking(broken)
    path = data / 'broken.json'
    path.write_bytes(json.dumps(broken, ensure_ascii=False).encode(
        'latin-1' if breaking is _latin1_name else 'utf-8'))
    before = path.read_bytes()
    proc = subprocess.run([sys.executable, '-m', 'capenext_jax.tools.split_categories',
                           'broken.json', *args], env=ENV, capture_output=True, text=True,
                          cwd=data, timeout=60)
    assert proc.returncode == 2 and message.split('[...]')[0] in proc.stderr, (message,
                                                                               proc.stderr)
    assert proc.stderr.count('\n') == 1 and path.read_bytes() == before


@pytest.mark.slow
def test_custom_data_guide_train_eval_export_predict(tmp_path):
  """Sections 3-5 as written from a data folder outside the repository: train (runlocal),
  evaluate, export, predict."""
  tmp_path = tmp_path / 'my data'
  write_my_keypoints(tmp_path)
  run_documented(guide('split')[0], tmp_path)
  out = run_documented(guide('train')[0], tmp_path)
  assert 'compiling train step' in out and 'test PCK@0.2 after training (step 4)' in out
  out = run_documented(guide('eval')[0], tmp_path)
  report = json.loads((tmp_path / 'runs' / 'mine' / 'eval_my_keypoints_test.json').read_text())
  assert {c['name'] for c in report['per_category']} == {'okapi', 'heron'}
  run_documented(guide('export')[0], tmp_path)
  prov = json.loads((tmp_path / 'my_capenext' / 'config.json').read_text())['provenance']
  assert prov['step'] == 4 and prov['kind'] == 'workdir'
  make_out, single, batch = guide('predict')
  run_documented(make_out, tmp_path)
  run_documented(single, tmp_path)
  result = json.loads((tmp_path / 'out' / 'okapi_0.json').read_text())
  assert [k['description'] for k in result['keypoints']] == ['nose', 'left ear', 'right ear',
                                                            'tail']
  assert (tmp_path / 'out' / 'okapi_0_overlay.png').is_file()
  run_documented(batch, tmp_path)
  assert len(json.loads((tmp_path / 'out' / 'test_predictions.json').read_text())) == 10
  assert len(list((tmp_path / 'out' / 'overlays').glob('*.png'))) == 10

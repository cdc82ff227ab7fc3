"""The command-line boundary of train.py, eval.py, capenext-predict and capenext-demo.

A user's mistake (a bad flag, config field, file or value) ends in one line on stderr that
names what is wrong, `<prog>: error: <message>`, and exit status 2; a failure of the run
itself (a checkpoint that cannot be written, a non-finite loss) in the same line and status 1.
The traceback is printed only when asked for (`-v` / `--verbosity=1` for the absl programs).
Anything else is a bug and keeps its traceback. Before the work, `check_writable` and
`check_distinct_files` make sure its outputs can be written and that none of them is one of
the run's inputs or another output.

Only the programs use this module; the library raises ordinary exceptions.
"""
from __future__ import annotations

import contextlib
import difflib
import importlib.util
import os
import sys
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from capenext_jax import runtime
from capenext_jax.errors import DataWarning
from capenext_jax.extras import MissingExtra

# A user's input is wrong, or an optional dependency it needs is not installed: exit 2. (Not
# OSError in general: a failing disk is not the user's.)
INPUT_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError,
                MissingExtra)


class RunError(RuntimeError):
  """The run failed for a reason the user can act on (storage, non-finite values): exit 1."""


RUN_ERRORS = (RunError, FloatingPointError, OSError)


def one_line(error: BaseException) -> str:
  """The error's message on one line (the first line that says something, plus the rest
  joined with '; ')."""
  lines = [line.strip() for line in str(error).strip().strip("'\"").splitlines() if line.strip()]
  return '; '.join(lines) or type(error).__name__


def exit_status(error: BaseException) -> int | None:
  """2 for input errors, 1 for run errors, None for anything else (a bug: keep the trace)."""
  if isinstance(error, INPUT_ERRORS):
    return 2
  if isinstance(error, RUN_ERRORS):
    return 1
  return None


def fail(prog: str, message: str, status: int = 2):
  print(f'{prog}: error: {message}', file=sys.stderr, flush=True)
  raise SystemExit(status)


@contextlib.contextmanager
def plain_data_warnings() -> Iterator[None]:
  """Within the block, a `DataWarning` (annotations dropped, images skipped) is one plain line
  on stderr, `warning: <message>`, instead of Python's `file:line: DataWarning: ...` and the
  source line that warned; other warnings print as before."""
  with warnings.catch_warnings():   # restores the filters and showwarning afterwards
    warnings.simplefilter('always', DataWarning)   # each load that drops data says so
    show = warnings.showwarning

    def show_plainly(message, category, filename, lineno, file=None, line=None):
      if issubclass(category, DataWarning):
        print(f'warning: {message}', file=sys.stderr, flush=True)
      else:
        show(message, category, filename, lineno, file, line)

    warnings.showwarning = show_plainly
    yield


def guarded(prog: str, main: Callable, *, verbose: Callable[[], bool]) -> Callable:
  """`main` with the project's errors turned into one line and an exit status, and its data
  warnings into plain lines (`plain_data_warnings`)."""

  def run(*args, **kwargs):
    try:
      with plain_data_warnings():
        return main(*args, **kwargs)
    except Exception as e:  # noqa: BLE001 - sorted by exit_status below
      status = exit_status(e)
      if status is None or verbose():
        raise
      fail(prog, one_line(e), status)

  return run


def run_parsed(prog: str, run: Callable, args) -> tuple[int, object]:
  """`run(args)` of an argparse program behind the boundary (`args.verbose` keeps the
  traceback): (exit status, what `run` returned, or None when it failed)."""
  try:
    return 0, guarded(prog, run, verbose=lambda: args.verbose)(args)
  except SystemExit as e:
    return e.code, None


# ----------------------------------------------------------------------------- absl programs
def absl_verbose() -> bool:
  from absl import flags
  return flags.FLAGS.is_parsed() and flags.FLAGS['verbosity'].value >= 1


def absl_flags_parser(prog: str) -> Callable[[list[str]], list[str]]:
  """An `app.run(flags_parser=...)` that reports a bad flag in one line (status 2)."""
  from absl import flags

  def parse(argv: list[str]) -> list[str]:
    argv = config_argv(argv)
    try:
      return flags.FLAGS(argv)
    except flags.Error as e:
      fail(prog, f'{one_line(e)} (see --helpshort)')
    except INPUT_ERRORS + (AttributeError, KeyError, TypeError) as e:
      fail(prog, config_error_message(argv, e))

  return parse


def run_absl_program(prog: str, define_flags: Callable[[str], None], main: Callable) -> None:
  """An absl program (capenext-train / train.py, capenext-eval / eval.py): a quiet start, the
  allocator (its re-exec comes before any flag work), the flags, the guarded `main`."""
  from absl import app
  runtime.quiet_startup()
  runtime.tune_allocator()
  define_flags(prog)
  app.run(guarded(prog, main, verbose=absl_verbose), flags_parser=absl_flags_parser(prog))


def define_distributed_flags() -> None:
  """--distributed, --coordinator_address, --num_processes, --process_id (train.py, eval.py)."""
  from absl import flags
  flags.DEFINE_bool('distributed', False, 'jax.distributed.initialize() with auto-detection')
  flags.DEFINE_string('coordinator_address', None, 'host:port of process 0 (multi-process)')
  flags.DEFINE_integer('num_processes', 1, 'processes in the run', lower_bound=1)
  flags.DEFINE_integer('process_id', 0, 'this process', lower_bound=0)


def initialize_distributed() -> None:
  """jax.distributed.initialize from the `define_distributed_flags` flags when the program
  spans several processes (CPU: gloo collectives). Before anything else touches a device."""
  import jax
  from absl import flags
  f = flags.FLAGS
  if f.num_processes > 1:
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')
    jax.distributed.initialize(f.coordinator_address, f.num_processes, f.process_id)
  elif f.distributed:
    jax.distributed.initialize()


CONFIG_HELP = ('a config file[:arg] or the name of a module of the installed configs '
               'package with its argument (mp100:split=1,root=data/mp100); override any field '
               'with --config.<field>=value (e.g. --config.batch_size=16 '
               '--config.data.train_ann=annotations/train.json)')


def config_spec(spec: str) -> str:
  """A --config value as ml_collections reads it: 'file.py[:arg]' unchanged, 'name[:arg]' of
  a module of the `configs` package (installed with the library) -> its file[:arg], so the
  programs run from any folder and from a non-editable install."""
  name, sep, arg = spec.partition(':')
  if os.path.exists(name) or not name.isidentifier():
    return spec
  try:
    module = importlib.util.find_spec(f'configs.{name}')
  except ImportError:
    module = None
  if module is None or not module.origin:
    return spec   # ml_collections names the file it could not read
  return module.origin + sep + arg


def config_argv(argv: Sequence[str]) -> list[str]:
  """`argv` with its --config value (either form) through `config_spec`."""
  out = list(argv)
  for i, a in enumerate(out):
    if a.startswith('--config='):
      out[i] = '--config=' + config_spec(a[len('--config='):])
    elif a == '--config' and i + 1 < len(out):
      out[i + 1] = config_spec(out[i + 1])
  return out


def define_config_flag(prog: str, default: str, help_text: str = CONFIG_HELP, **kwargs):
  """`config_flags.DEFINE_config_file('config', ...)`; `default` and --config may name a
  module of the `configs` package (`config_spec`). ml_collections applies the
  `--config.a.b=value` overrides of sys.argv while defining the flag, so a misspelt field
  fails here, at import: report it in one line naming the field and the nearest valid ones."""
  from ml_collections import config_flags
  default = config_spec(default)
  sys.argv[:] = config_argv(sys.argv)
  try:
    return config_flags.DEFINE_config_file('config', default, help_text, **kwargs)
  except (AttributeError, KeyError, ValueError, TypeError) as e:
    fail(prog, config_error_message(sys.argv, e, default))


def show_in_help(*names: str) -> None:
  """List these flags in `--help` (absl lists there only the main module's own flags; ours
  are defined by the library, for the scripts and the console commands alike)."""
  from absl import flags
  for name in names:
    flags.FLAGS.register_key_flag_for_module(sys.argv[0], flags.FLAGS[name])


def config_error_message(argv: Sequence[str], error: BaseException,
                         default: str | None = None) -> str:
  """Names the first `--config.x.y` override whose field does not exist (with the nearest
  valid names); else the error itself, on one line."""
  spec = next((a.split('=', 1)[1] for a in argv if a.startswith('--config=')), default)
  overrides = [a[len('--config.'):].split('=', 1)[0] for a in argv if a.startswith('--config.')]
  if spec and overrides:
    try:
      config = load_config(spec)
    except Exception:  # noqa: BLE001 - the config itself is broken: report the original error
      config = None
    for path in overrides if config is not None else ():
      missing = missing_field(config, path)
      if missing:
        return missing
  return f'--config: {one_line(error)}'


def load_config(spec: str):
  """`get_config(arg)` of a 'path/to/config.py[:arg]' (or 'module[:arg]') spec, as
  config_flags loads it."""
  path, _, arg = config_spec(spec).partition(':')
  module_spec = importlib.util.spec_from_file_location('_capenext_config', path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(arg) if arg else module.get_config()


def missing_field(config, dotted: str) -> str | None:
  """An error naming the first component of `dotted` that `config` lacks, or None."""
  node, walked = config, 'config'
  for name in dotted.split('.'):
    fields = list(node.keys()) if hasattr(node, 'keys') else []
    if name not in fields:
      near = difflib.get_close_matches(name, fields, n=3, cutoff=0.5)
      hint = f'did you mean {", ".join(near)}?' if near else f'valid: {", ".join(sorted(fields))}'
      return f'--config.{dotted}: {walked} has no field {name!r} ({hint})'
    node, walked = node[name], f'{walked}.{name}'
  return None


# ----------------------------------------------------------------------------- outputs
def check_writable(flag: str, path: str | os.PathLike | None, *, directory: bool = False) -> None:
  """Before the work starts, so that it is not lost at the end: creates the folders `path`
  needs, or raises ValueError naming `flag` (a file in the way, a read-only folder, a folder
  where a file is wanted)."""
  if not path:
    return
  path = Path(path)
  if not directory and path.is_dir():
    raise ValueError(f'{flag}={path}: is a directory, a file name is needed')
  folder = path if directory else path.parent
  existing = next(p for p in (folder, *folder.parents) if p.exists())
  if not existing.is_dir():
    raise ValueError(f'{flag}={path}: {existing} is a file, not a folder')
  if not os.access(existing, os.W_OK):
    raise ValueError(f'{flag}={path}: {existing} is not writable')
  folder.mkdir(parents=True, exist_ok=True)


def _same_file(a: Path, b: Path) -> bool:
  """One file under two names: the same resolved path, or (both existing) the same inode, as
  a hard link or a symlink elsewhere gives."""
  if a.resolve() == b.resolve():
    return True
  try:
    return a.exists() and b.exists() and os.path.samefile(a, b)
  except OSError:
    return False


Paths = Sequence[tuple[str, 'str | os.PathLike | None']]


def check_distinct_files(inputs: Paths, outputs: Paths) -> None:
  """Before the work: no output is one of the run's inputs, and no two outputs are one file.

  inputs / outputs: (flag, path) pairs, e.g. ('IMAGE', 'photo.jpg'), ('--output', 'x.json');
  a None or empty path is skipped. Raises ValueError naming both flags and the path.
  """
  given_inputs = [(flag, Path(p)) for flag, p in inputs if p]
  seen: list[tuple[str, Path]] = []
  for flag, p in outputs:
    if not p:
      continue
    path = Path(p)
    for in_flag, in_path in given_inputs:
      if _same_file(path, in_path):
        raise ValueError(f'{flag}={path}: is the input {in_flag}={in_path}; refusing to write '
                         f'over a file this run reads (give another {flag})')
    for out_flag, out_path in seen:
      if _same_file(path, out_path):
        raise ValueError(f'{flag}={path}: {out_flag} is the same file; each output needs its '
                         f'own path')
    seen.append((flag, path))

"""The console commands capenext-train and capenext-eval (pyproject's [project.scripts]).

Importing this module re-executes the process once for its allocator
(`runtime.tune_allocator`) before it imports the programs: a re-exec repeats every import made
before it, and the programs import jax, flax and the model at module level (about 2 s). So it
is imported only by the console scripts' wrappers, which call one function of it; eval.py and
train.py do the same in their own `__main__` blocks.
"""
from capenext_jax import runtime

runtime.quiet_startup()
runtime.tune_allocator()

from capenext_jax.evaluation import program as eval_program  # noqa: E402
from capenext_jax.training import program as train_program  # noqa: E402


def train() -> None:
  """capenext-train."""
  train_program.run()


def evaluate() -> None:
  """capenext-eval."""
  eval_program.run()

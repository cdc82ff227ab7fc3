"""What the benchmarks report about a compiled step: FLOPs and MFU, memory, out-of-memory.

Imports only jax (the accelerator hosts have no TensorFlow and no ml_collections).
"""
from __future__ import annotations

import time

import jax

# Dense peak FLOP/s per chip (vendor data sheets) by compute dtype; 'float32' is the true fp32
# rate the 'highest' matmul precision runs at (CUDA cores on GPUs; on TPUs it is emulated with
# several bf16 passes, so no fp32 peak is given and MFU is left out). Keyed by a lower-case
# substring of `device_kind`, most specific first.
PEAK_FLOPS = (
    ('h100 pcie', {'bfloat16': 756e12, 'float32': 51e12}),
    ('h100', {'bfloat16': 989e12, 'float32': 67e12}),
    ('h200', {'bfloat16': 989e12, 'float32': 67e12}),
    ('a100', {'bfloat16': 312e12, 'float32': 19.5e12}),
    ('tpu v4', {'bfloat16': 275e12}),
    ('tpu v5 lite', {'bfloat16': 197e12}),
    ('tpu v5e', {'bfloat16': 197e12}),
    ('tpu v5p', {'bfloat16': 459e12}),
    ('tpu v5', {'bfloat16': 459e12}),
    ('tpu v6 lite', {'bfloat16': 918e12}),
    ('tpu v6e', {'bfloat16': 918e12}),
)


def peak_flops(device_kind: str, dtype: str) -> float | None:
  kind = device_kind.lower()
  for key, peaks in PEAK_FLOPS:
    if key in kind:
      return peaks.get(dtype)
  return None


def compiled_flops(compiled) -> float | None:
  """FLOPs of one call of a compiled executable (XLA's cost analysis; None if unavailable)."""
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):   # older jax: one dict per executable
    cost = cost[0] if cost else None
  return float(cost['flops']) if cost and 'flops' in cost else None


def compiled_memory(compiled) -> dict:
  """Bytes the executable needs: arguments, outputs, temporaries and XLA's peak estimate."""
  m = compiled.memory_analysis()
  if m is None:
    return {}
  out = {'argument_bytes': m.argument_size_in_bytes, 'output_bytes': m.output_size_in_bytes,
         'temp_bytes': m.temp_size_in_bytes}
  peak = getattr(m, 'peak_memory_in_bytes', 0)
  if peak:
    out['compiled_peak_bytes'] = peak
  return out


def device_peak_bytes() -> int | None:
  """The device allocator's peak so far in this process (GPUs / TPUs; None on CPU)."""
  stats = jax.devices()[0].memory_stats()
  return None if not stats else stats.get('peak_bytes_in_use')


def time_steps(compiled, state, batch, *, warmup: int, steps: int):
  """(seconds per step, state, metrics) of a compiled train step that donates its state:
  `warmup` steps, then `steps` back to back with one wait at the end."""
  for _ in range(warmup):
    state, metrics = compiled(state, batch)
  jax.block_until_ready(state)
  t0 = time.perf_counter()
  for _ in range(steps):
    state, metrics = compiled(state, batch)
  jax.block_until_ready((state, metrics))
  return (time.perf_counter() - t0) / steps, state, metrics


def is_out_of_memory(error: BaseException) -> bool:
  text = str(error)
  return 'RESOURCE_EXHAUSTED' in text or 'Out of memory' in text or 'out of memory' in text


def mfu(flops: float | None, seconds: float, device_kind: str, dtype: str) -> float | None:
  peak = peak_flops(device_kind, dtype)
  if flops is None or peak is None or seconds <= 0:
    return None
  return flops / seconds / peak

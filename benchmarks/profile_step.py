"""One prepared device capture of the bf16 training step (one GPU, under 8 minutes, no network,
no TensorFlow), for developers without a GPU. Adapted from ../shared/tools/device_capture.py.

  python benchmarks/profile_step.py --out "$OUT" [--budget 420]   # on the device machine
  JAX_PLATFORMS=cpu python benchmarks/profile_step.py --tiny --out /tmp/capture   # wiring check

Headline model (Swin V2-T, CLIP ViT-B/32, fusion, CapeX head; `--tiny`: the CPU test size at
64 px), bf16, 1-shot, cached text, random weights and inputs. Phases in priority order; a phase
is skipped (listed in 'skipped') when fewer seconds than it needs are left of --budget, and
summary.json is rewritten after every phase, so a cut-off run still leaves its results:
  env          versions (python, jax, jaxlib, flax, optax, CUDA, cuDNN), device, XLA_FLAGS
  numerics     each fused attention path (Swin windows, Swin shifted windows with the mask, ViT /
               CLIP self-attention, the head's key-padded attention) against the reference
               attention on the device: outputs and gradients, bfloat16 and float32, errors
               relative to a float32 reference, with the kernel that ran (cuDNN or XLA)
  steps        train-step time, samples/s, peak memory, compile time for attention 'auto'
               and 'xla' at --batches (128, 256); the first batch of each also writes its
               optimised HLO (hlo/<name>.txt) and op census (hlo/<name>.ops.json: fusions,
               custom-call targets, cuDNN attention calls), and 'auto' a 3-step profiler
               trace (trace/) summarised into top_kernels_<name>.txt (top 30 by time)
  components   forward / forward+backward of the backbone, the CLIP image tower, the head, and
               the optimizer update, at the first batch size (eval mode: no dropout)
Writes under --out: summary.json, env.json, hlo/, trace/, top_kernels_*.txt.
"""
from __future__ import annotations

import argparse
import collections
import glob
import gzip
import importlib.metadata
import json
import os
import platform
import re
import sys
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import measure  # noqa: E402
from capenext_jax import losses  # noqa: E402
from capenext_jax.models import layers, swin_v2  # noqa: E402
from capenext_jax.models.capenext import CapeNext, CapeNextConfig, abstract_model  # noqa: E402
from capenext_jax.tools.bf16_fidelity import random_batch  # noqa: E402
from capenext_jax.device import flat, partition, state as state_lib, step as step_lib  # noqa: E402
from capenext_jax.training import schedule  # noqa: E402

HEATMAP = 64
TOP_KERNELS = 30
PROFILE_STEPS = 3


class Capture:
  """The output folder, the time budget and the summary written after every phase."""

  def __init__(self, out: str, budget_s: float, only: str = ''):
    self.out, self.budget_s, self.t0 = out, budget_s, time.time()
    self.only = [p for p in only.split(',') if p]
    self.summary: dict = {'skipped': [], 'errors': {}, 'phase_s': {}}
    os.makedirs(os.path.join(out, 'hlo'), exist_ok=True)

  def left(self) -> float:
    return self.budget_s - (time.time() - self.t0)

  def save(self) -> None:
    self.summary['total_s'] = round(time.time() - self.t0, 1)
    tmp = os.path.join(self.out, 'summary.json.tmp')
    with open(tmp, 'w') as f:
      json.dump(self.summary, f, indent=1, default=str)
    os.replace(tmp, os.path.join(self.out, 'summary.json'))

  def phase(self, name: str, need_s: float, fn) -> None:
    """Run fn() if need_s seconds are left; record its error (and go on) or its time."""
    if self.only and not any(name.startswith(p) for p in self.only):
      return
    if self.left() < need_s:
      self.summary['skipped'].append(name)
      print(f'[skip] {name} ({self.left():.0f} s left, needs {need_s:.0f})', flush=True)
      return
    print(f'[run ] {name} ({self.left():.0f} s left)', flush=True)
    t = time.time()
    try:
      fn()
    except Exception as e:  # noqa: BLE001 (recorded; the later phases still run)
      self.summary['errors'][name] = f'{type(e).__name__}: {str(e)[:2000]}'
      traceback.print_exc()
    self.summary['phase_s'][name] = round(time.time() - t, 1)
    self.save()


# ----------------------------------------------------------------------------- environment
def versions() -> dict:
  from jax._src.lib import cuda_versions
  def version(package):
    try:
      return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
      return None
  device = jax.devices()[0]
  env = {'python': platform.python_version(), 'jax': jax.__version__,
         **{p: version(p) for p in ('jaxlib', 'flax', 'optax', 'jax-cuda12-plugin',
                                    'jax-cuda13-plugin')},
         'device': device.device_kind, 'platform': device.platform,
         'devices': jax.device_count(), 'kernel_platform': layers.current_platform(),
         'XLA_FLAGS': os.environ.get('XLA_FLAGS', ''), 'cudnn': layers.cudnn_version()}
  if cuda_versions is not None:
    try:
      env['cuda_runtime'] = cuda_versions.cuda_runtime_get_version()
    except Exception:  # noqa: BLE001 (the query differs between plugin versions)
      env['cuda_runtime'] = None
  return env


# ----------------------------------------------------------------------------- numerics
def _explicit_attention(q, k, v, bias=None, key_padding=None, scale=1.0):
  """softmax(q k^T * scale + bias) v as the model's reference attentions compute it: logits
  and softmax in float32, the products in the inputs' dtype. q [B, T, N, H], k / v
  [B, S, N, H], bias broadcastable to [B, N, T, S], key_padding [B, S] True = ignore."""
  logits = jnp.einsum('btnh,bsnh->bnts', q, k, preferred_element_type=jnp.float32) * scale
  if bias is not None:
    logits = logits + bias.astype(jnp.float32)
  if key_padding is not None:
    logits = jnp.where(key_padding[:, None, None, :], -jnp.inf, logits)
  return jnp.einsum('bnts,bsnh->btnh', jax.nn.softmax(logits, axis=-1).astype(v.dtype), v)


def attention_paths(tiny: bool) -> dict:
  """{name: (fused(implementation) -> f(*inputs), reference f(*inputs), inputs)}: each fused
  attention path of the model, called as the model calls it, and its explicit float32 form.
  Inputs are float32 here, cast to the checked dtype by `check_path`."""
  rng = np.random.default_rng(0)
  normal = lambda *shape: jnp.asarray(rng.normal(size=shape), jnp.float32)
  b = 2 if tiny else 8
  # Swin V2-T stage 0 (64x64 tokens, windows of 16, 3 heads of 32) or the tiny test size.
  res, window, h, d = (16, 4, 2, 16) if tiny else (64, 16, 3, 32)
  n, nw = window * window, (res // window) ** 2
  unit = lambda x: x / jnp.linalg.norm(x, axis=-1, keepdims=True)
  swin_q = unit(normal(b, nw, n, h, d)) * 10.0    # cosine attention: l2-normalised q * scale
  swin_k, swin_v = unit(normal(b, nw, n, h, d)), normal(b, nw, n, h, d)
  position_bias = 16.0 * jax.nn.sigmoid(normal(h, n, n))
  mask = jnp.asarray(swin_v2.shifted_window_mask(res, window, window // 2))

  def swin(masked):
    m = mask if masked else None
    fused = lambda impl: lambda q, k, v, pb: swin_v2.fused_biased_attention(q, k, v, pb, m, impl)
    def reference(q, k, v, pb):
      fold = lambda t: t.reshape(b * nw, n, h, d)
      bias = pb[None] if m is None else (pb[None] + m[:, None])       # [1 | nW, h, N, N]
      bias = jnp.broadcast_to(bias[None], (b, nw, h, n, n)).reshape(b * nw, h, n, n)
      return _explicit_attention(fold(q), fold(k), fold(v), bias).reshape(q.shape)
    return fused, reference, (swin_q, swin_k, swin_v, position_bias)

  # CLIP ViT-B/32 image tower: 50 tokens, 12 heads of 64 (tiny: 17 tokens, 1 head of 64).
  t, heads, hd = (17, 1, 64) if tiny else (50, 12, 64)
  vit_in = (normal(b, t, heads, hd), normal(b, t, heads, hd), normal(b, t, heads, hd))
  vit_fused = lambda impl: lambda q, k, v: layers.dot_product_attention(
      q, k, v, implementation=impl, site='profile_step vit', scale=hd ** -0.5)
  vit_ref = lambda q, k, v: _explicit_attention(q, k, v, scale=hd ** -0.5)

  # The head's self-attention: 100 keypoint slots, 8 heads of 32, keys padded (not a prefix).
  slots, mh, md = (100, 4, 8) if tiny else (100, 8, 32)
  padding = jnp.asarray(rng.uniform(size=(b, slots)) < 0.6)
  padding = padding.at[:, 0].set(False)               # at least one valid key per sample
  mha_in = (normal(b, slots, mh, md), normal(b, slots, mh, md), normal(b, slots, mh, md))

  def mha_fused(impl):
    def f(q, k, v):
      lengths, k, v = layers.valid_keys_first(padding, k, v)
      return layers.dot_product_attention(q, k, v, implementation=impl, kv_lengths=lengths,
                                          site='profile_step mha', scale=md ** -0.5)
    return f
  mha_ref = lambda q, k, v: _explicit_attention(q, k, v, key_padding=padding, scale=md ** -0.5)
  return {'swin_window': swin(False), 'swin_shifted_window': swin(True),
          'vit_clip_self_attention': (vit_fused, vit_ref, vit_in),
          'head_key_padded_attention': (mha_fused, mha_ref, mha_in)}


def _max_rel_error(a, b) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


def check_path(fused, reference, inputs, dtype, implementation) -> dict:
  """Output and input gradients of fused (in `dtype`) and of the explicit (reference)
  attention in `dtype`, both against the explicit attention in float32 on the same inputs
  (rounded to `dtype`): the reference's own error says what `dtype` costs anyway.
  Gradients of sum(out * c) for a fixed random cotangent c; the bias gradient is the Swin
  position-bias gradient."""
  inputs = tuple(x.astype(dtype) for x in inputs)
  c = jnp.asarray(np.random.default_rng(1).normal(size=reference(*inputs).shape), jnp.float32)
  argnums = tuple(range(len(inputs)))

  def value_and_grads(f, cast):
    run = lambda *xs: f(*(x.astype(cast) for x in xs))
    loss = lambda *xs: jnp.sum(run(*xs).astype(jnp.float32) * c)
    return jax.jit(run)(*inputs), jax.jit(jax.grad(loss, argnums=argnums))(*inputs)

  f = fused(implementation)
  text = jax.jit(jax.grad(lambda *xs: jnp.sum(f(*xs).astype(jnp.float32) * c),
                          argnums=argnums)).lower(*inputs).as_text()
  exact_out, exact_grads = value_and_grads(reference, jnp.float32)
  fused_out, fused_grads = value_and_grads(f, dtype)
  ref_out, ref_grads = value_and_grads(reference, dtype)
  names = ('q', 'k', 'v', 'bias')[:len(inputs)]
  return {
      'kernel': 'cudnn' if '__cudnn$fmha' in text else 'xla',
      'out_rel_err': _max_rel_error(fused_out, exact_out),
      'out_rel_err_reference_same_dtype': _max_rel_error(ref_out, exact_out),
      'grad_rel_err': {n: _max_rel_error(g, e) for n, g, e in zip(names, fused_grads,
                                                                     exact_grads)},
      'grad_rel_err_reference_same_dtype': {n: _max_rel_error(g, e) for n, g, e in
                                            zip(names, ref_grads, exact_grads)}}


def numerics(capture: Capture, tiny: bool) -> None:
  implementation = layers.attention_implementation(layers.ATTENTION_AUTO)
  if implementation == layers.ATTENTION_REFERENCE:
    implementation = 'xla'         # on CPU: the fused call's XLA form (the wiring is the same)
  results = {'implementation': implementation}
  for name, (fused, reference, inputs) in attention_paths(tiny).items():
    for dtype in (jnp.bfloat16, jnp.float32):
      key = f'{name}/{jnp.dtype(dtype).name}'
      results[key] = check_path(fused, reference, inputs, dtype, implementation)
      print(key, results[key], flush=True)
  capture.summary['numerics'] = results


# ----------------------------------------------------------------------------- the step
def op_census(hlo_text: str) -> dict:
  """Counts of an optimised HLO module's ops: fusions by kind, custom-call targets."""
  ops = collections.Counter(re.findall(
      r'= \S+ (fusion|custom-call|copy|transpose|dot|convolution|reduce|scatter|gather|'
      r'while|all-reduce)\(', hlo_text))
  targets = collections.Counter(re.findall(r'custom_call_target="([^"]+)"', hlo_text))
  return {'ops': dict(ops), 'fusion_kinds': dict(collections.Counter(
              re.findall(r'kind=(k\w+)', hlo_text))),
          'custom_call_targets': dict(targets),
          'cudnn_attention_calls': sum(v for k, v in targets.items() if 'fmha' in k)}


def top_kernels(trace_dir: str, steps: int, n: int = TOP_KERNELS) -> dict | None:
  """The top-n device kernels (host XLA ops where the trace has no device) by time per step,
  from the profiler's perfetto JSON."""
  files = (glob.glob(os.path.join(trace_dir, '**', 'perfetto_trace.json.gz'), recursive=True)
           + glob.glob(os.path.join(trace_dir, '**', '*.trace.json.gz'), recursive=True))
  if not files:
    return None
  with gzip.open(files[0]) as f:
    events = json.load(f)
  events = events['traceEvents'] if isinstance(events, dict) else events
  names = {e['pid']: e.get('args', {}).get('name', '') for e in events
           if e.get('ph') == 'M' and e.get('name') == 'process_name'}
  device_pids = {pid for pid, name in names.items() if '/device:GPU' in name}
  spans = [e for e in events if e.get('ph') == 'X' and (e.get('pid') in device_pids
                                                          if device_pids else True)]
  total = collections.defaultdict(lambda: [0.0, 0, ''])
  busy = 0.0
  for e in spans:
    key = e.get('args', {}).get('hlo_op') or e['name']
    row = total[key]
    row[0] += e.get('dur', 0)
    row[1] += 1
    row[2] = row[2] or e['name'][:80]
    busy += e.get('dur', 0)
  rows = sorted(total.items(), key=lambda kv: -kv[1][0])[:n]
  return {'device_events': bool(device_pids), 'kernels_per_step': round(len(spans) / steps),
          'busy_ms_per_step': round(busy / steps / 1e3, 3),
          'top': [{'op': k, 'ms_per_step': round(v[0] / steps / 1e3, 3),
                   'pct': round(100 * v[0] / max(busy, 1.0), 1),
                   'calls_per_step': round(v[1] / steps, 1), 'kernel': v[2]} for k, v in rows]}


class Steps:
  """One train state, a train step per attention setting, timed per batch size."""

  def __init__(self, tiny: bool, steps: int):
    self.tiny, self.steps = tiny, steps
    self.tx = schedule.make_optimizer(schedule.default_optim_config(), steps_per_epoch=1000)
    self.state = None

  def config(self, attention: str) -> CapeNextConfig:
    return CapeNextConfig.variant('tiny' if self.tiny else 'swinv2_t',
                                  image_size=64 if self.tiny else None, dtype='bfloat16',
                                  attention=attention)

  def graphdef(self, config: CapeNextConfig):
    graphdef = partition.split_model(abstract_model(config))[0]
    if self.state is None:    # the attention setting is in the graphdef, not in the state
      self.state = jax.jit(lambda: state_lib.init_train_state(
          CapeNext(config, rngs=layers.init_rngs(0)), self.tx, jax.random.PRNGKey(0))[1])()
    return graphdef

  def run(self, capture: Capture, attention: str, batch_size: int, *, inspect: bool,
          profile: bool) -> dict:
    config = self.config(attention)
    step = step_lib.make_train_step(
        self.graphdef(config), losses.batch_loss_fn(config.image_size, HEATMAP), self.tx)
    batch = {k: jnp.asarray(v) for k, v in random_batch(config, batch_size, 0).items()}
    name = f'{attention}_b{batch_size}'
    t = time.perf_counter()
    compiled = step.lower(self.state, batch).compile()
    record = {'compile_s': round(time.perf_counter() - t, 1)}
    if inspect:
      text = compiled.as_text()
      with open(os.path.join(capture.out, 'hlo', f'{name}.txt'), 'w') as f:
        f.write(text)
      record['census'] = op_census(text)
      with open(os.path.join(capture.out, 'hlo', f'{name}.ops.json'), 'w') as f:
        json.dump(record['census'], f, indent=1)
    memory = compiled.memory_analysis()
    if memory is not None:
      record['temp_GiB'] = round(memory.temp_size_in_bytes / 2**30, 3)
    step_s, state, metrics = measure.time_steps(compiled, self.state, batch, warmup=2,
                                                steps=self.steps)
    peak = measure.device_peak_bytes()
    record.update(step_ms=round(step_s * 1e3, 3), samples_per_s=round(batch_size / step_s, 1),
                  finite=bool(metrics['finite']),
                  peak_GiB=None if peak is None else round(peak / 2**30, 2))
    if profile:
      trace_dir = os.path.join(capture.out, 'trace', name)
      with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
        for _ in range(PROFILE_STEPS):
          state, metrics = compiled(state, batch)
        jax.block_until_ready(state)
      top = top_kernels(trace_dir, PROFILE_STEPS)
      if top is not None:
        record['trace'] = {k: v for k, v in top.items() if k != 'top'}
        with open(os.path.join(capture.out, f'top_kernels_{name}.txt'), 'w') as f:
          f.write(f'{"ms/step":>9} {"%":>5} {"calls":>6}  {"HLO op":60s} kernel\n')
          for r in top['top']:
            f.write(f"{r['ms_per_step']:9.3f} {r['pct']:5.1f} {r['calls_per_step']:6.1f}  "
                    f"{r['op'][:60]:60s} {r['kernel']}\n")
    self.state = state        # donated: the step hands back the one to use next
    print(name, {k: v for k, v in record.items() if k != 'census'}, flush=True)
    return record


def components(capture: Capture, steps: Steps, batch_size: int) -> None:
  """Forward and forward+backward times of the parts, jitted one by one (eval mode)."""
  config = steps.config(layers.ATTENTION_AUTO)
  model = state_lib.merge_model(steps.graphdef(config), steps.state)
  model.eval()
  batch = {k: jnp.asarray(v) for k, v in random_batch(config, batch_size, 0).items()}
  image = batch['query_image'].astype(jnp.bfloat16)
  times = {}

  def timeit(name, fn, *args):
    f = jax.jit(fn)
    jax.block_until_ready(f(*args))
    t = time.perf_counter()
    for _ in range(steps.steps):
      r = f(*args)
    jax.block_until_ready(r)
    times[name] = round((time.perf_counter() - t) / steps.steps * 1e3, 3)

  def split(module):
    graphdef, params, rest = nnx.split(module, nnx.Param, ...)
    return lambda p: nnx.merge(graphdef, p, rest), params

  backbone, backbone_params = split(model.backbone)
  backbone_loss = lambda p, x: jnp.sum(backbone(p)(x).astype(jnp.float32))
  timeit('backbone_fwd', backbone_loss, backbone_params, image)
  timeit('backbone_fwd_bwd', jax.grad(backbone_loss), backbone_params, image)
  timeit('clip_image_tower_fwd', lambda x: model.encode_query_image(x), image)
  feature = jax.jit(lambda p, x: backbone(p)(x))(backbone_params, image)
  head, head_params = split(model.head)
  text = batch['keypoint_text'].astype(jnp.bfloat16)
  mask, adjacency = batch['support_mask'], batch['adjacency'].astype(jnp.bfloat16)
  head_loss = lambda p, f: jnp.sum(head(p)(f, text, mask, adjacency)['keypoints'])
  timeit('head_fwd', head_loss, head_params, feature)
  timeit('head_fwd_bwd', jax.grad(head_loss), head_params, feature)
  trainable = steps.state.trainable
  opt_state = flat.init(steps.tx, trainable)   # the step's optimizer: over a few buffers
  update = lambda g, s, p: flat.update(steps.tx, g, s, p)[0]
  timeit('optimizer_update', update, trainable, opt_state, trainable)
  capture.summary['components_ms'] = times
  print('components', times, flush=True)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--out', default=os.environ.get('OUT', '/tmp/profile_step'))
  parser.add_argument('--budget', type=float, default=420.0, help='seconds for all phases')
  parser.add_argument('--batches', default='128,256')
  parser.add_argument('--attentions', default='auto,xla')
  parser.add_argument('--steps', type=int, default=10, help='timed steps per measurement')
  parser.add_argument('--tiny', action='store_true', help='the CPU test size (wiring check)')
  parser.add_argument('--only', default='', help='comma-separated phase-name prefixes to run')
  args = parser.parse_args(argv)
  if args.tiny:
    args.batches = ','.join(str(max(1, int(b) // 64)) for b in args.batches.split(','))
    args.steps = min(args.steps, 2)
  capture = Capture(args.out, args.budget, args.only)
  env = versions()
  capture.summary['env'] = env
  with open(os.path.join(args.out, 'env.json'), 'w') as f:
    json.dump(env, f, indent=1)
  print(env, flush=True)
  capture.save()

  scale = 0.1 if args.tiny else 1.0
  capture.phase('numerics', 40 * scale, lambda: numerics(capture, args.tiny))
  steps = Steps(args.tiny, args.steps)
  batches = [int(b) for b in args.batches.split(',')]
  results = capture.summary.setdefault('steps', {})
  for batch_size in batches:
    for attention in args.attentions.split(','):
      first = batch_size == batches[0]

      def run_step(attention=attention, batch_size=batch_size, first=first):
        try:
          results[f'{attention}_b{batch_size}'] = steps.run(
              capture, attention, batch_size, inspect=first,
              profile=first and attention == layers.ATTENTION_AUTO)
        except Exception as e:  # noqa: BLE001 (out of memory is a result, the rest raises)
          if not measure.is_out_of_memory(e):
            raise
          results[f'{attention}_b{batch_size}'] = 'OOM'
          steps.state = None     # the donated state may be gone with the failed step
      capture.phase(f'step_{attention}_b{batch_size}', (150 if first else 100) * scale, run_step)
  capture.phase('components', 90 * scale, lambda: components(capture, steps, batches[0]))
  capture.save()
  print(json.dumps({k: v for k, v in capture.summary.items() if k != 'env'},
                   default=str)[:4000])
  return 1 if capture.summary['errors'] else 0


if __name__ == '__main__':
  sys.exit(main())

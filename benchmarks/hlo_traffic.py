"""What one CapeNext train step asks of an accelerator, measured on any host: the step lowered for
CUDA (`lowering.lower_train_step`, no GPU needed) and read op by op.

Prints one JSON line: FLOPs (dot_general / convolution, 2 per multiply-add), matmuls by dtype
(count and FLOPs per `lhs x rhs -> out`, and how many are matrix-vector products), custom calls
by target, op counts, and the modelled HBM traffic per sample (bytes of the step / batch) by
component: backbone, clip_tower, fusion, head (the model's named scopes), loss (the rest of the
differentiated forward and its backward) and optimizer (everything after the gradient: Adam,
the global norm, the finite checks, which cost the same at any batch size).

The traffic model, a stand-in for XLA's fusion on a GPU: every matmul, convolution, custom call,
scatter, sort, reduce-window or call is its own kernel reading its operands and writing its
results; the other ops (elementwise, reduce, transpose, slice, concatenate, gather, ...) are
fused along single-consumer edges into loop kernels that read their inputs from and write
their outputs to memory once (a reduce ends its kernel, except for an elementwise op of the
reduce's shape, its epilogue); a value read by two kernels, read by a matmul-like op, or
returned is written once and read by each kernel that uses it (through a slice, only the
part the slice keeps: a kernel reading the first rows of a buffer moves those). Broadcasts,
reshapes, constants and iotas are free (their kernel reads the source). It ignores caches and
what XLA's own passes would change (it sees the step before optimisation), so it is a model to
compare versions of the code with, not a prediction of a profile.

--fusion dag keeps one more of XLA's habits: a fusion is a graph, not a chain, so a value used
by several elementwise ops that all land in the same kernel (x in x * sigmoid(x), the chain of
a hash) stays in registers instead of being written and read back. The default, chain, is the
rule the issue's baseline was first measured with; compare versions under one rule.

usage: python benchmarks/hlo_traffic.py [--batch 128] [--dtype bfloat16|float32]
         [--backbone swinv2_t] [--attention auto] [--fusion chain|dag] [--tiny] [--hlo FILE]
--tiny: the backbone's CPU test size at 64 px (seconds). --hlo: read a saved lowering (the
text `lower_train_step` returns) instead of lowering; --save FILE writes the lowering.
Imports only capenext_jax and jax/flax/optax/numpy (runs on accelerator hosts without TF).
"""
from __future__ import annotations

import argparse
import collections
import json
import math
import os
import re
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

COMPONENTS = ('backbone', 'clip_tower', 'fusion', 'head')   # the model's named scopes
DTYPE_BYTES = {'bf16': 2, 'f16': 2, 'f32': 4, 'f64': 8, 'i1': 1, 'i8': 1, 'ui8': 1, 'i16': 2,
               'ui16': 2, 'i32': 4, 'ui32': 4, 'i64': 8, 'ui64': 8}
# Ops that cost nothing on their own: their consumers read the source.
FREE = {'constant', 'broadcast_in_dim', 'reshape', 'iota', 'get_tuple_element', 'tuple',
        'optimization_barrier', 'case', 'mesh'}
# Ops that run as their own kernel (everything else fuses).
KERNELS = {'dot_general', 'dot', 'convolution', 'custom_call', 'scatter', 'sort',
           'reduce_window', 'select_and_scatter', 'while', 'call', 'fft', 'rng_bit_generator',
           'dynamic_update_slice', 'all_reduce', 'all_gather', 'reduce_scatter', 'all_to_all',
           'collective_permute', 'cholesky', 'triangular_solve'}

# Ops that read only the part of their first operand that they return.
SLICES = {'slice', 'dynamic_slice'}

TENSOR = re.compile(r'tensor<([^>]*)>')
VALUE = re.compile(r'%[\w#.]+')
LOC_REF = re.compile(r'loc\((#loc\d*)\)\s*$')
NAMED_LOC = re.compile(r'^(#loc\d*) = loc\("((?:[^"\\]|\\.)*)"')
CALLSITE_LOC = re.compile(r'^(#loc\d*) = loc\(callsite\((#loc\d*) at')
FUNC = re.compile(r'^\s*func\.func (?:public|private) @([\w.$-]+)\((.*)$')
OP = re.compile(r'^\s*(%[^=]+?) = "?(?:stablehlo\.|func\.|chlo\.|mhlo\.|sdy\.)?([\w.]+)"?(.*)$')
CALL = re.compile(r'call @([\w.$-]+)')
CUSTOM = re.compile(r'\s*@([\w.$-]+)')


def tensor_bytes(t: str) -> int:
  """'2x100x32xbf16' -> bytes; 'f32' (a scalar) -> 4."""
  *dims, dtype = t.split('x')
  if any(not d.isdigit() for d in dims):
    return 0
  return math.prod(int(d) for d in dims) * DTYPE_BYTES.get(dtype, 4)


def tensor_dims(t: str) -> tuple[list[int], str]:
  *dims, dtype = t.split('x')
  return [int(d) for d in dims if d.isdigit()], dtype


def component_of(name: str) -> str:
  for c in COMPONENTS:
    if re.search(rf'(^|[/(]){c}([/)]|$)', name):
      return c
  return 'loss' if ('jvp(' in name or 'transpose(' in name) else 'optimizer'


def short_name(loc: str, kind: str) -> str:
  """A name stack without the jit prefix and indices, for the --top table."""
  name = re.sub(r'^jit\([^)]*\)/', '', loc) or kind
  return re.sub(r'\d+', '#', name)


class Op:
  __slots__ = ('kind', 'results', 'sizes', 'elems', 'operands', 'loc', 'sig', 'rest', 'callee',
               'aliases')

  def __init__(self, kind, results, operands, rest):
    self.kind, self.results, self.operands, self.rest = kind, results, operands, rest
    self.sizes, self.elems, self.loc, self.sig, self.callee, self.aliases = [], [], '', '', None, None


def split_results(text: str) -> list[str]:
  """'%5:2' -> ['%5#0', '%5#1']; '%a, %b' -> ['%a', '%b']."""
  out = []
  for part in (p.strip() for p in text.split(',')):
    if ':' in part:
      name, n = part.split(':')
      out += [f'{name}#{i}' for i in range(int(n))]
    else:
      out.append(part)
  return out


def finish(op: Op, tail: str) -> None:
  """Set an op's result sizes, signature and location from the text after its operands."""
  m = LOC_REF.search(tail)
  op.loc = m.group(1) if m else ''
  body = tail[:m.start()] if m else tail
  cut = body.rfind(' : ')
  op.sig = body[cut + 3:] if cut >= 0 else ''
  out = op.sig.split('->')[-1]
  types = TENSOR.findall(out)
  if len(types) < len(op.results):   # elementwise ops print one type for all
    types = (types[-1:] or ['f32']) * len(op.results)
  op.sizes = [tensor_bytes(t) for t in types[:len(op.results)]]
  op.elems = [math.prod(tensor_dims(t)[0]) for t in types[:len(op.results)]]


def parse_module(text: str):
  """{function name: (arg sizes {name: bytes}, [Op], [returned names])}; each op's `loc` is
  its name stack. Values defined inside regions (case branches, reduce bodies) are renamed
  per region: MLIR numbers them afresh in every region, so names repeat."""
  locs, callsites = {}, {}
  functions = {}
  current = None
  stack = []    # region ops open around the current line (their results come at the close)
  scopes = []   # {printed name: unique name} of the function, then of each open region
  regions = iter(range(1 << 62))

  def lookup(name):
    if '#' in name:   # result i of a multi-result op: '%5#1'
      base, index = name.split('#', 1)
      return f'{lookup(base)}#{index}'
    for scope in reversed(scopes):
      if name in scope:
        return scope[name]
    return name

  def define(name):
    unique = name if len(scopes) == 1 else f'{name}@{next(regions)}'
    scopes[-1][name] = unique
    return unique

  for line in text.splitlines():
    if line.startswith('#loc'):
      m = NAMED_LOC.match(line)
      if m:
        locs[m.group(1)] = m.group(2)
      else:
        m = CALLSITE_LOC.match(line)
        if m:
          callsites[m.group(1)] = m.group(2)
      continue
    m = FUNC.match(line)
    if m:
      args = {a: tensor_bytes(t) for a, t in re.findall(r'(%arg\d+): tensor<([^>]*)>',
                                                         m.group(2))}
      current = functions[m.group(1)] = (args, [], [])
      scopes, stack = [{a: a for a in args}], []
      continue
    if current is None:
      continue
    stripped = line.strip()
    if stripped.startswith('^'):   # a region's block arguments
      for name in re.findall(r'(%[\w#.]+):', stripped):
        define(name)
      continue
    if stripped.startswith('})') or stripped.startswith('}, {'):
      if stripped.startswith('})') and stack:
        finish(stack.pop(), stripped)
        scopes.pop()
      elif stack:
        scopes[-1] = {}
        if stack[-1].kind == 'case':
          stack[-1].aliases = []   # a new branch: the last branch's returns are the results
      continue
    if stripped.startswith('stablehlo.return') or stripped.startswith('return') \
        or stripped.startswith('func.return'):
      names = [lookup(v) for v in VALUE.findall(stripped.split(' : ')[0])]
      if stack:
        if stack[-1].kind == 'case':
          stack[-1].aliases = names
      elif not stripped.startswith('stablehlo.return'):
        current[2].extend(names)
      continue
    m = OP.match(line)
    if not m:
      continue
    results, kind, rest = split_results(m.group(1)), m.group(2), m.group(3)
    head = rest.split(' : ')[0] if not rest.rstrip().endswith('({') else rest
    op = Op(kind, [], [lookup(v) for v in VALUE.findall(head)], rest)
    bases = {r.split('#')[0]: None for r in results}
    for base in bases:
      bases[base] = define(base)
    op.results = [bases[r.split('#')[0]] + (r[len(r.split('#')[0]):]) for r in results]
    c = CALL.search(line)
    if kind == 'call' and c:
      op.callee = c.group(1)
    current[1].append(op)
    if rest.rstrip().endswith('({') or rest.rstrip().endswith('{'):
      op.aliases = [] if kind == 'case' else None
      stack.append(op)
      scopes.append({})
    else:
      finish(op, rest)

  def resolve(loc, depth=0):
    if loc in locs or depth > 50:
      return locs.get(loc, '')
    return resolve(callsites[loc], depth + 1) if loc in callsites else ''

  names = {}
  for fn in functions.values():
    for op in fn[1]:
      op.loc = names.setdefault(op.loc, resolve(op.loc))
  return functions


def flops_of(op: Op) -> float:
  ins = TENSOR.findall(op.sig.split('->')[0])
  outs = TENSOR.findall(op.sig.split('->')[-1])
  if not ins or not outs:
    return 0.0
  out_dims, _ = tensor_dims(outs[0])
  if op.kind in ('dot_general', 'dot'):
    lhs, _ = tensor_dims(ins[0])
    m = re.search(r'contracting_dims = \[([\d, ]*)\]', op.rest)
    contract = [int(d) for d in m.group(1).split(',') if d.strip()] if m else [len(lhs) - 1]
    return 2.0 * math.prod(out_dims) * math.prod(lhs[d] for d in contract)
  if op.kind == 'convolution' and len(ins) > 1:
    kernel, _ = tensor_dims(ins[1])
    m = re.search(r'x\[([\w, ]*)\]->', op.rest)
    spec = [s.strip() for s in m.group(1).split(',')] if m else []
    o = kernel[spec.index('o')] if 'o' in spec else kernel[-1]
    return 2.0 * math.prod(out_dims) * math.prod(kernel) / max(o, 1)
  return 0.0


FUSIONS = ('chain', 'dag')


class Traffic:
  """Modelled bytes moved per component, accumulated over functions and their calls, under a
  fusion rule of FUSIONS (module docstring)."""

  def __init__(self, functions, fusion: str = 'chain'):
    if fusion not in FUSIONS:
      raise ValueError(f'fusion {fusion!r}: expected one of {FUSIONS}')
    self.functions, self.fusion = functions, fusion
    self.memo = {}
    self.by_name = collections.Counter()   # bytes by op name (the name stack's tail)
    self.kernel_memo = {}

  def of(self, fname: str) -> collections.Counter:
    if fname in self.memo:
      return self.memo[fname]
    args, ops, returned = self.functions[fname]
    self.memo[fname] = self.kernel_memo[fname] = collections.Counter()   # recursion guard
    producer, size = {}, dict(args)
    for op in ops:
      for i, r in enumerate(op.results):
        producer[r] = op
        size[r] = op.sizes[i] if i < len(op.sizes) else 0

    memo = {}

    def real(v):
      """The non-free values `v` stands for (free ops forward their sources)."""
      if v in memo:
        return memo[v]
      memo[v] = ()
      op = producer.get(v)
      if op is None or op.kind not in FREE:
        out = (v,)
      elif op.kind in ('constant', 'iota', 'mesh'):
        out = ()
      elif op.kind in ('optimization_barrier', 'tuple'):
        idx = op.results.index(v) if v in op.results else 0
        out = real(op.operands[idx]) if idx < len(op.operands) else ()
      elif op.kind == 'case':
        idx = op.results.index(v) if v in op.results else 0
        out = real(op.aliases[idx]) if op.aliases and idx < len(op.aliases) else ()
      else:
        out = tuple(x for o in op.operands[:1] for x in real(o))
      memo[v] = out
      return out

    is_kernel = lambda op: op.kind in KERNELS   # noqa: E731
    consumers = collections.defaultdict(list)
    for op in ops:
      if op.kind in FREE:
        continue
      for o in op.operands:
        for r in real(o):
          if op not in consumers[r]:
            consumers[r].append(op)
    out_values = {r for v in returned for r in real(v)}

    parent = {id(op): id(op) for op in ops}

    def find(x):
      while parent[x] != x:
        parent[x] = parent[parent[x]]
        x = parent[x]
      return x

    def epilogue(op, user):
      """An elementwise op on a reduce's result, fused into the reduction (same shape)."""
      return op.kind == 'reduce' and user.elems[:1] == op.elems[:1] and user.kind != 'reduce'

    boundary = set(args) | out_values
    if self.fusion == 'chain':
      for v, users in consumers.items():
        op = producer.get(v)
        if (op is None or is_kernel(op) or len(users) != 1 or is_kernel(users[0])
            or v in out_values or (op.kind == 'reduce' and not epilogue(op, users[0]))):
          boundary.add(v)
        else:
          parent[find(id(op))] = find(id(users[0]))
    else:
      # Consumers before producers, so that each value's users already sit in their final
      # kernels: the value joins them when they are all one kernel.
      for op in reversed(ops):
        if op.kind in FREE:
          continue
        for v in op.results:
          users = consumers.get(v)
          if not users:
            continue
          if (is_kernel(op) or any(is_kernel(u) for u in users) or v in out_values
              or (op.kind == 'reduce' and not all(epilogue(op, u) for u in users))
              or len({find(id(u)) for u in users}) != 1):
            boundary.add(v)
          else:
            parent[find(id(op))] = find(id(users[0]))

    total, kernels = collections.Counter(), collections.Counter()
    counted = set()   # kernels already counted
    charged = collections.Counter()   # bytes of each (kernel, value) read so far
    for op in ops:
      if op.kind in FREE:
        continue
      comp = component_of(op.loc)
      before = total[comp]
      kernel = id(op) if is_kernel(op) else find(id(op))
      for i, o in enumerate(op.operands):
        for r in real(o):
          if r in boundary:
            # A kernel reads a value once; through a slice, only the part it keeps.
            whole = size.get(r, 0)
            part = op.sizes[0] if op.kind in SLICES and i == 0 and op.sizes else whole
            bytes_read = min(part, whole - charged[kernel, r])
            charged[kernel, r] += bytes_read
            total[comp] += bytes_read
      if op.kind == 'call' and op.callee in self.functions:
        total[comp] += sum(self.of(op.callee).values())   # its kernels, charged to this call
        kernels[comp] += sum(self.kernel_memo[op.callee].values())
        continue
      if kernel not in counted:
        counted.add(kernel)
        kernels[comp] += 1
      for r in op.results:
        if r in boundary and (r in consumers or r in out_values):
          total[comp] += size.get(r, 0)
      if fname == 'main':
        self.by_name[short_name(op.loc, op.kind)] += total[comp] - before
    self.memo[fname], self.kernel_memo[fname] = total, kernels
    return total


def census(functions) -> dict:
  """FLOPs, matmuls by dtype, custom calls and op counts over the whole module (each
  function counted once per call)."""
  calls = collections.Counter({'main': 1})
  order = ['main']
  seen = {'main'}
  while order:   # call counts, callers before callees
    f = order.pop(0)
    for op in functions[f][1]:
      if op.kind == 'call' and op.callee in functions:
        calls[op.callee] += calls[f]
        if op.callee not in seen:
          seen.add(op.callee)
          order.append(op.callee)
  flops = collections.Counter()
  matmuls = collections.defaultdict(lambda: {'count': 0, 'gflop': 0.0})
  custom, kinds = collections.Counter(), collections.Counter()
  vector_matmuls = 0
  for f, n in calls.items():
    for op in functions[f][1]:
      kinds[op.kind] += n
      if op.kind in ('dot_general', 'dot', 'convolution'):
        fl = flops_of(op) * n
        flops[component_of(op.loc)] += fl
        ins = TENSOR.findall(op.sig.split('->')[0])
        outs = TENSOR.findall(op.sig.split('->')[-1])
        key = (f"{op.kind}: {' x '.join(tensor_dims(t)[1] for t in ins[:2])} -> "
               f"{tensor_dims(outs[0])[1] if outs else '?'}")
        matmuls[key]['count'] += n
        matmuls[key]['gflop'] += fl / 1e9
        if op.kind != 'convolution' and any(len(tensor_dims(t)[0]) == 1 for t in ins[:2]):
          vector_matmuls += n
      elif op.kind == 'custom_call':
        m = CUSTOM.match(op.rest)
        custom[m.group(1) if m else '?'] += n
  return {'flops': flops, 'matmuls': matmuls, 'custom_calls': custom, 'op_counts': kinds,
          'vector_matmuls': vector_matmuls}


def analyse(text: str, batch_size: int, top: int = 0, fusion: str = 'chain') -> dict:
  """The JSON record of a lowering of a train step on `batch_size` samples; `top`: also the
  op names that move the most bytes; `fusion`: the traffic model's rule (FUSIONS)."""
  functions = parse_module(text)
  model = Traffic(functions, fusion)
  traffic = model.of('main')
  c = census(functions)
  total = sum(traffic.values())
  per_sample = {k: round(traffic.get(k, 0) / batch_size / 1e6, 2)
                for k in (*COMPONENTS, 'loss', 'optimizer')}
  return {
      'gflop_per_sample': round(sum(c['flops'].values()) / batch_size / 1e9, 2),
      'gflop_per_sample_by_component': {k: round(v / batch_size / 1e9, 3)
                                        for k, v in sorted(c['flops'].items())},
      'fusion': fusion,
      'traffic_mb_per_sample': round(total / batch_size / 1e6, 2),
      'traffic_mb_per_sample_by_component': per_sample,
      'optimizer_mb_per_step': round(traffic.get('optimizer', 0) / 1e6, 2),
      'kernels_per_step': sum(model.kernel_memo['main'].values()),
      'kernels_per_step_by_component': {k: model.kernel_memo['main'].get(k, 0)
                                        for k in (*COMPONENTS, 'loss', 'optimizer')},
      'matmuls_by_dtype': {k: {'count': v['count'], 'gflop': round(v['gflop'], 2)}
                           for k, v in sorted(c['matmuls'].items())},
      'vector_matmuls': c['vector_matmuls'],
      'custom_calls': dict(sorted(c['custom_calls'].items())),
      'op_counts': dict(c['op_counts'].most_common(25)),
      'functions': len(functions),
      **({'top_mb_per_sample': {k: round(v / batch_size / 1e6, 2)
                                for k, v in model.by_name.most_common(top)}} if top else {})}


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--batch', type=int, default=128)
  parser.add_argument('--backbone', default='swinv2_t')
  parser.add_argument('--dtype', default='bfloat16', choices=('float32', 'bfloat16'))
  parser.add_argument('--attention', default='auto')
  parser.add_argument('--platform', default='cuda')
  parser.add_argument('--tiny', action='store_true', help='the CPU test size (seconds)')
  parser.add_argument('--hlo', help='analyse this saved lowering instead of lowering')
  parser.add_argument('--save', help='also write the lowering to this file')
  parser.add_argument('--top', type=int, default=0, help='list the N op names moving most bytes')
  parser.add_argument('--fusion', default='chain', choices=FUSIONS,
                      help="the traffic model's fusion rule (see the docstring)")
  args = parser.parse_args(argv)

  record = {'benchmark': 'hlo_traffic', 'batch': args.batch, 'dtype': args.dtype,
            'platform': args.platform, 'tiny': args.tiny}
  t0 = time.perf_counter()
  if args.hlo:
    with open(args.hlo) as f:
      text = f.read()
    record['hlo'] = args.hlo
  else:
    from capenext_jax.models import backbones
    from capenext_jax.models.capenext import CapeNextConfig
    from lowering import lower_train_step
    preset = backbones.test_size_of(args.backbone) if args.tiny else args.backbone
    config = CapeNextConfig.variant(preset, image_size=64 if args.tiny else None,
                                    dtype=args.dtype, attention=args.attention)
    text = lower_train_step(config, args.batch, platform=args.platform)
    record.update(preset=preset, image_size=config.image_size, attention=args.attention)
    if args.save:
      tmp = args.save + '.tmp'
      with open(tmp, 'w') as f:
        f.write(text)
      os.replace(tmp, args.save)
  record['lower_s'] = round(time.perf_counter() - t0, 2)
  record.update(analyse(text, args.batch, args.top, args.fusion))
  print(json.dumps(record), flush=True)
  return record


if __name__ == '__main__':
  main()

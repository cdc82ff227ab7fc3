"""One table from the JSON lines benchmarks/accelerator.sh collected (train_step.py and
eval_throughput.py --mode forward records): every expected (dtype, remat, batch) row, with
'OOM' or 'not run' where there is no measurement.

usage: python benchmarks/summarize.py --train_batches 32,128,512 --eval_batches 128,512 DIR
"""
import argparse
import glob
import json
import os


def read(directory: str) -> list[dict]:
  records = []
  for path in sorted(glob.glob(os.path.join(directory, '*.jsonl'))):
    with open(path) as f:
      records += [json.loads(line) for line in f if line.startswith('{')]
  return records


def cell(value, fmt: str) -> str:
  return '-' if value is None else format(value, fmt)


def gib(record: dict):
  peak = record.get('device_peak_bytes') or record.get('temp_bytes')
  return None if peak is None else peak / 2**30


def row(kind, dtype, remat, batch, record) -> str:
  if record is None:
    status = 'not run'
  elif record['status'] != 'ok':
    status = record['status']
  else:
    rate = record.get('samples_per_s', record.get('pairs_per_s'))
    seconds = record.get('step_s', record.get('batch_s'))
    return (f'| {kind} | {dtype} | {remat} | {batch} | {rate:.1f} | {1e3 * seconds:.1f} | '
            f'{cell(record.get("mfu"), ".1%")} | {cell(gib(record), ".2f")} |')
  return f'| {kind} | {dtype} | {remat} | {batch} | {status} | | | |'


def main():
  p = argparse.ArgumentParser()
  p.add_argument('directory')
  p.add_argument('--train_batches', default='32,128,512')
  p.add_argument('--eval_batches', default='128,512')
  args = p.parse_args()
  records = read(args.directory)
  train = {(r['dtype'], r['remat'], r['batch']): r for r in records
           if r['benchmark'] == 'train_step'}
  evals = {(r['dtype'], r['batch']): r for r in records if r['benchmark'] == 'eval_forward'}
  first = next(iter(records), {})
  print(f'\ndevice: {first.get("device", "?")}  jax {first.get("jax", "?")}  model: '
        f'{first.get("preset", first.get("model", "?"))} {first.get("image_size", "")} px; '
        f"peak memory: the device allocator's peak (GPU/TPU) or XLA's temp bytes (CPU)")
  print('| step | dtype | remat | batch | samples/s (pairs/s) | ms per step | MFU | peak GiB |')
  print('|---|---|---|---|---|---|---|---|')
  for dtype in ('float32', 'bfloat16'):
    for remat in ('none', 'blocks'):
      for batch in map(int, args.train_batches.split(',')):
        print(row('train', dtype, remat, batch, train.get((dtype, remat, batch))))
  for dtype in ('float32', 'bfloat16'):
    for batch in map(int, args.eval_batches.split(',')):
      print(row('eval', dtype, '-', batch, evals.get((dtype, batch))))


if __name__ == '__main__':
  main()

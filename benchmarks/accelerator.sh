#!/usr/bin/env bash
# The accelerator suite in one go (GPU host: under 8 minutes), one table at the end:
# training steps for float32 ('highest', the parity baseline) and bfloat16 ('default'), batch
# 32 / 128 / 512, remat none / blocks (a batch that does not fit prints OOM), and the eval
# forward's pairs/s in both dtypes. Full-size headline model, random weights and inputs.
#
#   bash benchmarks/accelerator.sh            # on the GPU / TPU host
#   JAX_PLATFORMS=cpu bash benchmarks/accelerator.sh --tiny    # the CPU test size: a script check
#   TRAIN_BATCHES=128,512 STEPS=5 BUDGET_S=300 bash benchmarks/accelerator.sh   # a shorter lease
#
# Needs only Python 3 with jax, flax, optax, numpy (no TensorFlow, no install of this package:
# the repo root goes on PYTHONPATH). Runs longest-awaited first (bf16 training, eval, the fp32
# baseline, then remat) and stops starting new runs when BUDGET_S (default 450 s) is spent, so
# the table always comes out; what did not run says so.
set -u
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-python3}
BUDGET_S=${BUDGET_S:-450}
if [[ ${1:-} == --tiny ]]; then
  TINY=--tiny; TRAIN_BATCHES=2,4,8; EVAL_BATCHES=8,32; EVAL_MODEL=tiny; STEPS=2; REPEATS=3
else
  TINY=; TRAIN_BATCHES=${TRAIN_BATCHES:-32,128,512}; EVAL_BATCHES=${EVAL_BATCHES:-128,512}
  EVAL_MODEL=full; STEPS=${STEPS:-10}; REPEATS=${REPEATS:-10}
fi
OUT=$(mktemp -d)
START=$SECONDS

run() {   # run <name> <command...>: under the remaining budget, JSON lines into $OUT/<name>
  local left=$((BUDGET_S - (SECONDS - START)))
  if ((left < 20)); then
    echo "skipped $1: time budget spent" >&2
    return
  fi
  echo "running $1 (budget left ${left}s)" >&2
  timeout "$left" "${@:2}" > "$OUT/$1.jsonl" || echo "$1: exit $? (see above)" >&2
}

run train_bfloat16_none $PY benchmarks/train_step.py $TINY --dtype bfloat16 --remat none \
  --batch $TRAIN_BATCHES --steps $STEPS
run eval $PY benchmarks/eval_throughput.py --mode forward --model $EVAL_MODEL \
  --dtype bfloat16,float32 --batch $EVAL_BATCHES --repeats $REPEATS
run train_float32_none $PY benchmarks/train_step.py $TINY --dtype float32 --remat none \
  --batch $TRAIN_BATCHES --steps $STEPS
run train_bfloat16_blocks $PY benchmarks/train_step.py $TINY --dtype bfloat16 --remat blocks \
  --batch $TRAIN_BATCHES --steps $STEPS
run train_float32_blocks $PY benchmarks/train_step.py $TINY --dtype float32 --remat blocks \
  --batch $TRAIN_BATCHES --steps $STEPS
$PY benchmarks/summarize.py --train_batches $TRAIN_BATCHES --eval_batches $EVAL_BATCHES "$OUT"
echo "total $((SECONDS - START)) s; JSON lines in $OUT"

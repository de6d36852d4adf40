#!/usr/bin/env bash
# One GPU session's measurements, in priority order, each step bounded in time.
#
#   bash bench/device_run.sh train    # self-distilled heads -> runs/heads and runs/demo-heads (skipped when present)
#   bash bench/device_run.sh suite    # every engine side by side + Llama-3-8B-shape step latencies
#   bash bench/device_run.sh checks   # auto tree vs presets, fp8 vs bf16, eval speed + MMLU
#   bash bench/device_run.sh serve    # batched serving: bench serve sweep (plain/Medusa x serial/batched);
#                                     # needs tritonserver: carry the nvidia-pytriton wheel (bench/README.md)
#   bash bench/device_run.sh unpack   # before serve, carrying .whlnp: the server wheels into /tmp/site
#   bash bench/device_run.sh probe    # bit identity (tokens + KV), GPU tests, batch invariance of 256
#                                     # requests, kernel profiles (no heads needed;
#                                     # FULL_PROBE=1 adds fp8 + GEMM rows, SWEEP=1 attention tiles)
# A phase after `train` needs the heads it left in runs/ (the device machine keeps ignored paths
# while it stays warm).
#
# Inputs travel as the git-ignored .device/shared/ (model + prompts: copy ../shared there and name
# `.device` in the device tool's `carry`). Results go to $RESULTS (default runs/results) and, when
# $OUT is set, are packed into $OUT/results-<phase>.tar.gz (the device tool returns at most 8 files).
# Order: train, checks (its auto tree joins the suite), suite.
#
# Budget (30 device-minutes a session, H200, measured): a cold start costs 1-2 min of device time
# beyond the wall time, and a start the pool refuses still costs ~2 min; probe ~2 min (FULL_PROBE
# +20 s, SWEEP +20 s); train ~8 min (both runs at once, 160000 prompts each: data 109 s, training
# capped at 3.5 min, 462 s for the step); checks ~5 min (SKIP_DONE=1: 2.6 min); suite ~3-4 min. Heads
# live only while the machine stays warm, which it does only while calls follow each other at once:
# run train, checks, suite back to back before anything optional (a probe goes first or last, never
# in between). Name the commit (MEDUSA_FORGE_COMMIT=<sha>): the device's copy of the tree may carry
# a stale .git.
set -uo pipefail
cd "$(dirname "$0")/.."

PHASE=${1:-bench}
SHARED=${MEDUSA_FORGE_SHARED:-$PWD/.device/shared}
export MEDUSA_FORGE_SHARED=$SHARED PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
MODEL=$SHARED/models/pycoder-26m
PROMPTS=$SHARED/data/code_prompts.jsonl
RUNS=runs
HEADS=$RUNS/heads
DEMO_HEADS=$RUNS/demo-heads
RESULTS=${RESULTS:-$RUNS/results}
MF="python3 -m medusa_forge.cli"
# SMOKE=1: the same steps at toy sizes, to check this script on a CPU before spending GPU time.
if [ -n "${SMOKE:-}" ]; then
  N_PROMPTS=64 BATCH=8 MINUTES=0.5 EPOCHS=1 ACCEPT=2 PER_TOPIC=1 PEERS=1 DEVICE=cpu SUITE_ARGS="--per-topic 1 --max-new-tokens 16"
  SEARCH_ARGS="--calib-limit 2 --calib-new-tokens 16 --search-sizes 2,4 --max-tree-nodes 8 --timing-prompts 1"
  mkdir -p "$RUNS"; head -n 3 "$PROMPTS" > "$RUNS/smoke_prompts.jsonl"; PROMPTS=$RUNS/smoke_prompts.jsonl
else
  N_PROMPTS=${N_PROMPTS:-160000} BATCH=2048 MINUTES=${MINUTES:-3.5} EPOCHS=${EPOCHS:-4} ACCEPT=158 PER_TOPIC=8 PEERS=5 DEVICE=cuda SUITE_ARGS="--max-new-tokens 128"
  SEARCH_ARGS="--calib-limit 79 --calib-new-tokens 128 --search-sizes 8,16,32,48,63 --search-depths 3,4,5"
fi
mkdir -p "$RESULTS"

pack() {
  if [ -n "${OUT:-}" ]; then
    tar -czf "$OUT/results-$PHASE.tar.gz" -C "$RESULTS" .
  fi
}
trap pack EXIT

step() {  # step NAME SECONDS CMD...: run one bounded step, log it, never stop the session
  local name=$1 limit=$2
  shift 2
  echo "=== $name (limit ${limit}s) $(date -u +%T)"
  local t0=$SECONDS
  timeout --signal=INT --kill-after=20 "$limit" "$@" > "$RESULTS/$name.log" 2>&1
  local rc=$?
  echo "=== $name rc=$rc in $((SECONDS - t0))s"
  tail -n 25 "$RESULTS/$name.log"
  return 0
}

if [ "$PHASE" = unpack ]; then
  # the serve phase's server wheels, carried apart from the model (.whlnp, then .device: the two
  # exceed one call's 64 MiB); numpy 1.26 goes apart for the Python backend stub alone
  python3 -c "import tarfile; tarfile.open('.whlnp/site.tar.xz').extractall('/tmp')"
  mkdir -p /tmp/stub-numpy && mv /tmp/site/numpy /tmp/site/numpy-*.dist-info /tmp/site/numpy.libs /tmp/stub-numpy/
  ls /tmp/site /tmp/stub-numpy
  exit 0
fi

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c 'import torch, triton, transformers; print("torch", torch.__version__, "triton", triton.__version__, "transformers", transformers.__version__)'
# the device's copy of the tree may carry a stale .git: pass MEDUSA_FORGE_COMMIT=<sha>, else "-dirty" shows it
python3 -c 'from medusa_forge.bench.cli import source_commit; print(source_commit())' > "$RESULTS/commit.txt"

if [ "$PHASE" = train ]; then
  # Two runs share the GPU (a 26M base leaves most of it idle): the Medusa-1 recipe below, and the
  # shared-lm_head heads the package ships for the demo (small enough for git and for `carry`).
  if [ -f "$HEADS/medusa_lm_head.safetensors" ]; then
    echo "heads already in $HEADS"
  else
    # Medusa-1 recipe (5 heads x 1 ResBlock, heads coefficient 0.2, decay 0.8) on self-distilled
    # greedy continuations of Python sources; held-out code_prompts are excluded and evaluated.
    # --max-seq-len 640: prompts of 32..512 tokens, as long as the held-out ones (up to 653; at
    # 384 the heads never saw a position past 384, and the longest-prompt topic accepted least).
    # 160000 prompts x 4 epochs, not 96000 x 6: the training loss fell at each epoch boundary of
    # the 6-epoch run (the heads were learning the repeated examples), so fresh data for the steps.
    step train_heads 540 $MF train-heads --model "$MODEL" --out "$HEADS" --self-distill \
      --prompts-from-python-sources $N_PROMPTS --distill-new-tokens 128 --distill-batch-size $BATCH \
      --exclude-sources "$PROMPTS" --eval-prompts "$PROMPTS" --eval-acceptance $ACCEPT \
      --num-heads 5 --num-layers 1 --max-seq-len 640 --batch-size 64 --epochs $EPOCHS --lr 1e-3 \
      --max-train-minutes $MINUTES --device $DEVICE --no-progress --overwrite &
  fi
  if [ ! -f "$DEMO_HEADS/medusa_lm_head.safetensors" ]; then
    # The demo's heads: 4 heads read out through the base's lm_head (2 MB in bf16), judged on the
    # demo's own tree.
    step train_demo_heads 540 $MF train-heads --model "$MODEL" --out "$DEMO_HEADS" --self-distill \
      --prompts-from-python-sources $N_PROMPTS --distill-new-tokens 128 --distill-batch-size $BATCH \
      --exclude-sources "$PROMPTS" --eval-prompts "$PROMPTS" --eval-acceptance $ACCEPT \
      --eval-tree medusa_forge/data/heads/pycoder-26m/tree.json --num-heads 4 --num-layers 1 --shared-lm-head \
      --max-seq-len 640 --batch-size 64 --epochs $EPOCHS --lr 1e-3 --max-train-minutes $MINUTES \
      --device $DEVICE --no-progress --overwrite --seed 1 &
  fi
  wait
  cp "$HEADS"/train_report.* "$HEADS"/*.png "$HEADS"/config.json "$RESULTS"/ 2>/dev/null
  mkdir -p "$RESULTS/demo-heads" && cp "$DEMO_HEADS"/* "$RESULTS/demo-heads/" 2>/dev/null
  exit 0
fi

if [ "$PHASE" = probe ]; then
  # no heads needed: bit identity (tokens + KV) with oracle heads, per-kernel step profiles, GEMM table
  step identity_probe 150 $MF bench probe --model "$MODEL" --prompts "$PROMPTS" --medusa-choices mc_sim_7b_63 \
    $([ -n "${SMOKE:-}" ] && echo "--per-topic 1 --max-new-tokens 16") \
    --out "$RESULTS/identity_probe.json"
  [ -n "${SMOKE:-}" ] && exit 0
  step gpu_kernel_tests 150 python3 -m pytest -q tests/test_kernels_*.py -p no:cacheprovider
  step gpu_engine_tests 150 python3 -m pytest -q -m gpu tests/test_engine_exact.py tests/test_build_native.py \
    tests/test_train_heads.py -p no:cacheprovider
  # every greedy output of 256 randomly arriving requests against its batch-1 output, bf16 on the GPU
  step batch_identity 240 env MEDUSA_FORGE_IDENTITY_REQUESTS=256 MEDUSA_FORGE_IDENTITY_DEVICE=cuda \
    python3 -m pytest -q tests/test_batcher_identity.py -p no:cacheprovider
  step profile_26m 60 $MF bench profile --model "$MODEL" --context 256 --out "$RESULTS/profile_26m.json"
  step profile_8b 90 $MF bench profile --context 1024 --out "$RESULTS/profile_8b.json"
  # SWEEP=1: attention tile choices at both model shapes (the data of kernels.ATTENTION_BY_SHAPE)
  [ -n "${SWEEP:-}" ] && step attention_sweep 150 python3 -m medusa_forge.bench.kernels_check --sweep \
    --json "$RESULTS/kernels_check.json"
  if [ -n "${FULL_PROBE:-}" ]; then
    step profile_8b_fp8 90 $MF bench profile --context 1024 --fp8 --out "$RESULTS/profile_8b_fp8.json"
    step gemm_check 60 python3 -m medusa_forge.bench.gemm_check --rows 64 --json "$RESULTS/gemm_check.json"
  fi
  exit 0
fi

# the Medusa-1 heads while the machine that trained them is warm, else the demo's (they travel in
# `carry`), else the shared-lm_head heads the package ships (a fresh machine has no runs/)
SHIPPED_HEADS=medusa_forge/data/heads/pycoder-26m
for h in "$HEADS" "$DEMO_HEADS" "$SHIPPED_HEADS"; do
  [ -f "$h/medusa_lm_head.safetensors" ] && { HEADS=$h; break; }
done
[ -f "$HEADS/medusa_lm_head.safetensors" ] || { echo "no heads in $HEADS: run the train phase first"; exit 2; }
# heads that carry their own tree (the shipped 4 heads) are judged on it; mc_sim_7b_63 needs 5 heads
SERVE_TREE=mc_sim_7b_63
[ -f "$HEADS/tree.json" ] && SERVE_TREE=$HEADS/tree.json
echo "heads: $HEADS tree: $SERVE_TREE" | tee "$RESULTS/heads.txt"
if [ "$PHASE" = serve ]; then
  # Issue 24: aggregate tok/s, p50/p99 latency and TTFT per client count, plain and Medusa, batched
  # against serial, one run
  CLIENTS=1,4,16,32,64 SWEEP_TOKENS=128
  [ -n "${SMOKE:-}" ] && CLIENTS=1,2 SWEEP_TOKENS=8
  # tritonserver's Python stubs run isolated from PYTHONPATH: a .pth puts this tree and the carried
  # wheels (PYTHONPATH=/tmp/site) ahead of the image's site-packages. The pytriton 0.7 stub needs
  # numpy<2 (under the image's 2.x it misreads BYTES tensors) while the image's transformers needs
  # its numpy 2 in the server's own process: numpy 1.26 sits apart in $STUB_NUMPY (`unpack` moves it
  # there), first on the stub's path alone, where the image's numpy-2-built scipy/sklearn are
  # hidden (transformers imports them when present; under numpy 1 they fail to import). The guard
  # in serve/triton_install.py reads numpy's metadata in the server's process, so a copy of the
  # stub's numpy metadata tells it what the stub will load.
  STUB_NUMPY=${STUB_NUMPY:-/tmp/stub-numpy}
  if [ -z "${SMOKE:-}" ] && [ -d "$STUB_NUMPY" ]; then
    mkdir -p "$RUNS/stub-numpy-meta" && cp -r "$STUB_NUMPY"/numpy-*.dist-info "$RUNS/stub-numpy-meta/"
    export PYTHONPATH=$PWD/$RUNS/stub-numpy-meta:$PYTHONPATH STUB_NUMPY
  fi
  [ -z "${SMOKE:-}" ] && python3 - <<'PY'
import os, site
paths = [p for p in os.environ["PYTHONPATH"].split(":") if p]
stub = [os.environ["STUB_NUMPY"]] if os.environ.get("STUB_NUMPY") else []
line = f"import os, sys; sys.path[:0] = {paths!r}"
if stub:
    line += (f"; _s = 'backend_stub' in os.path.realpath('/proc/self/exe'); sys.path[:0] = {stub!r} * _s"
             "; _s and sys.modules.update(scipy=None, sklearn=None)")
with open(os.path.join(site.getsitepackages()[0], "medusa_forge_dev.pth"), "w") as f:
    f.write(line + "\n")
PY
  [ -z "${SMOKE:-}" ] && python3 -c 'import numpy; print("numpy", numpy.__version__, numpy.__file__)' \
    | tee "$RESULTS/numpy.txt"
  rm -rf "$RUNS/serve-work"
  step serve_sweep 540 $MF bench serve --engine "$MODEL" --medusa "$HEADS" --medusa-choices "$SERVE_TREE" \
    --dtype $([ $DEVICE = cuda ] && echo bf16 || echo fp32) --clients $CLIENTS --max-batch-size 64 \
    --max-tokens $SWEEP_TOKENS --requests ${SWEEP_REQUESTS:-2} --prompts "$PROMPTS" --workdir "$RUNS/serve-work" \
    --out "$RESULTS/serve_sweep.json"
  tail -n 200 "$RUNS/serve-work/tritonserver.log" > "$RESULTS/tritonserver_tail.log" 2>/dev/null
  exit 0
fi
E=$RUNS/engines
AUTO_TREE=$E/auto/native-engine-bf16/medusa_forge.json
if [ "$PHASE" = suite ]; then
  # every engine side by side (+ the Llama-3-8B-shape step latencies, bf16 and fp8); 5 prompts per
  # topic (30) for the slow peers, which also checks our greedy output against transformers'
  TREES=(--tree mc_sim_7b_63 --tree chain-5)
  [ -f "$AUTO_TREE" ] && TREES+=(--tree "$AUTO_TREE")
  step suite 560 $MF bench suite --model "$MODEL" --medusa "$HEADS" --prompts "$PROMPTS" "${TREES[@]}" \
    $SUITE_ARGS --peer-per-topic $PEERS --out "$RESULTS/suite"
  exit 0
fi
# 1. auto tree, searched on the even prompts, against the presets on the odd ones
# (calibration: all 79 even prompts x 128 tokens; sizes x depth limits 3..5, 3 finalists measured)
step tree_check 240 make tree-check MODEL="$MODEL" MEDUSA="$HEADS" PROMPTS="$PROMPTS" TREE=auto OUT="$E/auto" \
  RESULTS="$RESULTS" DTYPE=bf16 BUILD_ARGS="$SEARCH_ARGS"
# 2. fp8 engine against bf16: greedy agreement and step times (SKIP_DONE=1: steps 2 and the MMLU
# runs are kept from an earlier checks run in $RESULTS, e.g. when only the tree search is redone)
[ -z "${SKIP_DONE:-}" ] && step fp8_check 120 make fp8-check MODEL="$MODEL" MEDUSA="$HEADS" PROMPTS="$PROMPTS" OUT="$E/fp8" RESULTS="$RESULTS" \
  TREE=mc_sim_7b_63
# 3. eval: per-topic tokens/s base vs Medusa, output identity, MMLU answers (in process on the GPU)
# the tree the promoted engine would use: the auto tree just searched, else the reference preset
EVAL_TREE=mc_sim_7b_63
[ -f "$AUTO_TREE" ] && EVAL_TREE=$AUTO_TREE
step eval_speed 90 $MF eval speed --in-process --base-model "$MODEL" --medusa-model "$MODEL" --medusa "$HEADS" \
  --medusa-choices "$EVAL_TREE" --prompts "$PROMPTS" --per-topic $PER_TOPIC --max-tokens 128 --trials 2 --warmup 2 \
  --no-progress --out "$RESULTS/eval_speed.json"
for m in base medusa; do
  [ -n "${SKIP_DONE:-}" ] && continue
  step "eval_mmlu_$m" 40 $MF eval mmlu --in-process --model "$MODEL" --medusa "$HEADS" --medusa-choices mc_sim_7b_63 \
    $([ $m = base ] && echo --no-medusa) --data tests/fixtures/mmlu_csv --shots 5 --no-progress \
    --out "$RESULTS/mmlu_$m.json"
done
step eval_report 30 $MF eval report --mmlu "$RESULTS/mmlu_medusa.json" --baseline-mmlu "$RESULTS/mmlu_base.json" \
  --speed "$RESULTS/eval_speed.json" --out "$RESULTS/eval_report"

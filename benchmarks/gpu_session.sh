#!/usr/bin/env bash
# What the next GPU run is to check and time, as named stages, so that one device call runs
# several of them within its 10 minutes and everything returns even when a stage fails or is cut.
#
#   bash benchmarks/gpu_session.sh tests generate          # one call (~530 s of device time)
#   bash benchmarks/gpu_session.sh sweep topk               # another (~400 s)
#   bash benchmarks/gpu_session.sh alisa generate8          # another (~420 s)
#
# Each stage runs under its own `timeout` and writes <stage>.log (and its JSON) into $OUT (the
# device tool's return folder; benchmarks/results/gpu-session here otherwise). A stage that
# fails does not stop the next. Seconds in [] are each stage's limit. A machine without network
# access and without lark/hypothesis installs wheels downloaded beforehand into a git-ignored
# folder that travels with the tree, e.g. (here) `pip download -d .whl lark hypothesis` and (there)
# `pip install --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD`.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results/gpu-session}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1

stage() {  # stage NAME SECONDS COMMAND...
    local name=$1 limit=$2
    shift 2
    echo "=== $name [${limit}s] $(date -u +%H:%M:%S): $*" | tee -a "$OUT/session.log"
    local t0=$SECONDS
    timeout --signal=INT --kill-after=15 "$limit" "$@" >"$OUT/$name.log" 2>&1
    local rc=$?
    echo "=== $name rc=$rc in $((SECONDS - t0)) s" | tee -a "$OUT/session.log"
    tail -n 25 "$OUT/$name.log"
}

run_stage() {
    case $1 in
    tests)  # every GPU test of code merged since the last GPU run (kv write kernel, tuned splits, ALISA, selection)
        stage tests 250 python3 -m pytest -q -m gpu -p no:cacheprovider \
            tests/test_kv_write.py tests/test_decode.py tests/test_hf.py tests/test_alisa_gpu.py \
            tests/test_gpu_topk.py ;;
    generate)  # generate() batch 1 at 32K and 128K: compiled graph, tuned splits, decode variants x splits, prefill parts, HF in the same run
        stage generate 280 python3 benchmarks/bench_generate.py --points 32768x1 131072x1 --skip dynamic \
            --no-generate-probe --graph-compile --layer-contexts --split-sweep --budget-s 255 \
            --out "$OUT/generate.json" ;;
    generate8)  # batch 8 (128K x8 never ran)
        stage generate8 300 python3 benchmarks/bench_generate.py --points 32768x8 131072x8 --skip dynamic \
            --no-generate-probe --graph-compile --budget-s 280 --out "$OUT/generate8.json" ;;
    topk)  # prefill selection merges (extract = the GPU default, insert, bitonic) beside Flex given the same blocks
        stage topk 110 python3 benchmarks/bench_topk.py --seqs 32768 131072 --no-decode --budget-s 90 \
            --select-variants old insert bitonic bitonic_tf32x3 --out "$OUT/topk.json" ;;
    alisa)  # ALISA throughput at both points, HF offloaded rows first in a fresh process
        stage alisa 190 python3 benchmarks/bench_alisa.py --no-correctness --budget-s 170 --out "$OUT/alisa.json" ;;
    sweep)  # issue 14: forward and backward variants beside DKernel, decode variants beside SDPA
        stage sweep 240 python3 benchmarks/sweep_kernels.py --budget-s 220 --out "$OUT/sweep.json" ;;
    *)
        echo "unknown stage '$1' (tests generate generate8 topk alisa sweep)" | tee -a "$OUT/session.log"
        return 2 ;;
    esac
}

[ $# -gt 0 ] || { echo "usage: $0 STAGE... (tests generate generate8 topk alisa sweep)"; exit 2; }
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader 2>/dev/null | tee -a "$OUT/session.log"
for s in "$@"; do run_stage "$s"; done

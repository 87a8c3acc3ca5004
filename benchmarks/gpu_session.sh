#!/usr/bin/env bash
# What the next GPU run is to check and time, as named stages, so that one device call runs
# several of them within its 10 minutes and everything returns even when a stage fails or is cut.
# In priority order (a session's 30 device minutes hold about three such calls):
#
#   bash benchmarks/gpu_session.sh tests generate    # ~530 s: every new GPU test; generate() at batch 1
#   bash benchmarks/gpu_session.sh sweep topk        # ~530 s: issue 14 variants beside DKernel; top-k merges, tiles
#   bash benchmarks/gpu_session.sh alisa generate8   # ~500 s: ALISA with the auto split; generate() at batch 8
#   bash benchmarks/gpu_session.sh language          # ~200 s: round-2 constructs' forward tiles (if time is left)
#
# Each stage runs under its own `timeout` and writes <stage>.log (and its JSON) into $OUT (the
# device tool's return folder; benchmarks/results/gpu-session here otherwise). A stage that
# fails does not stop the next. Seconds in [] are each stage's limit. The device machine has no
# network and no lark: download the wheels here first (`pip download -d .whl lark hypothesis`,
# a git-ignored folder) and pass `carry: [".whl"]`; the script installs them when .whl exists
# and stops at once, before any stage, when `import lark, s2dsl` fails.
set -u
[ $# -gt 0 ] || { echo "usage: $0 STAGE... (tests generate generate8 sweep topk alisa language)"; exit 2; }
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results/gpu-session}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if [ -d .whl ] && ! python3 -c "import lark" 2>/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=${PYTHONPATH:-$PWD}
python3 -c "import lark, s2dsl" || { echo "lark or s2dsl does not import: carry .whl (see the top of this file)" \
    | tee -a "$OUT/session.log"; exit 3; }
# pytest-xdist, where installed, runs the GPU tests two files at a time
XDIST=$(python3 -c "import xdist" 2>/dev/null && echo "-n 2 --dist loadfile")

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
    tests)  # every GPU test of code merged since the last GPU run, the newest first (FP8 QK^T, the
            # backward variants, the auto split, the timers), then the prefill K/V write kernel, tuned
            # splits, the selection merges and the rest of the serving and ALISA GPU tests
        stage tests-new 90 python3 -m pytest -q -m gpu -p no:cacheprovider --durations=15 \
            tests/test_qk_fp8.py tests/test_timing.py "tests/test_gpu_backward.py::test_issue14_variants" \
            tests/test_alisa_gpu.py -k "fp8 or issue14 or auto_split or event_ms"
        stage tests 150 python3 -m pytest -q -m gpu -p no:cacheprovider --durations=25 $XDIST \
            tests/test_kv_write.py tests/test_decode.py tests/test_hf.py tests/test_gpu_topk.py \
            tests/test_alisa_gpu.py -k "not auto_split" ;;
    generate)  # generate() batch 1 at 32K and 128K: compiled graph, tuned splits, decode variants x
               # splits (bench_generate.SPLIT_SWEEP_VARIANTS), prefill parts, HF in the same run
        # (--layer-contexts with no values: the per-layer call section is skipped)
        stage generate 270 python3 benchmarks/bench_generate.py --points 32768x1 131072x1 --skip dynamic \
            --no-generate-probe --graph-compile --layer-contexts --split-sweep --budget-s 245 \
            --out "$OUT/generate.json" ;;
    generate8)  # batch 8 (128K x8 never ran)
        stage generate8 240 python3 benchmarks/bench_generate.py --points 32768x8 131072x8 --skip dynamic \
            --no-generate-probe --graph-compile --budget-s 220 --out "$OUT/generate8.json" ;;
    sweep)  # issue 14: forward default vs FP8 QK^T beside DKernel (six points, two rounds), the
            # backward variants (MHA with DKernel, and GQA); decode variants are the generate stage's
        stage sweep 380 python3 benchmarks/sweep_kernels.py \
            --fwd '{"default": {}, "fp8": {"qk_fp8": true}, "fp8_span1": {"qk_fp8": true, "window_span": 1, "residue_span": 1}}' \
            --decode '{}' --rounds 2 --bwd-kv-heads 8 --budget-s 350 --out "$OUT/sweep.json" ;;
    topk)  # prefill selection merges (extract = the GPU default, insert, bitonic) and the forward's tile
           # variants for top-k plans (bench_topk.KERNEL_VARIANTS: two programs per SM), beside Flex
           # given the same blocks
        stage topk 150 python3 benchmarks/bench_topk.py --seqs 32768 131072 --no-decode --budget-s 130 \
            --select-variants old insert bitonic bitonic_tf32x3 --out "$OUT/topk.json" ;;
    language)  # round-2 constructs' forward tiles: the default beside one block per step with descriptors
               # (bench_language.TILE_VARIANTS, kernels.EXTENDED_SHORT_TILES), Flex, DKernel, SDPA
        stage language 200 python3 benchmarks/bench_language.py --seqs 8192 32768 --no-backward \
            --out "$OUT/language.json" ;;
    alisa)  # ALISA throughput at both points (HF offloaded rows first, fresh process), the auto split's
            # rows at each point's budget and at 0.1 GiB
        stage alisa 250 python3 benchmarks/bench_alisa.py --no-correctness --gpu-budget-gib 0.1 --budget-s 230 \
            --out "$OUT/alisa.json" ;;
    *)
        echo "unknown stage '$1' (tests generate generate8 sweep topk alisa language)" | tee -a "$OUT/session.log"
        return 2 ;;
    esac
}

nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader 2>/dev/null | tee -a "$OUT/session.log"
for s in "$@"; do run_stage "$s"; done

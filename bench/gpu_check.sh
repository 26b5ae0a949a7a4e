#!/usr/bin/env bash
# The one-command GPU check: `bash bench/gpu_check.sh OUTDIR` on a bare GPU machine (torch, triton, transformers,
# pytest, pytest-benchmark installed; no package registry, no `datasets`).
#
# Stages, each under `timeout` (the whole run fits 8 minutes on an H100/H200), each logged to OUTDIR/<stage>.log
# with its exit status and wall time in OUTDIR/stages.tsv:
#   install   pip install -e . --no-deps --no-build-isolation
#   versions  nvidia-smi, python, torch, triton, transformers, CUDA -> versions.txt
#   tests     pytest tests/ (every triton and cuda test runs on the GPU) -> tests.log, junit.xml
#   bench     pytest bench/ --benchmark-only at the GPU shapes -> bench.json, then bench/render.py -> bench.md
#   bpo       20 BPO steps with --device cuda -> bpo/ (metrics.jsonl), bpo.log
# Then OUTDIR/summary.md (bench/gpu_report.py): GPU, versions, test counts, benchmark tables, BPO's last metrics,
# every stage's status and time. A failing stage does not stop the others; the exit status is non-zero if any stage
# failed or timed out, and summary.md is always written. Without a GPU it says so and exits 2 at once, installing
# nothing. PYTHON selects the interpreter (default: python, else python3).
set -uo pipefail

if [ $# -ne 1 ]; then
    echo "usage: bash bench/gpu_check.sh OUTDIR" >&2
    exit 64
fi
mkdir -p "$1" || exit 64
OUT="$(cd "$1" && pwd)"
cd "$(dirname "$0")/.." || exit 1
ROOT="$(pwd)"
PY="${PYTHON:-$(command -v python || command -v python3)}"
START=$(date +%s)

if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' >"$OUT/gpu_probe.log" 2>&1; then
    msg="gpu_check: no CUDA GPU visible to torch ($PY); nothing installed or run"
    echo "$msg" >&2
    printf '# GPU check\n\n**Not run**: %s.\n\nProbe output: see gpu_probe.log.\n' "${msg#gpu_check: }" \
        >"$OUT/summary.md"
    exit 2
fi

# Time limits, seconds. The whole run gets BUDGET (8 minutes less a margin for a stage's grace period after its signal
# and the summary). install, versions and render have fixed caps; tests get what is left after reserving T_BENCH,
# T_RENDER and T_BPO; bench gets what is left after reserving render and bpo; bpo the rest.
BUDGET=${BUDGET:-445}
T_INSTALL=${T_INSTALL:-60}
T_VERSIONS=${T_VERSIONS:-20}
T_BENCH=${T_BENCH:-110}
T_RENDER=${T_RENDER:-10}
T_BPO=${T_BPO:-70}
# left RESERVED: seconds of the budget still unspent, less RESERVED (at least 10)
left() {
    local l=$((BUDGET - ($(date +%s) - START) - $1))
    [ "$l" -lt 10 ] && l=10
    echo "$l"
}

# no network: never wait on the hub
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 PIP_NO_INDEX=1 PIP_DISABLE_PIP_VERSION_CHECK=1
export PYTHONUNBUFFERED=1
unset TRITON_INTERPRET R4B_FAST_BACKEND R4B_BENCH_QUICK

# a reused OUTDIR: no stale result may pass for this run's
rm -rf "$OUT/bpo" "$OUT/junit.xml" "$OUT/bench.json" "$OUT/bench.md" "$OUT/versions.txt"
printf 'stage\trc\tseconds\ttimed_out\tlimit_s\n' >"$OUT/stages.tsv"
FAILED=0

# stage NAME LIMIT SIGNAL CMD...: run CMD under `timeout` (SIGNAL first: INT lets pytest still write its junit/JSON
# reports; KILL 10 s later), log to OUTDIR/NAME.log, record the status.
stage() {
    local name=$1 limit=$2 sig=$3
    shift 3
    local t0 rc timed_out=0
    t0=$(date +%s.%N)
    echo "== $name (limit ${limit}s): $*" | tee -a "$OUT/gpu_check.log"
    if declare -F "$1" >/dev/null; then  # a shell function: timeout runs programs, so through bash
        set -- bash -c "$*"
    fi
    timeout --signal="$sig" --kill-after=10 "$limit" "$@" >"$OUT/$name.log" 2>&1
    rc=$?
    local secs
    secs=$(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')
    # stopped by the limit: timeout's 124 / 137, or pytest's own status after our SIGINT
    if [ "$rc" -ne 0 ] && awk -v s="$secs" -v l="$limit" 'BEGIN { exit !(s >= l - 0.5) }'; then
        timed_out=1
    fi
    printf '%s\t%s\t%s\t%s\t%s\n' "$name" "$rc" "$secs" "$timed_out" "$limit" >>"$OUT/stages.tsv"
    echo "   -> rc=$rc in ${secs}s$([ $timed_out = 1 ] && echo ' (TIMED OUT)')" | tee -a "$OUT/gpu_check.log"
    if [ "$rc" -ne 0 ]; then FAILED=1; fi
    return 0
}

stage install "$T_INSTALL" TERM "$PY" -m pip install -e . --no-deps --no-build-isolation

versions() {
    echo "## nvidia-smi"
    nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap --format=csv 2>&1 || true
    nvidia-smi 2>&1 || true
    echo "## python"
    "$PY" - <<'EOF'
import platform
import torch
import triton
print("python", platform.python_version())
print("torch", torch.__version__, "cuda", torch.version.cuda)
print("triton", triton.__version__)
try:
    import transformers
    print("transformers", transformers.__version__)
except ImportError as err:
    print("transformers missing:", err)
from importlib import metadata
for dist, mod in (("pytest", "pytest"), ("pytest-benchmark", "pytest_benchmark"), ("liger-kernel", "liger_kernel"),
                  ("flash-attn", "flash_attn"), ("xformers", "xformers")):
    try:
        version = metadata.version(dist)
    except metadata.PackageNotFoundError:
        print(mod, "not installed")
        continue
    try:
        __import__(mod)
        print(mod, version)
    except Exception as err:  # noqa: BLE001
        print(mod, version, "(import fails:", type(err).__name__ + ")")
print("gpu", torch.cuda.get_device_name(), "capability", torch.cuda.get_device_capability(),
      "count", torch.cuda.device_count())
EOF
}
export OUT PY
export -f versions
stage versions "$T_VERSIONS" TERM versions
cp "$OUT/versions.log" "$OUT/versions.txt" 2>/dev/null

stage tests "$(left $((T_BENCH + T_RENDER + T_BPO)))" INT \
    "$PY" -m pytest tests/ -q -rfEs --durations=15 --junitxml="$OUT/junit.xml" -p no:cacheprovider

stage bench "$(left $((T_RENDER + T_BPO)))" INT \
    "$PY" -m pytest bench/ --benchmark-only -q --benchmark-json="$OUT/bench.json" -p no:cacheprovider

render() {
    if [ ! -s "$OUT/bench.json" ]; then
        echo "no bench.json (the bench stage wrote none)"
        return 1
    fi
    "$PY" bench/render.py "$OUT/bench.json" >"$OUT/bench.md"
}
export -f render
stage render "$T_RENDER" TERM render

# The shipped tiny model and the embedded task (no datasets); small evaluation so that 20 steps fit.
stage bpo "$(left 0)" TERM "$PY" -m r4b_fast.training.bpo --device cuda --steps 20 --output-dir "$OUT/bpo" \
    --eval-items 16 --eval-every 20 --save-every 20 --log-every 5

END=$(date +%s)
echo "total $((END - START)) s" | tee -a "$OUT/gpu_check.log"
if ! "$PY" "$ROOT/bench/gpu_report.py" "$OUT" --total-seconds "$((END - START))" >"$OUT/report.log" 2>&1; then
    cat "$OUT/report.log" >&2
    printf '# GPU check\n\nThe report failed (report.log); stages: see stages.tsv.\n' >"$OUT/summary.md"
    FAILED=1
fi
echo "summary: $OUT/summary.md"
exit $FAILED

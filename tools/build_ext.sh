#!/usr/bin/env bash
# Builds the fused CUDA ops (fc_edge._C) in place from csrc/. setup.py picks the GPU code and
# says so in one line: sm_80 (every 8.x GPU), sm_87 (Jetson Orin), sm_90 (H100/H200) and PTX of
# 9.0 for newer GPUs; on a Jetson its own architecture alone (Xavier, sm_72, needs a CUDA <= 12
# nvcc: CUDA 13 dropped it); TORCH_CUDA_ARCH_LIST overrides. Needs a CUDA build of torch and nvcc.
#   tools/build_ext.sh                 # .venv/bin/python if present, else python3
#   PYTHON=python3 TORCH_CUDA_ARCH_LIST="9.0" tools/build_ext.sh
set -euo pipefail
cd "$(dirname "$0")/.."

PY="${PYTHON:-}"
if [[ -z "$PY" ]]; then
  if [[ -x .venv/bin/python ]]; then PY=.venv/bin/python; else PY=python3; fi
fi

if ! "$PY" -c 'import torch, sys; sys.exit(0 if torch.version.cuda else 1)' 2>/dev/null; then
  echo "build_ext: $PY has no CUDA build of torch (torch.version.cuda is None or torch is" \
       "missing). Install a CUDA torch wheel (on Jetson, NVIDIA's JetPack wheel) and retry." >&2
  exit 1
fi
if ! command -v nvcc >/dev/null 2>&1 && [[ ! -x "${CUDA_HOME:-/usr/local/cuda}/bin/nvcc" ]]; then
  echo "build_ext: nvcc not found on PATH or in \${CUDA_HOME:-/usr/local/cuda}/bin." \
       "Install the CUDA toolkit (or set CUDA_HOME) and retry." >&2
  exit 1
fi

export MAX_JOBS="${MAX_JOBS:-4}"
echo "build_ext: $("$PY" -c 'import torch; print("torch", torch.__version__, "CUDA", torch.version.cuda)')"

FC_EDGE_CUDA=1 "$PY" setup.py build_ext --inplace

"$PY" - <<'PY'
import torch

from fc_edge import ops

if not ops.extension_available():
    raise SystemExit("build_ext: fc_edge._C was built but does not import")
print("build_ext: fc_edge._C loaded; torch.ops.fc_edge:", torch.ops.fc_edge.spectral_compress)
PY

#!/usr/bin/env bash
# Builds the fused CUDA ops (fc_edge._C) in place from csrc/, for Jetson Orin (sm_87) and
# desktop / datacenter GPUs (sm_80, sm_89, sm_90); TORCH_CUDA_ARCH_LIST overrides the list
# (on a Jetson the default is 8.7 alone). Needs a CUDA build of torch and nvcc.
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

if [[ -z "${TORCH_CUDA_ARCH_LIST:-}" ]]; then
  if [[ "$(uname -m)" == "aarch64" && -e /etc/nv_tegra_release ]]; then
    export TORCH_CUDA_ARCH_LIST="8.7"          # Jetson Orin
  else
    export TORCH_CUDA_ARCH_LIST="8.0;8.7;8.9;9.0"
  fi
fi
export MAX_JOBS="${MAX_JOBS:-4}"
echo "build_ext: TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST, $("$PY" -c 'import torch; print("torch", torch.__version__, "CUDA", torch.version.cuda)')"

FC_EDGE_CUDA=1 "$PY" setup.py build_ext --inplace

"$PY" - <<'PY'
import torch

from fc_edge import ops

if not ops.extension_available():
    raise SystemExit("build_ext: fc_edge._C was built but does not import")
print("build_ext: fc_edge._C loaded; torch.ops.fc_edge:", torch.ops.fc_edge.spectral_compress)
PY

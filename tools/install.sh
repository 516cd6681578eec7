#!/usr/bin/env bash
# Sets up this checkout's Python environment. Order matters: torch first (an installed torch is
# kept; otherwise torch==2.13.0 from pip's configured sources, or from TORCH_INDEX_URL when set,
# e.g. https://download.pytorch.org/whl/cpu for the CPU-only wheel instead of PyPI's CUDA build),
# then DeepSpeed with DS_BUILD_OPS=0 so it installs without compiling, then the rest. `--dev`
# adds test tools. NVIDIA apex is not needed: the fused kernels are PyTorch's own (see README).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
export PIP_ROOT_USER_ACTION=ignore PIP_DISABLE_PIP_VERSION_CHECK=1
if ! $PY -c "import torch" 2>/dev/null; then
  $PY -m pip install -q torch==2.13.0 ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"}
fi
DS_BUILD_OPS=0 $PY -m pip install -q -r requirements.txt
if [ "${1:-}" = "--dev" ]; then
  $PY -m pip install -q -r requirements-dev.txt
fi
$PY -m pip install -q --no-deps -e .

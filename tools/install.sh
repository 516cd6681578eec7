#!/usr/bin/env bash
# Sets up this checkout's Python environment. Order matters: torch first (a CUDA build already
# installed on a GPU machine is kept; otherwise the CPU wheel torch==2.13.0), then DeepSpeed with
# DS_BUILD_OPS=0 so it installs without compiling, then the rest. `--dev` adds test tools.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
export PIP_ROOT_USER_ACTION=ignore PIP_DISABLE_PIP_VERSION_CHECK=1
if ! $PY -c "import torch" 2>/dev/null; then
  $PY -m pip install -q torch==2.13.0
fi
DS_BUILD_OPS=0 $PY -m pip install -q -r requirements.txt
if [ "${1:-}" = "--dev" ]; then
  $PY -m pip install -q -r requirements-dev.txt
fi
$PY -m pip install -q --no-deps -e .

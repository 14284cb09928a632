#!/usr/bin/env bash
# Create .venv and install sdclip into it. `scripts/setup.sh dev` adds the test references.
# Installs the CPU build of torch from this machine's local wheel when no torch is present
# (a bare `torch` requirement would pull a multi-GB CUDA build).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
pip_q() { python -m pip install --disable-pip-version-check -q "$@" 2>&1 | grep -v "is ignored: it is neither" || true; }
python -c "import torch" 2>/dev/null || pip_q "torch==2.13.0"
python -c "import torch" || { echo "setup: torch did not install" >&2; exit 1; }
if [ "${1:-}" = "dev" ]; then
  # serve / cache / ray: sdclip serve, sdclip cache and its Ray engine; onnx + onnxruntime (about 110 MB,
  # seconds to install) so that the backend's exactness tests run; OpenVINO and NNCF (about 190 MB and many
  # dependencies) only for benchmarks: pip install -e ".[bench]"
  pip_q -e ".[dev,hub,serve,cache,ray,onnx]"
  # open_clip's tokenizer is a test reference; its own requirements (torchvision, timm) are not needed
  python -c "import importlib.util as u, sys; sys.exit(u.find_spec('open_clip') is None)" 2>/dev/null \
    || pip_q --no-deps "open_clip_torch==3.3.0"
else
  pip_q -e ".[hub]"
fi
python -c "import sdclip" || { echo "setup: sdclip did not install" >&2; exit 1; }

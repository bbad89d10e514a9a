#!/usr/bin/env bash
# The device check: on a machine with a CUDA GPU, run the GPU-marked tests and the GPU benchmarks (curvature at
# 224 px batch 64/128, training and fine-tuning speed, ONNX Runtime's CUDA provider and TensorRT when present),
# each part time-boxed with `timeout`, and write one JSON summary, in under 8 minutes:
#
#   scripts/device-check.sh                 # summary: $OUT/device-check.json if OUT is set, else runs/device-check/
#   scripts/device-check.sh --parts tests curvature --budget-s 300
#
# It creates no venv and installs nothing into the machine's Python: it uses $PYTHON, else .venv/bin/python, else
# python3 -- the first that imports torch -- and runs fairdeploy from this checkout (PYTHONPATH). On a bare machine
# (Python and torch only, no internet) give it the wheelhouse built here beforehand:
#
#   python scripts/device_check.py --build-wheelhouse .whl/device-check     # here, with internet (.whl/ is ignored)
#   FAIRDEPLOY_WHEELHOUSE=.whl/device-check scripts/device-check.sh       # there (carry .whl with the checkout)
#
# The wheels of what is missing there go into a temporary folder on the parts' PYTHONPATH; a part that still lacks a
# module (one of the project's binary requirements) is skipped with the module named, and every skip is printed.
# Without a CUDA device it writes the summary with the reason and exits 3 at once; 1 when a part failed or timed
# out (or the wheelhouse did not install); 0 otherwise. See scripts/device_check.py for the parts.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

pick_python() {
  local candidate
  for candidate in "${PYTHON:-}" .venv/bin/python python3 python; do
    [ -n "$candidate" ] || continue
    command -v "$candidate" >/dev/null 2>&1 || [ -x "$candidate" ] || continue
    if "$candidate" -c "import torch" >/dev/null 2>&1; then
      echo "$candidate"
      return 0
    fi
  done
  # none imports torch: the probe records the failure with this one
  command -v python3 || command -v python
}

PY=$(pick_python)
if [ -z "$PY" ]; then
  echo "error: no python3 on PATH" >&2
  exit 2
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

exec "$PY" scripts/device_check.py "$@"

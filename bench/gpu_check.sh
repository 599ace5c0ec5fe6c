#!/usr/bin/env bash
# One call on one GPU (H100/H200, <= 10 minutes): every figure of issue 15 in one JSON file,
# nothing downloaded. See bench/gpu_check.py for the parts.
#   bash bench/gpu_check.sh --out gpu_check.json
#   bash bench/gpu_check.sh --tiny --out /tmp/check.json     # the same code, tiny, on a CPU
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
py="${PYTHON:-python3}"
[ -x "$here/.venv/bin/python" ] && [ -z "${PYTHON:-}" ] && py="$here/.venv/bin/python"
export PYTHONPATH="$here${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
exec "$py" "$here/bench/gpu_check.py" "$@"

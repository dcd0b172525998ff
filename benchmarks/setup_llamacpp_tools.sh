#!/usr/bin/env bash
# Builds llama.cpp's llama-quantize and llama-imatrix (CPU) for the GGUF benchmarks: the
# importance-matrix and "_M" mix files of llama.cpp that gguf.quants cannot make. The sources
# are the llama.cpp that llama-cpp-python's sdist vendors (PyPI is reachable here, GitHub is
# not). Not part of the install or CI; about 10-15 minutes on 2 cores.
#
#   bash benchmarks/setup_llamacpp_tools.sh /tmp/llamacpp-tools   # -> /tmp/llamacpp-tools/bin
set -euo pipefail
WORK=${1:?usage: setup_llamacpp_tools.sh WORK_DIR}
VERSION=${LLAMA_CPP_PYTHON_VERSION:-}  # empty: the newest sdist
mkdir -p "$WORK"
cd "$WORK"
if [ ! -d src ]; then
  # the sdist's address from PyPI's JSON API (pip download would build its build dependencies)
  python3 - "$VERSION" <<'PY'
import json, sys, urllib.parse, urllib.request
version = sys.argv[1]
base = f"https://pypi.org/pypi/llama-cpp-python/{version + '/' if version else ''}json"
urls = [u["url"] for u in json.load(urllib.request.urlopen(base, timeout=60))["urls"] if u["packagetype"] == "sdist"]
urllib.request.urlretrieve(urllib.parse.urljoin(base, urls[0]), "llama_cpp_python.tar.gz")
PY
  mkdir -p src
  tar -xzf llama_cpp_python.tar.gz -C src --strip-components=1
fi
cmake -S src/vendor/llama.cpp -B build -G Ninja -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=OFF \
  -DGGML_NATIVE=ON -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF \
  -DLLAMA_BUILD_TOOLS=ON >/dev/null
cmake --build build --target llama-quantize llama-imatrix -j "$(nproc)"
mkdir -p bin
cp build/bin/llama-quantize build/bin/llama-imatrix bin/
bin/llama-quantize --help 2>&1 | head -1 || true
echo "built: $WORK/bin/llama-quantize, $WORK/bin/llama-imatrix"

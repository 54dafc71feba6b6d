#!/usr/bin/env bash
# Install llama-cpp-python (the `llamacpp` backend) into the active environment.
# PyPI ships it as source only, and compiling llama.cpp takes about 11 minutes on 2 cores, so the wheel built
# the first time is kept in $LLAMACPP_WHEELHOUSE (default ~/.cache/jailbreak-antidote-wheels) and reused
# on every later install on this machine. The wheel is built for this machine's CPU (llama.cpp's native
# build); delete the folder to rebuild after moving to another CPU.
set -euo pipefail
version=${LLAMACPP_VERSION:-0.3.36}
wheelhouse=${LLAMACPP_WHEELHOUSE:-$HOME/.cache/jailbreak-antidote-wheels}
mkdir -p "$wheelhouse"
if ! ls "$wheelhouse"/llama_cpp_python-"$version"-*.whl >/dev/null 2>&1; then
  echo "building llama-cpp-python $version from source (about 11 minutes on 2 cores; cached in $wheelhouse)"
  CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)} \
    python -m pip wheel --no-deps "llama-cpp-python==$version" -w "$wheelhouse"
else
  echo "using the cached llama-cpp-python $version wheel in $wheelhouse"
fi
python -m pip install -q --find-links "$wheelhouse" "llama-cpp-python==$version"

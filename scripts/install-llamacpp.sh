#!/usr/bin/env bash
# Install llama-cpp-python (the `llamacpp` backend) into the active environment.
# PyPI ships it as source only, and compiling llama.cpp takes about 11 minutes on 2 cores, so the wheel built
# the first time is kept in $LLAMACPP_WHEELHOUSE (default ~/.cache/jailbreak-antidote-wheels), in a folder
# named after the version and the build flags, and reused by every later install on this machine.
#
# Build flags: the CPU's own vector extensions (read from /proc/cpuinfo), but never AMX: ggml's AMX matmul
# dies with SIGILL on machines here that report AMX under a hypervisor, and the default native build would
# enable it. Set LLAMACPP_CMAKE_ARGS to override.
set -euo pipefail
py=${PYTHON:-$(command -v python || command -v python3)}  # the interpreter `pip` installs into
version=${LLAMACPP_VERSION:-0.3.36}
wheelhouse=${LLAMACPP_WHEELHOUSE:-$HOME/.cache/jailbreak-antidote-wheels}

if [ -z "${LLAMACPP_CMAKE_ARGS:-}" ]; then
  cpu_flags=" $(grep -m1 '^flags' /proc/cpuinfo 2>/dev/null | cut -d: -f2) "
  LLAMACPP_CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF"
  for pair in avx:AVX avx2:AVX2 fma:FMA f16c:F16C bmi2:BMI2 avx512f:AVX512 \
              avx512_vnni:AVX512_VNNI avx512_bf16:AVX512_BF16 avx_vnni:AVX_VNNI; do
    case "$cpu_flags" in *" ${pair%%:*} "*) LLAMACPP_CMAKE_ARGS+=" -DGGML_${pair##*:}=ON" ;; esac
  done
fi
build_id=$(printf '%s' "$LLAMACPP_CMAKE_ARGS" | sha256sum | cut -c1-12)
target="$wheelhouse/$version-$build_id"
mkdir -p "$target"
if ! ls "$target"/llama_cpp_python-"$version"-*.whl >/dev/null 2>&1; then
  echo "building llama-cpp-python $version from source (about 11 minutes on 2 cores; kept in $target)"
  echo "CMAKE_ARGS=$LLAMACPP_CMAKE_ARGS"
  CMAKE_ARGS="$LLAMACPP_CMAKE_ARGS" CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)} \
    "$py" -m pip wheel --no-deps --no-cache-dir "llama-cpp-python==$version" -w "$target"
else
  echo "using the cached llama-cpp-python $version wheel in $target"
fi
"$py" -m pip install -q --force-reinstall --no-deps "$target"/llama_cpp_python-"$version"-*.whl
"$py" -m pip install -q --find-links "$target" "llama-cpp-python==$version"  # its pure-Python dependencies

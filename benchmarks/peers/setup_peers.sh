#!/usr/bin/env bash
# Build the virtual environment shared by the HQQ, AutoRound and GPTQModel benchmark workers
# (benchmarks/workers/{hqq,autoround,gptqmodel}_worker.py).
#
#   bash benchmarks/peers/setup_peers.sh        # -> .venvs/peers (gitignored), ~4 min, ~1.7 GB
#
# torch is installed FIRST and held at the CPU build 2.13.0 by a constraints file (an unpinned
# resolve pulls a multi-GB CUDA build). gptqmodel 7.7.0 declares torch>=2.14.1, so it is installed
# with --no-deps and its other requirements are listed here by hand; it runs on 2.13.0 (checked:
# quantize, save, reload). The three tools share one venv without conflicts. See
# benchmarks/peers/PEERS.md for versions and findings.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
VENV="${MOEPRESS_PEERS_VENV:-$ROOT/.venvs/peers}"
TORCH="2.13.0"
HQQ="0.2.8.post1"
AUTOROUND="0.16.1"
GPTQMODEL="7.7.0"
# gptqmodel 7.7.0's requirements.txt less torch (which it pins to >=2.14.1)
GPTQMODEL_DEPS=(
    "accelerate>=1.15.0" "numpy>=2.4.6" "safetensors>=0.8.0" "filelock>=4.2.4" "transformers>=5.20.2"
    "threadpoolctl>=3.7.0" "packaging>=26.3" "device-smi>=0.5.7" "protobuf>=7.36.2" "pillow>=13.0.0"
    "requests>=2.34.2" "pypcre>=0.6.4" "tokenicer>=0.0.14" "logbar>=0.4.15" "jinja2>=3.1.6" "ninja>=1.13.2"
    "maturin>=1.15.0" "datasets>=5.1.0" "pyarrow>=26.0.0" "dill>=0.4.1" "torchao>=0.18.0" "defuser>=0.0.28"
)

started=$(date +%s)
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip install --disable-pip-version-check --quiet)
CONSTRAINTS="$(mktemp)"
trap 'rm -f "$CONSTRAINTS"' EXIT
echo "torch==$TORCH" > "$CONSTRAINTS"    # nothing below may replace the CPU torch

"${PIP[@]}" "torch==$TORCH"
# moepress's own needs (PYTHONPATH points the workers at the repo's moepress)
"${PIP[@]}" -c "$CONSTRAINTS" "transformers>=5.17" safetensors numpy scipy tqdm pyyaml
"${PIP[@]}" -c "$CONSTRAINTS" "hqq==$HQQ" "auto-round==$AUTOROUND"
"${PIP[@]}" -c "$CONSTRAINTS" "${GPTQMODEL_DEPS[@]}"
"${PIP[@]}" --no-deps "gptqmodel==$GPTQMODEL"    # sdist; pure Python at install, kernels JIT-built or skipped

GPTQMODEL_CPU_WORKERS=2 "$VENV/bin/python" - <<'PY' 2>/dev/null | grep -E '^[a-z-]+=='  # (gptqmodel prints a banner)
import importlib.metadata as m
import torch, transformers, hqq.core.quantize, auto_round, gptqmodel, defuser  # noqa: F401  (all import)
assert torch.__version__.startswith("2.13.0"), torch.__version__
for name in ("torch", "transformers", "hqq", "auto-round", "gptqmodel", "defuser", "accelerate"):
    print(f"{name}=={m.version(name)}")
PY
echo "installed in $(( $(date +%s) - started )) s, $(du -sh "$VENV" | cut -f1) at $VENV"

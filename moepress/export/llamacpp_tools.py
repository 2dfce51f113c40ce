"""Where llama.cpp's tools are: the build of ``benchmarks/peers/setup_llamacpp.sh``.

The script builds llama.cpp (vendored in the pinned llama-cpp-python sdist) into
``$MOEPRESS_LLAMACPP`` or, by default, ``.venvs/llamacpp`` at the repository root; tests and
benchmarks ask here for a binary (``llama-perplexity``) or the converter
(``convert_hf_to_gguf.py``) and skip, saying how to build them, when they are absent.
"""

from __future__ import annotations

import os
from pathlib import Path

ENV = "MOEPRESS_LLAMACPP"
SETUP = "bash benchmarks/peers/setup_llamacpp.sh"
TOOLS = ("llama-quantize", "llama-perplexity", "llama-imatrix", "llama-bench", "llama-cli")


def llamacpp_dir() -> Path:
    """The folder the setup script builds into: ``$MOEPRESS_LLAMACPP``, else ``<repo>/.venvs/llamacpp``."""
    if os.environ.get(ENV):
        return Path(os.environ[ENV])
    return Path(__file__).resolve().parents[2] / ".venvs" / "llamacpp"


def source_tree() -> Path:
    """The extracted llama.cpp tree (``convert_hf_to_gguf.py``, ``gguf-py``, ``tools/``)."""
    return llamacpp_dir() / "llama.cpp"


def tool(name: str) -> Path | None:
    """The built binary ``name`` (``llama-perplexity``, ...), or None when it is not built."""
    path = source_tree() / "build" / "bin" / name
    return path if path.is_file() and os.access(path, os.X_OK) else None


def converter() -> Path | None:
    """llama.cpp's own ``convert_hf_to_gguf.py``, or None when the tree is not extracted."""
    path = source_tree() / "convert_hf_to_gguf.py"
    return path if path.is_file() else None


def missing(*names: str) -> str | None:
    """None when every tool in ``names`` (and ``convert`` for the converter) exists, else a one-line
    reason naming the first missing one and how to build it (a test's skip reason)."""
    for name in names:
        found = converter() if name == "convert" else tool(name)
        if found is None:
            what = "convert_hf_to_gguf.py" if name == "convert" else name
            return f"llama.cpp's {what} is not built under {llamacpp_dir()} (run `{SETUP}` or set {ENV})"
    return None


__all__ = ["ENV", "TOOLS", "converter", "llamacpp_dir", "missing", "source_tree", "tool"]

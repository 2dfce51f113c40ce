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
TOOLS = ("llama-quantize", "llama-perplexity", "llama-imatrix", "llama-bench", "llama-batched-bench", "llama-cli")


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


# Runs llama.cpp's converter with one change: the BPE pre-tokenizer it cannot recognise (the zoo's
# byte-level BPE: "BPE pre-tokenizer was not recognized") is named, as moepress's export names it.
_CONVERT_WITH_PRE = """
import runpy, sys
sys.path.insert(0, sys.argv[1])
from conversion.base import TextModel
pre = sys.argv[2]
TextModel.get_vocab_base_pre = lambda self, tokenizer: pre
sys.argv = [sys.argv[1] + '/convert_hf_to_gguf.py'] + sys.argv[3:]
runpy.run_path(sys.argv[0], run_name='__main__')
"""


def convert_reference(model_dir: str, out: str, outtype: str = "f16", pre: str | None = "gpt-2",
                      timeout: float = 600) -> str:
    """Convert a Hugging Face model folder with llama.cpp's own ``convert_hf_to_gguf.py`` (the
    reference moepress's export is compared with, and the f16 GGUF llama-perplexity's KL is measured
    against). ``pre`` names the BPE pre-tokenizer for tokenizers the converter does not recognise
    (None: run it unchanged). Returns ``out``; raises RuntimeError with the converter's last lines."""
    import subprocess
    import sys

    if converter() is None:
        raise RuntimeError(missing("convert"))
    args = [str(model_dir), "--outfile", str(out), "--outtype", outtype]
    if pre is None:
        command = [sys.executable, str(converter()), *args]
    else:
        command = [sys.executable, "-c", _CONVERT_WITH_PRE, str(source_tree()), pre, *args]
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-5:])
        raise RuntimeError(f"convert_hf_to_gguf.py failed on {model_dir}:\n{tail}")
    return str(out)


def run_tool(command: list, need: str, tries: int = 5, timeout: float = 600) -> str:
    """Run a llama.cpp tool and return its output (stdout and stderr), which must match ``need``.

    llama.cpp's logger prints from a thread of its own that the process does not wait for at exit
    (common/log.cpp), so on a busy machine the last lines (llama-perplexity's "Final estimate") are
    now and then lost though the tool succeeded; the tool then runs again (the same inputs give the
    same figures), up to ``tries`` times. RuntimeError with the last lines when it fails."""
    import re
    import subprocess

    for _ in range(tries):
        done = subprocess.run([str(c) for c in command], capture_output=True, text=True, timeout=timeout)
        output = done.stdout + done.stderr
        if done.returncode != 0:
            tail = "\n".join(output.strip().splitlines()[-6:])
            raise RuntimeError(f"{Path(str(command[0])).name} failed:\n{tail}")
        if re.search(need, output):
            return output
    raise RuntimeError(f"{Path(str(command[0])).name} printed no {need!r} in {tries} runs")


def perplexity(gguf: str, text_file: str, n_ctx: int, chunks: int, threads: int = 1) -> float:
    """llama-perplexity's final estimate for ``gguf`` on ``text_file`` (``-c n_ctx --chunks chunks``)."""
    import re

    if tool("llama-perplexity") is None:
        raise RuntimeError(missing("llama-perplexity"))
    output = run_tool([tool("llama-perplexity"), "-m", gguf, "-f", text_file, "-c", n_ctx, "--chunks", chunks,
                       "-t", threads], need=r"Final estimate: PPL = [0-9.]+")
    return float(re.search(r"Final estimate: PPL = ([0-9.]+)", output).group(1))


__all__ = ["ENV", "TOOLS", "convert_reference", "converter", "llamacpp_dir", "missing", "perplexity", "run_tool",
           "source_tree", "tool"]

"""What the GGUF tests share: reading a file's metadata and tensors with the gguf package, whether
llama.cpp's converter can run (and running it on several models at once), and perplexity scored as
llama-perplexity scores it."""

from __future__ import annotations

import importlib.util
import math

import torch

from moepress.export import llamacpp_tools


def converter_missing() -> str | None:
    """Why llama.cpp's converter cannot run here (a skip reason), or None."""
    reason = llamacpp_tools.missing("convert")
    if reason is None and importlib.util.find_spec("sentencepiece") is None:
        reason = "llama.cpp's converter imports sentencepiece: pip install sentencepiece"
    return reason


# llama.cpp's converter run on several models in one process, as ``llamacpp_tools.convert_reference``
# runs it on one (the BPE pre-tokenizer it cannot recognise named): its start (torch, transformers and
# its own modules imported) is most of a tiny model's conversion, so a test module pays it once.
_CONVERT_MANY = """
import json, runpy, sys
tree, pre, jobs = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
sys.path.insert(0, tree)
from conversion.base import TextModel
TextModel.get_vocab_base_pre = lambda self, tokenizer: pre
script = tree + '/convert_hf_to_gguf.py'
converter = runpy.run_path(script, run_name='convert_hf_to_gguf')
for model_dir, out, outtype in jobs:
    sys.argv = [script, model_dir, '--outfile', out, '--outtype', outtype]
    converter['main']()
"""


def convert_references(jobs: list[tuple], pre: str = "gpt-2", timeout: float = 600) -> list[str]:
    """``llamacpp_tools.convert_reference(model_dir, out, outtype)`` for each ``(model_dir, out,
    outtype)`` of ``jobs``, in one converter process (the same files, one start). Returns the outs."""
    import json
    import subprocess
    import sys

    if llamacpp_tools.converter() is None:
        raise RuntimeError(llamacpp_tools.missing("convert"))
    jobs = [(str(d), str(o), t) for d, o, t in jobs]
    done = subprocess.run([sys.executable, "-c", _CONVERT_MANY, str(llamacpp_tools.source_tree()), pre,
                           json.dumps(jobs)], capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-5:])
        raise RuntimeError(f"convert_hf_to_gguf.py failed on {[d for d, _, _ in jobs]}:\n{tail}")
    return [o for _, o, _ in jobs]


def metadata(path) -> dict:
    import gguf

    reader = gguf.GGUFReader(str(path))
    return {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}


def tensors(path) -> dict:
    import gguf

    return {t.name: t for t in gguf.GGUFReader(str(path)).tensors}


def llamacpp_protocol_ppl(model, ids: list[int], n_ctx: int, chunks: int) -> float:
    """Perplexity as llama-perplexity computes it: chunks of n_ctx tokens, each scored on its second half."""
    x = torch.tensor(ids[: n_ctx * chunks]).reshape(chunks, n_ctx)
    with torch.no_grad():
        logp = torch.log_softmax(model(x).logits.float(), dim=-1)
    first = n_ctx // 2
    nll = -logp[:, first:n_ctx - 1].gather(-1, x[:, first + 1:].unsqueeze(-1))
    return math.exp(nll.mean().item())

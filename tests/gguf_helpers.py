"""What the GGUF tests share: reading a file's metadata and tensors with the gguf package, whether
llama.cpp's converter can run, and perplexity scored as llama-perplexity scores it."""

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

"""Shared fixtures: a real (tiny) tokenizer, tiny random models of every architecture saved to disk."""

from __future__ import annotations

import os

import pytest

# Without a GPU, the Triton expert kernel runs in Triton's interpreter. Triton reads this when a
# kernel is decorated, at the first import of moepress.runtime.triton_moe, which any test may cause
# (moepress.load prepares models through it): so it is set here, before any test module is imported.
import torch  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def _short_default_refinement(monkeypatch):
    """``moepress compress`` refines 32 steps per layer by default; the CLI tests run 2, so that the
    default path (refinement on) is exercised and the suite stays fast. Tests of refinement itself
    give their step counts."""
    import moepress.refine

    monkeypatch.setattr(moepress.refine, "REFINE_STEPS", 2)


@pytest.fixture(scope="session")
def tokenizer():
    from moepress.data import load_text
    from moepress.data.tokenizer import train_byte_bpe

    return train_byte_bpe(load_text("builtin:calib")[:100_000], vocab_size=512)


@pytest.fixture(scope="session")
def calib_file(tmp_path_factory, tokenizer):
    """A small plain-text calibration file cut from the shipped calibration split."""
    from moepress.data import load_text

    path = tmp_path_factory.mktemp("data") / "calib.txt"
    path.write_text(load_text("builtin:calib")[:60_000])
    return str(path)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tokenizer):
    """``tiny_model_dir(arch)``: a saved tiny random model of ``arch`` with the tiny tokenizer."""
    from moepress.model.tiny import build_tiny_model

    cache: dict[str, str] = {}

    def make(arch: str) -> str:
        if arch not in cache:
            path = tmp_path_factory.mktemp(f"tiny-{arch}")
            model = build_tiny_model(arch, vocab_size=len(tokenizer))
            model.save_pretrained(path)
            tokenizer.save_pretrained(path)
            cache[arch] = str(path)
        return cache[arch]

    return make




def pytest_collection_finish(session):
    """Move every object alive once the tests are collected (the imported modules of torch,
    transformers, moepress and the test modules: some 400,000) out of the garbage collector's
    reach: they live to the end anyway. The streamed pipeline calls ``gc.collect()`` after every
    layer (pipeline/runner.py, to hand freed memory back), and each call walked all of them, a
    quarter of a second on this machine: at a few calls per compression, a large share of the
    suite's time. What the tests create is collected as before."""
    import gc

    gc.collect()
    gc.freeze()

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


_frozen_module = None


def pytest_runtest_setup(item):
    """Before each test, collect what is garbage and move every object then alive out of the garbage
    collector's reach (``gc.freeze``). The streamed pipeline calls ``gc.collect()`` after every layer
    (pipeline/runner.py, to hand freed memory back to the system), and each call walked every object
    alive: the imported modules of torch, transformers, moepress and the tests (some 400,000, a
    quarter of a second a call on this machine, a large share of the suite's time at a few calls per
    compression), the fixtures and the modules tests import as they run. What a test creates is
    collected as before. At each module's first test everything is unfrozen and collected once, so
    that the previous module's fixtures, torn down by then, are freed even where they hold cycles."""
    import gc

    global _frozen_module
    if item.module is not _frozen_module:
        _frozen_module = item.module
        gc.unfreeze()
    gc.collect()
    gc.freeze()

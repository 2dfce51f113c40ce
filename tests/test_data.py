"""Tests for moepress.data: the shipped corpus, load_text, token windows, the test tokenizer."""

from __future__ import annotations

import gzip
import hashlib
import json
import random
import re
import sys

import pytest
import torch

from moepress.data import (
    builtin_manifest,
    builtin_path,
    load_text,
    token_windows,
    tokenize_text,
)
from moepress.data.corpus import CORPORA_DIR
from moepress.data.tokenizer import train_byte_bpe
from moepress.errors import MoepressError

SOURCES = {"kjv", "austen", "shakespeare"}


@pytest.fixture(scope="module")
def calib() -> str:
    return load_text("builtin:calib")


@pytest.fixture(scope="module")
def eval_text() -> str:
    return load_text("builtin:eval")


@pytest.fixture(scope="module")
def manifest() -> dict:
    return builtin_manifest()


@pytest.fixture(scope="module")
def tok(calib):
    return train_byte_bpe(calib[:100_000], 300)


# ------------------------------------------------------------------ shipped corpus

def test_errors_module():
    assert issubclass(MoepressError, Exception)
    assert "one line" in MoepressError.__doc__


def test_builtin_splits_load_and_match_manifest(calib, eval_text, manifest):
    for split, text in (("calib", calib), ("eval", eval_text)):
        entry = manifest["splits"][split]
        assert entry["shipped"] and entry["file"] == f"{split}.txt.gz"
        assert len(text) == entry["chars"] > 1_000_000
        assert hashlib.sha256(text.encode("utf-8")).hexdigest() == entry["sha256"]
        # documents tile the text with the separator between them
        docs = entry["documents"]
        pos = 0
        for d in docs:
            assert d["start"] == pos
            pos += d["chars"] + len(manifest["document_separator"])
            assert text[d["start"]:d["start"] + d["chars"]].strip()
        assert pos - len(manifest["document_separator"]) == len(text)
        assert "\r" not in text
    assert builtin_path("calib").parent == CORPORA_DIR


def test_shipped_files_are_small():
    total = sum(p.stat().st_size for p in CORPORA_DIR.iterdir() if p.is_file())
    assert total < 4_000_000
    assert (CORPORA_DIR / "SOURCES.md").is_file()


def test_splits_share_no_document_and_eval_draws_from_every_source(manifest):
    ids = {s: {d["id"] for d in v["documents"]} for s, v in manifest["splits"].items()}
    assert set(ids) == {"calib", "eval", "train"}
    assert not ids["calib"] & ids["eval"]
    assert not ids["calib"] & ids["train"]
    assert not ids["eval"] & ids["train"]
    for split in ("calib", "eval"):
        sources = {d["source"] for d in manifest["splits"][split]["documents"]}
        assert sources == SOURCES, split
        assert all(manifest["splits"][split]["sources"][s] > 100_000 for s in SOURCES)
    # the two shipped splits have similar size (15% of each source each)
    c, e = manifest["splits"]["calib"]["chars"], manifest["splits"]["eval"]["chars"]
    assert 0.7 < c / e < 1.4


def test_splits_share_no_long_line(calib, eval_text):
    strip = lambda line: re.sub(r"^\d+ ", "", line.strip())  # noqa: E731  (Bible verse numbers)
    calib_lines = {strip(line) for line in calib.splitlines() if len(strip(line)) >= 60}
    shared = [line for line in eval_text.splitlines() if len(strip(line)) >= 60 and strip(line) in calib_lines]
    assert shared == []


def test_splits_share_no_200_char_substring_on_a_sample(calib, eval_text):
    rng = random.Random(0)
    for _ in range(1500):
        i = rng.randrange(0, len(eval_text) - 200)
        piece = eval_text[i:i + 200]
        assert piece not in calib, piece


# ------------------------------------------------------------------------ load_text

def test_load_plain_text_and_gzip(tmp_path):
    p = tmp_path / "a.txt"
    p.write_text("hello world\r\nsecond line\n", encoding="utf-8")
    assert load_text(str(p)) == "hello world\nsecond line\n"
    assert load_text(p) == "hello world\nsecond line\n"  # PathLike works too
    g = tmp_path / "a.txt.gz"
    g.write_bytes(gzip.compress("zipped text\n".encode("utf-8")))
    assert load_text(str(g)) == "zipped text\n"


def test_load_jsonl(tmp_path):
    p = tmp_path / "d.jsonl"
    rows = [{"text": "first record", "id": 1}, {"text": "second\nrecord"}, {"text": "  "}]
    p.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n", encoding="utf-8")
    assert load_text(str(p)) == "first record\n\nsecond\nrecord"
    g = tmp_path / "d.jsonl.gz"
    g.write_bytes(gzip.compress(p.read_bytes()))
    assert load_text(str(g)) == "first record\n\nsecond\nrecord"


@pytest.mark.parametrize(
    "lines, pattern",
    [
        (['{"text": "ok"}', '{"content": "no text field"}'], r'line 2: JSON object has no "text" field \(keys: content\)'),
        (['{"text": "ok"}', "", "{not json"], r"line 3: not valid JSON"),
        (['["a", "list"]'], r'line 1: expected a JSON object with a "text" field, got list'),
        (['{"text": 5}'], r'line 1: "text" must be a string, got int'),
    ],
)
def test_jsonl_errors_name_the_line(tmp_path, lines, pattern):
    p = tmp_path / "bad.jsonl"
    p.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(MoepressError, match=pattern) as info:
        load_text(str(p))
    assert "\n" not in str(info.value)
    assert str(p) in str(info.value)


def test_missing_file(tmp_path):
    missing = tmp_path / "nope.txt"
    with pytest.raises(MoepressError, match=r"^calibration file not found: .*nope\.txt$"):
        load_text(str(missing))
    with pytest.raises(MoepressError, match=r"^evaluation file not found: "):
        load_text(str(missing), what="evaluation")
    with pytest.raises(MoepressError, match="is a directory"):
        load_text(str(tmp_path))


@pytest.mark.parametrize("name, content", [("e.txt", ""), ("w.txt", "  \n\n\t\n"), ("e.jsonl", '{"text": ""}\n')])
def test_empty_file(tmp_path, name, content):
    p = tmp_path / name
    p.write_text(content, encoding="utf-8")
    with pytest.raises(MoepressError, match=r"^calibration file is empty: "):
        load_text(str(p))


def test_not_utf8_and_corrupt_gzip(tmp_path):
    p = tmp_path / "latin1.txt"
    p.write_bytes("caf\u00e9 au lait".encode("latin-1"))
    with pytest.raises(MoepressError, match="not UTF-8 text"):
        load_text(str(p))
    g = tmp_path / "broken.txt.gz"
    g.write_bytes(b"definitely not gzip")
    with pytest.raises(MoepressError, match="cannot read calibration file"):
        load_text(str(g))


def test_builtin_names():
    with pytest.raises(MoepressError, match=r"unknown builtin text 'builtin:test'.*builtin:calib"):
        load_text("builtin:test")
    if not (CORPORA_DIR / "train.txt.gz").exists():
        with pytest.raises(MoepressError, match="builtin:train is not shipped.*build_corpus.py"):
            load_text("builtin:train")


def test_hf_needs_datasets(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` fail
    with pytest.raises(MoepressError, match=r"needs the 'datasets' package"):
        load_text("hf:wikitext:wikitext-2-raw-v1:test")
    with pytest.raises(MoepressError, match="bad dataset spec"):
        load_text("hf:")


# ---------------------------------------------------------------- tokenizer helper

def test_train_byte_bpe(calib, tok):
    assert len(tok) == 300
    assert tok.eos_token == tok.bos_token == tok.pad_token == "<|endoftext|>"
    s = "Thou shalt not\n\n  tokenize \u00fcn\u00efc\u00f6de \U0001f600 badly.\n"
    ids = tok(s, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == s
    again = train_byte_bpe(calib[:100_000], 300)
    assert again.get_vocab() == tok.get_vocab()
    with pytest.raises(ValueError, match="at least 257"):
        train_byte_bpe("abc", 256)


# --------------------------------------------------------------- token windows

def test_tokenize_text_chunks_match_whole_text(eval_text, tok):
    text = eval_text[:60_000]
    whole = tok(text, add_special_tokens=False)["input_ids"]
    assert tokenize_text(text, tok, chunk_chars=997) == whole
    assert tokenize_text(text, tok) == whole
    assert tokenize_text("", tok) == []


def test_token_windows_are_consecutive_non_overlapping_slices(eval_text, tok):
    text = eval_text[:30_000]
    ids = tokenize_text(text, tok)
    seq_len = 64
    w = token_windows(text, tok, seq_len)
    n = len(ids) // seq_len
    assert w.dtype == torch.long and w.shape == (n, seq_len)
    assert torch.equal(w.reshape(-1), torch.tensor(ids[: n * seq_len]))
    first = token_windows(text, tok, seq_len, 5)
    assert torch.equal(first, w[:5])


def test_token_windows_seeded_choice(eval_text, tok):
    text = eval_text[:30_000]
    full = token_windows(text, tok, 32)
    a = token_windows(text, tok, 32, 20, seed=123)
    b = token_windows(text, tok, 32, 20, seed=123)
    c = token_windows(text, tok, 32, 20, seed=7)
    assert a.shape == (20, 32)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    # each chosen window is a distinct window of the full set, in text order
    rows = [next(i for i in range(len(full)) if torch.equal(full[i], r)) for r in a]
    assert rows == sorted(set(rows))
    # asking for every window with a seed returns all of them
    assert torch.equal(token_windows(text, tok, 32, len(full), seed=5), full)


def test_token_windows_too_short(eval_text, tok):
    text = eval_text[:1000]
    n = len(tokenize_text(text, tok))
    assert n < 4096
    with pytest.raises(MoepressError) as info:
        token_windows(text, tok, 32, 128, what="calibration")
    assert str(info.value) == (
        f"calibration text has {n} tokens, need at least 4096 (128 samples x 32 tokens); "
        "give a longer file or fewer --calib-samples"
    )
    with pytest.raises(MoepressError, match=r"^evaluation text has \d+ tokens, need at least 4096 .*; use less$"):
        token_windows(text, tok, 32, 128, what="evaluation", advice="use less")
    with pytest.raises(MoepressError, match=r"^text has 0 tokens, need at least 8 \(one window of 8 tokens\)"):
        token_windows("", tok, 8)


@pytest.mark.parametrize("seq_len, num", [(0, None), (-3, 4), (8, 0), (8, -1), (True, None)])
def test_token_windows_bad_arguments(tok, seq_len, num):
    with pytest.raises(MoepressError, match="positive integer"):
        token_windows("some text here", tok, seq_len, num)

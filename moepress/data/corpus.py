"""Calibration and evaluation text, and cutting it into token windows.

Text sources (:func:`load_text`)
--------------------------------
* a path to a plain-text file (``.txt`` or any other name);
* a path to a JSON Lines file (``.jsonl``): one JSON object per line, its
  ``"text"`` field is taken, records are joined with a blank line;
* either of those compressed (``.gz`` or ``.xz``);
* ``builtin:calib`` / ``builtin:eval``: the English corpus shipped with moepress
  (King James Bible, Jane Austen, Shakespeare; see ``corpora/SOURCES.md``).  Its
  splits are made of whole documents and never overlap, so calibrating on
  ``builtin:calib`` and measuring on ``builtin:eval`` is fair.  ``builtin:train``
  is a third, larger split for training small models; it is not shipped, and
  ``scripts/build_corpus.py --train-out PATH`` writes it;
* ``hf:NAME[:CONFIG][:SPLIT]``: a dataset from the Hugging Face hub through the
  ``datasets`` library (needs it installed and a network), e.g.
  ``hf:wikitext:wikitext-2-raw-v1:test``; its ``"text"`` column is joined with
  blank lines.

Token windows (:func:`token_windows`)
-------------------------------------
Text is tokenized once into one token stream and cut into **non-overlapping**
windows of ``seq_len`` tokens (the tail that does not fill a window is dropped).
Perplexity is then the mean loss over every token of every window.  Non-
overlapping windows are simple, cheap and comparable across tools (it is what
GPTQ-style papers and most quantization toolkits report); the first tokens of
each window see little context, so the perplexity is a little higher than a
sliding-window (strided) evaluation would give.  Compare numbers only at the
same ``seq_len`` and tokenizer.
"""

from __future__ import annotations

import gzip
import json
import lzma
import os
import re
from pathlib import Path
from typing import Any

from moepress.errors import MoepressError

#: Directory holding the shipped corpus files and their manifest.
CORPORA_DIR = Path(__file__).resolve().parent / "corpora"
#: Names accepted after ``builtin:``.  ``train`` is reserved: not shipped yet.
BUILTIN_SPLITS = ("calib", "eval", "train")
#: How records of a JSONL file or an ``hf:`` dataset are joined.
RECORD_SEPARATOR = "\n\n"
#: Characters per tokenizer call in :func:`tokenize_text` (chunks end at a line end).
DEFAULT_CHUNK_CHARS = 1 << 16

__all__ = [
    "BUILTIN_SPLITS",
    "CORPORA_DIR",
    "builtin_manifest",
    "builtin_path",
    "load_text",
    "token_windows",
    "tokenize_text",
]


# ----------------------------------------------------------------- loading text

def builtin_manifest() -> dict[str, Any]:
    """The shipped corpus manifest: sources, and per split its documents
    (id, source, title, start offset, character count), character count and
    SHA-256 of the text."""
    with open(CORPORA_DIR / "manifest.json", encoding="utf-8") as f:
        return json.load(f)


def builtin_path(split: str) -> Path:
    """Path of a builtin split's file (``calib``, ``eval``; ``train`` only once built)."""
    if split not in BUILTIN_SPLITS:
        raise MoepressError(
            f"unknown builtin text 'builtin:{split}'; choose one of "
            + ", ".join(f"builtin:{s}" for s in BUILTIN_SPLITS)
        )
    path = CORPORA_DIR / f"{split}.txt.gz"
    if not path.is_file():
        if split == "train":
            raise MoepressError(
                "builtin:train is not shipped; build it with "
                "'python3 scripts/build_corpus.py --train-out train.txt.gz' and pass that file"
            )
        raise MoepressError(f"builtin text {split!r} is missing from the installation: {path}")
    return path


def load_text(source: str | os.PathLike[str], *, what: str = "calibration") -> str:
    """Return the text of ``source`` (see the module docstring for the forms).

    ``what`` names the text in error messages ("calibration file not found: X",
    "evaluation file is empty: X").  Every problem with the source raises
    :class:`~moepress.errors.MoepressError` with a one-line message: a missing or
    unreadable file, a file that is empty (only whitespace), non-UTF-8 bytes, a
    JSONL line that is not a JSON object with a string ``"text"`` field (naming
    the line), an unknown ``builtin:`` name, or ``hf:`` without ``datasets``.
    """
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(f"source must be a str or a path, not {type(source).__name__}")
    spec = os.fspath(source)
    if isinstance(source, str):
        if spec.startswith("builtin:"):
            path = builtin_path(spec[len("builtin:"):])
            return _read_file(path, what=what, display=spec)
        if spec.startswith("hf:"):
            return _load_hf(spec, what=what)
    if not spec.strip():
        raise MoepressError(f"{what} file not given (empty path)")
    path = Path(spec).expanduser()
    if not path.exists():
        raise MoepressError(f"{what} file not found: {spec}")
    if path.is_dir():
        raise MoepressError(f"{what} file is a directory, not a file: {spec}")
    return _read_file(path, what=what, display=spec)


def _read_file(path: Path, *, what: str, display: str) -> str:
    name = path.name.lower()
    opener: Any = open
    if name.endswith(".gz"):
        opener, name = gzip.open, name[:-3]
    elif name.endswith(".xz"):
        opener, name = lzma.open, name[:-3]
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError, lzma.LZMAError) as e:
        raise MoepressError(f"cannot read {what} file {display}: {_one_line(e)}") from e
    try:
        raw = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise MoepressError(
            f"{what} file is not UTF-8 text: {display} (bad byte at offset {e.start})"
        ) from e
    raw = raw.replace("\r\n", "\n")
    text = _parse_jsonl(raw, display) if name.endswith(".jsonl") else raw
    if not text.strip():
        raise MoepressError(f"{what} file is empty: {display}")
    return text


def _parse_jsonl(raw: str, display: str) -> str:
    texts = []
    for lineno, line in enumerate(raw.split("\n"), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise MoepressError(f"{display} line {lineno}: not valid JSON ({e.msg})") from e
        if not isinstance(obj, dict):
            raise MoepressError(
                f"{display} line {lineno}: expected a JSON object with a \"text\" field, "
                f"got {type(obj).__name__}"
            )
        if "text" not in obj:
            keys = ", ".join(sorted(map(str, obj))[:5]) or "none"
            raise MoepressError(
                f"{display} line {lineno}: JSON object has no \"text\" field (keys: {keys})"
            )
        if not isinstance(obj["text"], str):
            raise MoepressError(
                f"{display} line {lineno}: \"text\" must be a string, got {type(obj['text']).__name__}"
            )
        if obj["text"].strip():
            texts.append(obj["text"])
    return RECORD_SEPARATOR.join(texts)


def _load_hf(spec: str, *, what: str) -> str:
    parts = spec[len("hf:"):].split(":")
    if not parts[0] or len(parts) > 3:
        raise MoepressError(f"bad dataset spec {spec!r}; use hf:NAME[:CONFIG][:SPLIT]")
    name = parts[0]
    config = parts[1] if len(parts) > 1 and parts[1] else None
    split = parts[2] if len(parts) > 2 and parts[2] else "train"
    try:
        import datasets  # type: ignore[import-not-found]
    except ImportError as e:
        raise MoepressError(
            f"{spec} needs the 'datasets' package (pip install datasets) and a network; "
            "offline, use a local .txt/.jsonl file or builtin:calib / builtin:eval"
        ) from e
    try:
        ds = datasets.load_dataset(name, config, split=split)
    except Exception as e:  # network, unknown name/config/split: all the user's input
        raise MoepressError(f"cannot load {what} dataset {spec}: {_one_line(e)}") from e
    if "text" not in ds.column_names:
        raise MoepressError(
            f"dataset {spec} has no \"text\" column (columns: {', '.join(ds.column_names)})"
        )
    text = RECORD_SEPARATOR.join(t for t in ds["text"] if isinstance(t, str) and t.strip())
    if not text.strip():
        raise MoepressError(f"{what} dataset is empty: {spec}")
    return text


def _one_line(e: BaseException) -> str:
    msg = " ".join(str(e).split())
    return msg[:300] or type(e).__name__


# ------------------------------------------------------------------ tokenizing

# A chunk may end after a newline that follows a non-space character and precedes
# one.  There, byte-level BPE tokenizers (GPT-2, Llama 3, Qwen, DeepSeek ...) cut
# the text into the same pieces whether or not it is split, so chunking does not
# change their token stream.
_BOUNDARY = re.compile(r"(?<=\S)\n(?=\S)")


def _chunks(text: str, chunk_chars: int) -> list[str]:
    out = []
    start, n = 0, len(text)
    while start < n:
        if n - start <= chunk_chars:
            out.append(text[start:])
            break
        m = _BOUNDARY.search(text, start + chunk_chars)
        if m is None:  # no safe place left: one last (long) chunk
            out.append(text[start:])
            break
        out.append(text[start:m.end()])
        start = m.end()
    return out


def tokenize_text(text: str, tokenizer: Any, *, chunk_chars: int = DEFAULT_CHUNK_CHARS) -> list[int]:
    """Token ids of ``text``, without special tokens (no BOS/EOS).

    A multi-megabyte string is tokenized as chunks of about ``chunk_chars``
    characters, in one batched call (a fast tokenizer runs them in parallel and
    warns about nothing).  Chunks are whole lines, nothing is dropped and
    newlines are kept: the chunks concatenate back to ``text`` exactly.  Each chunk
    ends after a newline between two non-blank characters, where byte-level BPE
    tokenizers give the same ids as for the unsplit text; a SentencePiece-style
    tokenizer that prepends a space to its input may differ by one token per
    chunk start.

    ``tokenizer`` is a Hugging Face tokenizer (callable on a list of strings with
    ``add_special_tokens=False``).
    """
    if chunk_chars < 1:
        raise ValueError(f"chunk_chars must be positive, got {chunk_chars}")
    if not text:
        return []
    chunks = _chunks(text, chunk_chars)
    try:
        enc = tokenizer(chunks, add_special_tokens=False, verbose=False)
    except TypeError:  # tokenizers without the verbose flag
        enc = tokenizer(chunks, add_special_tokens=False)
    ids: list[int] = []
    for piece in enc["input_ids"]:
        ids.extend(piece)
    return ids


def token_windows(
    text: str,
    tokenizer: Any,
    seq_len: int,
    num_windows: int | None = None,
    *,
    seed: int | None = None,
    what: str = "text",
    advice: str | None = None,
):
    """Cut ``text`` into non-overlapping windows of ``seq_len`` tokens.

    Returns a ``torch.LongTensor`` of shape ``[N, seq_len]``.  The text is
    tokenized once (:func:`tokenize_text`, no special tokens) and window ``i`` is
    tokens ``[i*seq_len, (i+1)*seq_len)`` of that stream; the tail that does not
    fill a window is dropped.  Windows never overlap: for perplexity every token
    is scored once, with the context of its own window only (simple and
    comparable across tools, though the first tokens of a window have less
    context, so perplexity comes out a bit higher than with a sliding window).

    With ``num_windows=None`` all windows are returned (at least one must fit).
    Otherwise exactly ``num_windows``: the first ones if ``seed`` is None, else a
    random choice without replacement drawn with ``torch.Generator().manual_seed(seed)``
    (the same seed gives the same windows), kept in text order.

    Raises :class:`~moepress.errors.MoepressError` when the text is too short,
    e.g. "calibration text has 812 tokens, need at least 4096 (128 samples x 32
    tokens); give a longer file or fewer --calib-samples".  ``what`` is the noun
    for the text in that message ("calibration", "evaluation"); ``advice``
    replaces its last clause (the default names ``--calib-samples`` for
    ``what="calibration"``).
    """
    import torch

    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 1:
        raise MoepressError(f"sequence length must be a positive integer, got {seq_len!r}")
    if num_windows is not None and (
        isinstance(num_windows, bool) or not isinstance(num_windows, int) or num_windows < 1
    ):
        raise MoepressError(f"number of samples must be a positive integer, got {num_windows!r}")

    ids = tokenize_text(text, tokenizer)
    available = len(ids) // seq_len
    wanted = 1 if num_windows is None else num_windows
    if available < wanted:
        noun = "text" if what == "text" else f"{what} text"
        if num_windows is None:
            need = f"need at least {seq_len} (one window of {seq_len} tokens)"
        else:
            need = f"need at least {wanted * seq_len} ({wanted} samples x {seq_len} tokens)"
        if advice is None:
            if what == "calibration":
                advice = "give a longer file or fewer --calib-samples"
            elif num_windows is None:
                advice = "give a longer text or a shorter sequence length"
            else:
                advice = "give a longer text or fewer samples"
        raise MoepressError(f"{noun} has {len(ids)} tokens, {need}; {advice}")

    stream = torch.tensor(ids[: available * seq_len], dtype=torch.long)
    windows = stream.view(available, seq_len)
    if num_windows is None:
        return windows
    if seed is None:
        return windows[:num_windows].clone()
    gen = torch.Generator().manual_seed(int(seed))
    pick = torch.randperm(available, generator=gen)[:num_windows]
    return windows[torch.sort(pick).values].clone()

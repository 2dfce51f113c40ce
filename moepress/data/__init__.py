"""Text for calibration, evaluation and (later) training small models.

``load_text`` reads a local file (plain text or JSONL, optionally gzip/xz),
the shipped English corpus (``builtin:calib``, ``builtin:eval``) or a
``datasets`` name (``hf:NAME[:CONFIG][:SPLIT]``); ``token_windows`` cuts text into
non-overlapping windows of token ids.  ``moepress.data.tokenizer.train_byte_bpe``
trains a tiny real tokenizer for test and zoo models.
"""

from moepress.data.corpus import (
    BUILTIN_SPLITS,
    CORPORA_DIR,
    builtin_manifest,
    builtin_path,
    load_text,
    token_windows,
    tokenize_text,
)

__all__ = [
    "BUILTIN_SPLITS",
    "CORPORA_DIR",
    "builtin_manifest",
    "builtin_path",
    "load_text",
    "token_windows",
    "tokenize_text",
]

"""A checkpoint's record, ``moepress.json``: its name and the one reader that refuses a folder without it.

Its own module so that what reads a checkpoint (the GGUF and compressed-tensors exports, distill,
evaluation) does not import the writer's dependencies (the layer pipeline, llama.cpp's outer types).
"""

from __future__ import annotations

import json
import os

from ..errors import MoepressError

MOEPRESS_JSON = "moepress.json"


def read_record(path: str) -> dict:
    """``moepress.json`` of a checkpoint folder, or a one-line error."""
    file = os.path.join(path, MOEPRESS_JSON)
    if not os.path.exists(file):
        raise MoepressError(f"{path} is not a moepress checkpoint (no {MOEPRESS_JSON}); compress a model first")
    try:
        with open(file) as f:
            return json.load(f)
    except json.JSONDecodeError as exc:
        raise MoepressError(f"{file} is not valid JSON ({exc}); the checkpoint is corrupt") from None


__all__ = ["MOEPRESS_JSON", "read_record"]

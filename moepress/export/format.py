"""Versions of moepress's checkpoint format.

1: one ``model.safetensors`` (or size-based shards), unit map in ``quantization_config``.
2: one shard per decoder layer plus one for the embeddings and head (written as the layers finish,
   so a run can stream and resume), ``model.safetensors.index.json``, per-layer timings in
   ``moepress.json``. Both load the same way.
3: zero points stored at the codes' own width: a quantized weight's ``zeros`` is uint8
   [*lead, ceil(out*n_groups/8)*bits], each matrix's zeros packed as one run
   (:mod:`moepress.quantize.packed`); 1 and 2 stored one uint8 per group, [*lead, out, n_groups].
   Loading a format 1/2 checkpoint expects that layout (and only it) and packs the zeros as they load.
"""

FORMAT_VERSION = 3
KNOWN_FORMAT_VERSIONS = (1, 2, 3)
PACKED_ZEROS_SINCE = 3  # the first format whose zero points are packed at the codes' width


def packs_zeros(version: int) -> bool:
    """Whether a checkpoint of format ``version`` stores its zero points packed at the codes' width."""
    return version >= PACKED_ZEROS_SINCE

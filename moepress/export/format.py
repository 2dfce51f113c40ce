"""Versions of moepress's checkpoint format.

1: one ``model.safetensors`` (or size-based shards), unit map in ``quantization_config``.
2: one shard per decoder layer plus one for the embeddings and head (written as the layers finish,
   so a run can stream and resume), ``model.safetensors.index.json``, per-layer timings in
   ``moepress.json``. Both load the same way.
"""

FORMAT_VERSION = 2
KNOWN_FORMAT_VERSIONS = (1, 2)

"""Weight quantization: specs, packing, RTN and batched (per-expert) GPTQ.

Pure tensor functions with no model knowledge: callers hand in weights
[*lead, out, in] and Hessians [E, in, in] and get `QuantizedWeight`s back.
"""

from .gptq import GPTQResult, gptq_quantize, gptq_quantize_segments, hessian_weighted_error
from .grid import dequantize_codes, fake_quantize, find_params, quantize_codes
from .packed import QuantizedWeight
from .packing import pack_bits, packed_width, unpack_bits
from .rtn import rtn_quantize
from .spec import QuantSpec

__all__ = [
    "QuantSpec",
    "QuantizedWeight",
    "GPTQResult",
    "gptq_quantize",
    "gptq_quantize_segments",
    "hessian_weighted_error",
    "rtn_quantize",
    "pack_bits",
    "unpack_bits",
    "packed_width",
    "find_params",
    "quantize_codes",
    "dequantize_codes",
    "fake_quantize",
]

from . import ggml_kquants  # noqa: E402,F401  (registers the k-quants with ggml_blocks.block_format)

"""Refinement of llama.cpp block formats on a layer's output: the float16 scales learned, the codes held.

This is ``--refine-params scales`` (:class:`~moepress.quantize.signround.SignRoundWeight`) for the
weights ``--target llamacpp`` stores as GGUF bytes (:class:`~.ggml_blocks.BlockQuantizedWeight`).
GPTQ's codes stay exactly as they are, and so do the k-quants' small integer sub-block scales and
minimums; what moves is every float16 value a block stores, the values llama.cpp multiplies by:

    format              stored per block             learned
    q4_0, q5_0, q8_0    d                            d = fp16(d0 * f)
    q4_1, q5_1          d, m (the block's minimum)   d as above, m = fp16(m0 + b * d0)
    q3_K, q6_K          d (of 256 inputs)            d as above; the sub-block scales sc_j held
    q2_K, q4_K, q5_K    d, dmin (of 256 inputs)      d and dmin = fp16(dmin0 * g); sc_j, m_j held

``f`` and ``g`` start at 1 and stay in :data:`~.signround.SCALE_RANGE`; ``b`` (in steps of the
block's own scale) starts at 0 and stays in [-1, 1]. The weight is linear in every learned value
with the codes held, so the loss is smooth and Adam lowers it from the first step, as on moepress's
own grids. Adam's step is :data:`BLOCK_SCALES_LR` up to 4 bits and halves with every bit above
(:func:`learning_rate`). It is a tenth of moepress's grids' :data:`~.signround.SCALES_LR`: measured
on the trained zoo (``--target llamacpp``, 128 x 256 calibration windows, 32 steps), 1e-2 raised
tiny-mixtral's q4_0 layer errors 7x after the first step and no layer ended below GPTQ's; 1e-3
lowered every layer's, by 5-35% (q4_0) and 13-20% (tiny-qwen3moe's q2_K); 3e-3 lost one layer. The float16 rounding is straight-through, so the forward computes exactly the values the
bytes will hold and llama.cpp will read.
"""

from __future__ import annotations

import torch

from .ggml_blocks import BlockQuantizedWeight
from .ggml_kquants import KQuantFormat
from .signround import SCALE_RANGE, ZERO_RANGE, Snapshots, _fp16_ste

BLOCK_SCALES_LR = 1e-3  # Adam's step for the block formats' float16 values up to 4 bits (see the module doc)


class BlockScalesWeight(Snapshots):
    """The learnable float16 values of one (batched) block-format weight; see the module docstring.

    The same interface as :class:`~.signround.SignRoundWeight` with ``learn="scales"``, which
    :mod:`moepress.refine` drives: :attr:`params`, :meth:`dequantize` (differentiable in them),
    :meth:`refine_step`, :meth:`state`/:meth:`restore`, :meth:`quantized` (GGUF bytes of the current
    values) and :attr:`keep_given` (fall back to the start, byte for byte).
    """

    learn = "scales"

    def __init__(self, start: BlockQuantizedWeight):
        self.given = self.start = start
        self.keep_given = False
        self.format = start.format
        self.kquant = isinstance(start.format, KQuantFormat)
        codes, scale, zero = start.unpack()
        self.codes = codes.reshape(*codes.shape[:-1], start.in_features // self.format.block, self.format.n_sub,
                                   self.format.sub)
        self.scale0, self.zero0 = scale.float(), zero.float()
        d0 = self.scale0[..., 0] if self.kquant else self.scale0
        self.scale_factor = torch.ones_like(d0, requires_grad=True)  # f
        self.min_param = None
        if self.format.has_min:  # g (k-quants: a factor on dmin) or b (q4_1/q5_1: a shift of m, in steps of d)
            init = torch.ones_like(d0) if self.kquant else torch.zeros_like(d0)
            self.min_param = init.requires_grad_(True)
        self._adam = None
        self.lr = learning_rate(self.format.bits)  # Adam's step; end-to-end distillation takes a smaller one

    @property
    def params(self) -> list[torch.Tensor]:
        return [p for p in (self.scale_factor, self.min_param) if p is not None]

    def _stored(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(scale, zero) as the bytes will store them, in :meth:`BlockFormat.unpack`'s layout."""
        if self.kquant:
            scale = torch.cat([_fp16_ste(self.scale0[..., :1] * self.scale_factor.unsqueeze(-1)),
                               self.scale0[..., 1:]], -1)
            zero = self.zero0
            if self.min_param is not None:
                zero = torch.cat([_fp16_ste(self.zero0[..., :1] * self.min_param.unsqueeze(-1)), self.zero0[..., 1:]],
                                 -1)
            return scale, zero
        scale = _fp16_ste(self.scale0 * self.scale_factor)
        zero = self.zero0 if self.min_param is None else _fp16_ste(self.zero0 + self.min_param * self.scale0)
        return scale, zero

    def dequantize(self) -> torch.Tensor:
        """W^ [*lead, out, in] float32 as llama.cpp computes it from the current values (differentiable);
        the start's values once :attr:`keep_given` is set."""
        if self.keep_given:
            return self.given.dequantize(torch.float32)
        scale, zero = self._stored()
        s, z = self.format.effective(scale, zero)  # [..., blocks, n_sub]
        w = self.format.dequantize(self.codes, s.unsqueeze(-1), z.unsqueeze(-1))
        return w.reshape(*self.start.shape)

    def refine_step(self, step: int, steps: int) -> None:
        """One Adam step of :attr:`lr` (:func:`learning_rate`) on the gradients :meth:`dequantize` received;
        then each value back into its range."""
        if self._adam is None:
            self._adam = torch.optim.Adam(self.params, lr=self.lr)
        self._adam.step()
        self._adam.zero_grad(set_to_none=True)
        with torch.no_grad():
            self.scale_factor.clamp_(*SCALE_RANGE)
            if self.min_param is not None:
                self.min_param.clamp_(*(SCALE_RANGE if self.kquant else ZERO_RANGE))

    @torch.no_grad()
    def quantized(self) -> BlockQuantizedWeight:
        """The current values as GGUF bytes in the start's format (the start itself with :attr:`keep_given`)."""
        if self.keep_given:
            return self.given
        scale, zero = self._stored()
        codes = self.codes.reshape(*self.start.shape)
        zero = zero if self.format.has_min else None
        return BlockQuantizedWeight(self.format.pack(codes, scale, zero), self.format, self.start.in_features,
                                    self.start.out_features)


def learning_rate(bits: int) -> float:
    """Adam's step for a ``bits``-bit block format: :data:`BLOCK_SCALES_LR` up to 4 bits, halved per bit
    above, as a finer grid's best scale change is smaller."""
    return BLOCK_SCALES_LR * min(1.0, 16 / 2**bits)


__all__ = ["BLOCK_SCALES_LR", "BlockScalesWeight", "learning_rate"]

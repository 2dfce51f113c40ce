"""Refined rounding of a GPTQ solution on a block's output: SignRound (Cheng et al. 2023, arXiv 2309.05516)
and, the default, the group scales alone with GPTQ's codes held.

``learn="scales"`` (the default of ``--refine``): the codes stay exactly GPTQ's; each group's scale is
learned (s = fp16(s0 * m), m in SCALE_RANGE, zeros held) with Adam on the block's output error. With
the codes fixed the stored weight is linear in the scales, so the loss is smooth and every step can
only trade the groups' sizes against each other: on the trained zoo it lowered every layer's output
error by 10-30% in 64 steps. ``learn="rounding"`` is SignRound proper (below); from GPTQ's codes its
signed steps flip whatever weights sit near a cell edge, whatever the size of their gradient, and
the layer's error rose before it fell (no zoo layer ended below GPTQ's in 200 steps).

SignRound learns, per weight, a rounding offset ``v`` in [-0.5, 0.5] and, per group, corrections of the
grid's scale and zero, by signed gradient descent on a block's output error. Here it refines a
:class:`~moepress.quantize.QuantizedWeight` that GPTQ produced, so the starting point is GPTQ's codes,
not round-to-nearest. For weights W [*lead, out, in] with GPTQ's codes q0, scales s0 and zeros z0::

    s     = fp16(s0 * m)                                 m per group, in [0.5, 1.5], starts at 1
    z     = clamp(round(z0 + b), 0, maxq)                b per group (asymmetric grids only), starts at 0
    u     = W / s + (q0 - z0 - W / s0) + v               v per weight, in [-0.5, 0.5], starts at 0
    codes = clamp(round(u) + z, 0, maxq)
    W^    = s * (codes - z)

At the start u = q0 - z0 exactly, the centre of GPTQ's rounding cell: ``v`` can move a code to a
neighbour, and a changed scale re-rounds the group around GPTQ's choice (the offset ``q0 - z0 - W/s0``
is what GPTQ's error feedback added to the plain rounding position). Rounding uses the straight-through
estimator (the paper's Eq. 3), the fp16 rounding of the scale too, so the forward computes exactly the
values that are stored: codes on the same grid ([0, maxq], the same group layout, g_idx kept), float16
scales, zeros at the weight's width. Everything is batched over the leading expert dimension.
"""

from __future__ import annotations

import torch

from .grid import symmetric_zero
from .packed import QuantizedWeight

SCALE_RANGE = (0.5, 1.5)  # the per-group scale correction m stays in here (scales stay positive)
ZERO_RANGE = (-1.0, 1.0)  # the per-group zero correction b: the zero moves by at most one code
CELL = 0.5 - 2**-10  # how far inside its rounding cell a weight may start
SCALES_LR = 1e-2  # Adam's step for the scale factors (learn="scales"); chosen on the zoo (benchmarks/refine.py)
LEARN = ("scales", "rounding")


def _round_ste(x: torch.Tensor) -> torch.Tensor:
    """round(x) forward, identity backward (the straight-through estimator)."""
    return x + (torch.round(x) - x).detach()


def _fp16_ste(x: torch.Tensor) -> torch.Tensor:
    """x rounded to float16 forward (the stored scale), identity backward."""
    return x + (x.to(torch.float16).float() - x).detach()


class Snapshots:
    """Copies of a learnable weight's :attr:`params`, to keep the best state seen and go back to it."""

    params: list[torch.Tensor]

    @torch.no_grad()
    def state(self) -> list[torch.Tensor]:
        return [p.detach().clone() for p in self.params]

    @torch.no_grad()
    def restore(self, state: list[torch.Tensor]) -> None:
        for p, saved in zip(self.params, state):
            p.copy_(saved)


class SignRoundWeight(Snapshots):
    """The learnable rounding of one (batched) quantized weight; see the module docstring.

    ``weight`` is the unquantized float weight [*lead, out, in] the packed ``start`` (GPTQ's) was
    quantized from. ``init`` "gptq" starts from ``start``'s codes and grid; "rtn" from nearest rounding
    on the weights' own min/max grid (auto-round's start), in the same format. :meth:`dequantize` is
    differentiable in :attr:`params`; :meth:`quantized` packs the current state in ``start``'s format;
    setting :attr:`keep_given` falls back to ``start`` itself, bit for bit. ``weight`` may be None with
    ``learn="scales"`` from GPTQ's codes, which never reads it (end-to-end distillation of a checkpoint).
    """

    def __init__(self, weight: torch.Tensor | None, start: QuantizedWeight, init: str = "gptq",
                 learn: str = "rounding"):
        if weight is None:
            if learn != "scales" or init != "gptq":
                raise ValueError("only learn='scales' from GPTQ's codes refines without the unquantized weight")
            weight = torch.zeros((), device=start.qweight.device).expand(start.shape)  # (no memory; never read)
        if tuple(weight.shape) != start.shape:
            raise ValueError(f"weight {tuple(weight.shape)} does not match the quantized weight {start.shape}")
        if init not in ("gptq", "rtn"):
            raise ValueError(f"init must be 'gptq' or 'rtn' (got {init!r})")
        if learn not in LEARN:
            raise ValueError(f"learn must be one of {LEARN} (got {learn!r})")
        self.learn = learn
        self._adam = None
        self.lr = SCALES_LR  # Adam's step (learn="scales"); end-to-end distillation takes a smaller one
        device = weight.device
        self.weight = weight.detach().float()
        self.given = start  # what the refinement falls back to (see keep_given)
        self.keep_given = False
        if init == "rtn":  # auto-round's start: nearest rounding on the min/max grid of the weights themselves
            start = _rtn_like(self.weight, start)
        self.start = start
        q0 = start.codes().to(device).float()
        self.scale0 = start.scales.to(device).float()  # [*lead, out, G]
        self.zero0 = None if start.zeros is None else start.zeros.to(device).float()
        self.maxq = float(start.maxq)
        lead, out_f, in_f = start.lead_shape, start.out_features, start.in_features
        if start.g_idx is not None:
            group = start.g_idx.to(device).long()  # [*lead, in]
        elif start.group_size is None:
            group = torch.zeros(in_f, dtype=torch.long, device=device)
        else:
            group = torch.arange(in_f, device=device) // start.group_size
        self._group = group.unsqueeze(-2).expand(*lead, out_f, in_f)  # [*lead, out, in]: each column's group
        self.scale_factor = torch.ones_like(self.scale0, requires_grad=True)  # m
        if learn == "scales":  # the codes are held: no offsets to learn
            self.codes0 = q0
            self.round_offset = self.zero_shift = None
            return
        z0 = self._columns(self.zero0) if self.zero0 is not None else symmetric_zero(start.bits)
        position = self.weight / self._columns(self.scale0)
        # Each weight sits in GPTQ's rounding cell where the unquantized weight sits in its own
        # nearest-rounding cell (the residual, a hair inside the cell so it still rounds to GPTQ's code).
        residual = (position - torch.round(position)).clamp(-CELL, CELL)
        self.offset = q0 - z0 + residual - position
        del q0, position, residual
        self.round_offset = torch.zeros_like(self.weight, requires_grad=True)  # v
        self.zero_shift = None if self.zero0 is None else torch.zeros_like(self.zero0, requires_grad=True)  # b

    @property
    def params(self) -> list[torch.Tensor]:
        return [p for p in (self.round_offset, self.scale_factor, self.zero_shift) if p is not None]

    def _columns(self, per_group: torch.Tensor) -> torch.Tensor:
        """[*lead, out, G] -> [*lead, out, in] by each column's group (differentiable in the source)."""
        return per_group.gather(-1, self._group)

    def _grid(self) -> tuple[torch.Tensor, torch.Tensor | float]:
        """(scale, zero) per group as stored: float16-valued scales, integer zeros."""
        scale = _fp16_ste(self.scale0 * self.scale_factor)
        if self.learn == "scales":
            return scale, symmetric_zero(self.start.bits) if self.zero0 is None else self.zero0
        if self.zero0 is None:
            return scale, symmetric_zero(self.start.bits)
        return scale, torch.clamp(_round_ste(self.zero0 + self.zero_shift), 0, self.maxq)

    def _codes(self, scale: torch.Tensor, zero) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | float]:
        scale_c = self._columns(scale)
        zero_c = self._columns(zero) if isinstance(zero, torch.Tensor) else zero
        if self.learn == "scales":
            return self.codes0, scale_c, zero_c
        u = self.weight / scale_c + self.offset + self.round_offset
        return torch.clamp(_round_ste(u) + zero_c, 0, self.maxq), scale_c, zero_c

    def dequantize(self) -> torch.Tensor:
        """W^ [*lead, out, in] float32, differentiable in :attr:`params` (straight-through rounding);
        the given weight's values (no gradient) once :attr:`keep_given` is set."""
        if self.keep_given:
            return self.given.dequantize(torch.float32).to(self.weight.device)
        scale, zero = self._grid()
        codes, scale_c, zero_c = self._codes(scale, zero)
        return scale_c * (codes - zero_c)

    def refine_step(self, step: int, steps: int) -> None:
        """Step ``step`` of ``steps`` on the gradients :meth:`dequantize`'s output received: an Adam step
        of :attr:`lr` (:data:`SCALES_LR`) on the scale factors (``learn="scales"``), or SignRound's signed step on its
        linearly decaying schedule (``learn="rounding"``)."""
        if self.learn == "rounding":
            self.step(learning_rate(step, steps))
            return
        if self._adam is None:
            self._adam = torch.optim.Adam([self.scale_factor], lr=self.lr)
        self._adam.step()
        self._adam.zero_grad(set_to_none=True)
        with torch.no_grad():
            self.scale_factor.clamp_(*SCALE_RANGE)

    @torch.no_grad()
    def step(self, lr: float, grid_lr: float | None = None) -> None:
        """One signed gradient step (the paper's Eq. 4): ``lr`` for the rounding offsets, ``grid_lr``
        (default ``lr``) for the scale and zero corrections; then each back into its range."""
        if self.learn != "rounding":
            raise ValueError("signed steps are SignRound's (learn='rounding'); use refine_step")
        grid_lr = lr if grid_lr is None else grid_lr
        for p in self.params:
            if p.grad is not None:
                p.sub_((lr if p is self.round_offset else grid_lr) * p.grad.sign())
                p.grad = None
        self.round_offset.clamp_(-0.5, 0.5)
        self.scale_factor.clamp_(*SCALE_RANGE)
        if self.zero_shift is not None:
            self.zero_shift.clamp_(*ZERO_RANGE)

    @torch.no_grad()
    def quantized(self) -> QuantizedWeight:
        """The current rounding packed in the start's format (bits, groups, g_idx, symmetry); the given
        weight itself once :attr:`keep_given` is set."""
        if self.keep_given:
            return self.given
        scale, zero = self._grid()
        codes, _, _ = self._codes(scale, zero)
        start = self.start
        return QuantizedWeight.from_codes(codes, scale, None if start.zeros is None else zero, bits=start.bits,
                                          group_size=start.group_size, g_idx=start.g_idx)


def _rtn_like(weight: torch.Tensor, like: QuantizedWeight) -> QuantizedWeight:
    """Round-to-nearest of ``weight`` in ``like``'s format (its bits, groups, g_idx and symmetry)."""
    from .grid import find_params, quantize_codes

    *lead, out_f, in_f = weight.shape
    if like.g_idx is not None:
        group = like.g_idx.to(weight.device).long()
    elif like.group_size is None:
        group = torch.zeros(in_f, dtype=torch.long, device=weight.device)
    else:
        group = torch.arange(in_f, device=weight.device) // like.group_size
    n_groups = like.n_groups
    scales, zeros = [], []
    for g in range(n_groups):  # (a few groups per row: 1 to in / 32)
        cols = group == g if group.ndim == 1 else None
        if cols is None:  # per-expert g_idx: gather each expert's columns of group g
            raise ValueError("init='rtn' does not support dynamic act-order weights")
        s, z = find_params(weight[..., cols], like.bits, like.symmetric)
        scales.append(s)
        zeros.append(z)
    scale, zero = torch.stack(scales, -1), torch.stack(zeros, -1)
    index = group.expand(*lead, out_f, in_f)
    codes = quantize_codes(weight, scale.gather(-1, index), zero.gather(-1, index), like.bits)
    return QuantizedWeight.from_codes(codes, scale, None if like.symmetric else zero, bits=like.bits,
                                      group_size=like.group_size, g_idx=like.g_idx)


def learning_rate(step: int, steps: int, lr: float | None = None) -> float:
    """SignRound's schedule: ``lr`` (default 1 / steps, the paper's) decayed linearly to 0, so that the
    offsets can travel at most about half a code in total."""
    base = 1.0 / steps if lr is None else lr
    return base * (1.0 - step / steps)


__all__ = ["LEARN", "SCALES_LR", "SCALE_RANGE", "ZERO_RANGE", "SignRoundWeight", "learning_rate"]

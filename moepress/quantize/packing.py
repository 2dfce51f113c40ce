"""Dense bit packing of integer codes: every weight costs exactly `bits` bits.

Layout (little endian, along the last dimension): 8 consecutive codes
c_0..c_7 form one 8*bits-bit word  sum_k c_k << (k*bits), stored as `bits`
bytes, least significant byte first. So 3-bit codes take 3 bytes per 8
weights (not 4 bits each as with nibble packing), and the size of a packed
row is exactly ceil(n/8)*bits bytes. n is padded with zero codes up to a
multiple of 8; `unpack_bits` needs the true n to drop the padding.

All work is done with int64 shifts on whole tensors (8*bits <= 32 for the
sub-byte widths, so a word never touches the sign bit); 8 bits is the
identity (up to the zero padding).
"""

from __future__ import annotations

import torch

PACKABLE_BITS = (2, 3, 4, 8)


def packed_width(n: int, bits: int) -> int:
    """Bytes per packed row of n codes: ceil(n/8) words of `bits` bytes."""
    return -(-n // 8) * bits


def _check_bits(bits: int) -> None:
    if bits not in PACKABLE_BITS:
        raise ValueError(f"bits must be one of 2, 3, 4, 8 (got {bits!r})")


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack uint8 codes [..., n] (each < 2**bits) into uint8 [..., ceil(n/8)*bits]."""
    _check_bits(bits)
    if codes.dtype != torch.uint8:
        raise ValueError(f"codes must be uint8 (got {codes.dtype})")
    if codes.ndim == 0:
        raise ValueError("codes must have at least one dimension")
    n = codes.shape[-1]
    if codes.numel() and not codes.is_meta and int(codes.max()) >= 2**bits:  # (meta: a skeleton's shapes)
        raise ValueError(f"codes do not fit in {bits} bits (max code {int(codes.max())})")
    lead = codes.shape[:-1]
    pad = (-n) % 8
    if bits == 8:
        # identity, padded like every other width so the size is ceil(n/8)*bits
        return torch.nn.functional.pad(codes, (0, pad)) if pad else codes.clone()
    c = codes.to(torch.int64)
    if pad:
        c = torch.nn.functional.pad(c, (0, pad))
    c = c.reshape(*lead, (n + pad) // 8, 8)
    # word = sum_k c_k << (k*bits); fields are disjoint so the sum is an OR.
    shifts = torch.arange(8, device=codes.device, dtype=torch.int64) * bits
    word = (c << shifts).sum(dim=-1, keepdim=True)
    # split the 8*bits-bit word into `bits` little-endian bytes
    byte_shifts = torch.arange(bits, device=codes.device, dtype=torch.int64) * 8
    out = (word >> byte_shifts) & 0xFF
    return out.reshape(*lead, ((n + pad) // 8) * bits).to(torch.uint8)


def unpack_bits(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of `pack_bits`: uint8 [..., ceil(n/8)*bits] -> uint8 codes [..., n]."""
    _check_bits(bits)
    if packed.dtype != torch.uint8:
        raise ValueError(f"packed codes must be uint8 (got {packed.dtype})")
    if packed.ndim == 0:
        raise ValueError("packed codes must have at least one dimension")
    want = packed_width(n, bits)
    if packed.shape[-1] != want:
        raise ValueError(
            f"packed last dimension is {packed.shape[-1]} bytes but {n} codes of {bits} bits need {want}"
        )
    if bits == 8:
        return packed[..., :n].clone()
    lead = packed.shape[:-1]
    b = packed.to(torch.int64).reshape(*lead, want // bits, bits)
    byte_shifts = torch.arange(bits, device=packed.device, dtype=torch.int64) * 8
    word = (b << byte_shifts).sum(dim=-1, keepdim=True)
    shifts = torch.arange(8, device=packed.device, dtype=torch.int64) * bits
    codes = (word >> shifts) & (2**bits - 1)
    return codes.reshape(*lead, (want // bits) * 8)[..., :n].to(torch.uint8)


def pack_matrix(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack uint8 codes [..., rows, cols] of each trailing matrix as one run of rows*cols codes
    (row-major) into uint8 [..., ceil(rows*cols/8)*bits].

    For small per-row counts (the zero points of a weight: one per group, a handful per row) this
    pads each matrix once to a multiple of 8 codes instead of each row: per-channel zero points
    at 2 bits cost 2 bits each, not the 16 a row padded to 8 codes would.
    """
    if codes.ndim < 2:
        raise ValueError(f"pack_matrix needs codes with at least 2 dims (got shape {tuple(codes.shape)})")
    return pack_bits(codes.reshape(*codes.shape[:-2], codes.shape[-2] * codes.shape[-1]), bits)


def unpack_matrix(packed: torch.Tensor, bits: int, rows: int, cols: int) -> torch.Tensor:
    """Inverse of `pack_matrix`: uint8 [..., ceil(rows*cols/8)*bits] -> uint8 [..., rows, cols]."""
    codes = unpack_bits(packed, bits, rows * cols)
    return codes.reshape(*codes.shape[:-1], rows, cols)

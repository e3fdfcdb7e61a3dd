"""Dense bit-packing of integer codes (1..8 bits per code) into bytes.

Layout: the flat code vector is split into chunks of 8 codes; a chunk of b-bit codes is one
8·b-bit little-endian integer (code j occupies bits [b·j, b·j + b)), stored as b bytes. So 3-bit
codes take 3 bytes per 8 codes (no byte per code), 2-bit codes 2 bytes per 8, 4-bit 4 bytes per 8.
The last chunk is zero-padded; `packed_nbytes` gives the exact stored size. 8-bit codes are
stored one per byte, unpadded.
"""

from __future__ import annotations

import torch

CHUNK = 8  # codes per chunk; a chunk of b-bit codes is exactly b bytes


def packed_nbytes(n_codes: int, bits: int) -> int:
    """Bytes needed to store ``n_codes`` codes of ``bits`` bits each."""
    _check_bits(bits)
    if bits == 8:
        return n_codes
    return -(-n_codes // CHUNK) * bits


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer codes in [0, 2**bits) (any shape, read flat) into a uint8 vector."""
    _check_bits(bits)
    flat = codes.reshape(-1).to(torch.int64)  # (n,)
    if bits == 8:
        return flat.to(torch.uint8)
    n = flat.numel()
    pad = (-n) % CHUNK
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    chunks = flat.view(-1, CHUNK)  # (n/8, 8)
    shifts = torch.arange(CHUNK, device=flat.device, dtype=torch.int64) * bits  # (8,)
    word = (chunks << shifts).sum(dim=1)  # (n/8,) holds 8·bits ≤ 56 bits
    byte_shifts = torch.arange(bits, device=flat.device, dtype=torch.int64) * 8  # (bits,)
    out = (word.unsqueeze(1) >> byte_shifts) & 0xFF  # (n/8, bits)
    return out.reshape(-1).to(torch.uint8)


def unpack(packed: torch.Tensor, bits: int, n_codes: int) -> torch.Tensor:
    """Inverse of :func:`pack`: returns ``n_codes`` codes as a uint8 vector."""
    _check_bits(bits)
    if packed.numel() != packed_nbytes(n_codes, bits):
        raise ValueError(f"packed buffer has {packed.numel()} bytes, expected {packed_nbytes(n_codes, bits)}")
    if bits == 8:
        return packed.reshape(-1).clone()
    by = packed.reshape(-1, bits).to(torch.int64)  # (n/8, bits)
    byte_shifts = torch.arange(bits, device=packed.device, dtype=torch.int64) * 8
    word = (by << byte_shifts).sum(dim=1)  # (n/8,)
    shifts = torch.arange(CHUNK, device=packed.device, dtype=torch.int64) * bits
    codes = (word.unsqueeze(1) >> shifts) & ((1 << bits) - 1)  # (n/8, 8)
    return codes.reshape(-1)[:n_codes].to(torch.uint8)


def _check_bits(bits: int) -> None:
    if not (isinstance(bits, int) and 1 <= bits <= 8):
        raise ValueError(f"bits must be an integer in 1..8, got {bits!r}")

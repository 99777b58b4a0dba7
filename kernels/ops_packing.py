"""Packing of small symbols into bytes, on either device (see :mod:`.ops`): b-bit fields and
base-ρ digits, the densest of the two for a symbol alphabet, coset symbols, and (x + y) mod ρ
symbol by symbol on packed bytes (the ring transport's addition)."""

from __future__ import annotations

import torch

from . import table
from .dispatch import launch, output, vec
from .sizes import coset_bits, integer, packed_bytes, radix_per_byte, symbol_packing


def fused_packing(alphabet: int) -> tuple[int, int, int, int]:
    """(radix, nbits, per_byte, group) of :func:`symbol_packing`'s choice for the fused kernels:
    radix > 0 for radix packing, else nbits; group = symbols per packing unit."""
    kind, v = symbol_packing(alphabet)
    return (alphabet, 0, v, v) if kind == "radix" else (0, v, 8, 8)


def bitpack(symbols: torch.Tensor, nbits: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """Pack uint8 symbols < 2^b (b = nbits ∈ 1..8) into ⌈n·b/8⌉ bytes, little-endian bit order."""
    vec("symbols", symbols, torch.uint8)
    nbits = integer("nbits", nbits, 1, 8)
    n = symbols.numel()
    out = output(out, "out", packed_bytes(n, nbits), torch.uint8, symbols)
    launch(table.bitpack, (n + 7) // 8, symbols, nbits, out)
    return out


def bitunpack(packed: torch.Tensor, nbits: int, n: int, out: torch.Tensor | None = None) -> torch.Tensor:
    vec("packed", packed, torch.uint8)
    nbits = integer("nbits", nbits, 1, 8)
    if packed.numel() != packed_bytes(n, nbits):
        raise ValueError(f"packed has {packed.numel()} bytes, {n} codes of {nbits} bits need "
                         f"{packed_bytes(n, nbits)}")
    out = output(out, "out", n, torch.uint8, packed)
    launch(table.bitunpack, (n + 7) // 8, packed, nbits, out)
    return out


def radixpack(symbols: torch.Tensor, radix: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """Pack symbols < radix, m = radix_per_byte(radix) per byte: byte = Σ_j s_j·radix^j."""
    vec("symbols", symbols, torch.uint8)
    m = radix_per_byte(radix)
    nbytes = (symbols.numel() + m - 1) // m
    out = output(out, "out", nbytes, torch.uint8, symbols)
    launch(table.radixpack, nbytes, symbols, radix, m, out)
    return out


def radixunpack(packed: torch.Tensor, radix: int, n: int, out: torch.Tensor | None = None) -> torch.Tensor:
    vec("packed", packed, torch.uint8)
    m = radix_per_byte(radix)
    if packed.numel() != (n + m - 1) // m:
        raise ValueError(f"packed has {packed.numel()} bytes, {n} symbols need {(n + m - 1) // m}")
    out = output(out, "out", n, torch.uint8, packed)
    launch(table.radixunpack, packed.numel(), packed, radix, m, out)
    return out


def pack_symbols(symbols: torch.Tensor, alphabet: int) -> torch.Tensor:
    """Symbols in [0, alphabet) packed with :func:`symbol_packing`'s choice."""
    kind, v = symbol_packing(alphabet)
    return bitpack(symbols, v) if kind == "bits" else radixpack(symbols, alphabet)


def unpack_symbols(packed: torch.Tensor, alphabet: int, n: int) -> torch.Tensor:
    kind, v = symbol_packing(alphabet)
    return bitunpack(packed, v, n) if kind == "bits" else radixunpack(packed, alphabet, n)


def pack_cosets(symbols: torch.Tensor, nesting_ratio: int) -> torch.Tensor:
    """Coset symbols in [0, ρ) packed densely: log2 ρ bits each, or radix-ρ bytes."""
    b = coset_bits(nesting_ratio)
    return bitpack(symbols, b) if b is not None else radixpack(symbols, nesting_ratio)


def unpack_cosets(packed: torch.Tensor, nesting_ratio: int, n: int) -> torch.Tensor:
    b = coset_bits(nesting_ratio)
    return bitunpack(packed, b, n) if b is not None else radixunpack(packed, nesting_ratio, n)


def modadd_cosets(x: torch.Tensor, y: torch.Tensor, nesting_ratio: int,
                  out: torch.Tensor | None = None) -> torch.Tensor:
    """(x + y) mod ρ symbol by symbol, on packed bytes (as :func:`pack_cosets` lays them out)."""
    vec("x", x, torch.uint8)
    vec("y", y, torch.uint8, x.numel())
    out = output(out, "out", x.numel(), torch.uint8, x)
    b = coset_bits(nesting_ratio)
    if b is not None:
        launch(table.modadd_bits, (x.numel() + b - 1) // b, x, y, b, out)
    else:
        launch(table.modadd_radix, x.numel(), x, y, nesting_ratio, radix_per_byte(nesting_ratio), out)
    return out

"""Tile settings of the Pallas (Triton) kernels: one frozen, keyword-only dataclass per op.

An op is a reference, backends and a config (as in openxla/tokamax): the GEMM ops
(`int8_matmul`, `w4a8_matmul`, and `int8_conv2d`, which runs im2col + the same GEMM) take
``tiles: GemmTiles | None``, `quantize_activation` takes ``tiles: QuantizeTiles | None``;
``None`` means the class defaults. The settings only shape the Pallas kernel (the "xla" and
"reference" backends ignore them) and never change a result: every tile size gives the same
codes, bit for bit. They are validated when the config is built, so a bad value fails with the
field's name before any tracing. The values are not tuned on a GPU here.

The configs are frozen (hashable): they can be static arguments of `jax.jit`.
"""

from __future__ import annotations

import dataclasses
from typing import TypeVar

MIN_BLOCK = 16
"""Smallest tile edge: Triton tiles are powers of two and ``tt.dot`` needs every dim >= 16."""


def _check_power_of_two(owner: object, name: str, minimum: int) -> None:
    value = getattr(owner, name)
    where = f"{type(owner).__name__}.{name}"
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError(f"{where} must be an int, got {value!r}")
    if value < minimum or value & (value - 1):
        raise ValueError(f"{where} must be a power of two >= {minimum}, got {value}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class GemmTiles:
    """Tiles of the int8 GEMM kernel (``int8_matmul``, ``w4a8_matmul``, ``int8_conv2d``).

    block_m: rows of x per output tile; ``None`` picks ``min(128, next_pow2(M))``
        (`block_m_for`).
    block_n: output columns per tile.
    block_k: reduction depth per step of the in-kernel K loop (for packed weights: packed rows
        per step; each step then issues ``8 // bits`` dots of depth block_k).
    num_warps, num_stages: Triton launch settings.

    Block sizes are powers of two >= 16; num_warps a power of two >= 1; num_stages >= 1.
    """

    block_m: int | None = None
    block_n: int = 128
    block_k: int = 64
    num_warps: int = 4
    num_stages: int = 3

    def __post_init__(self) -> None:
        if self.block_m is not None:
            _check_power_of_two(self, "block_m", MIN_BLOCK)
        _check_power_of_two(self, "block_n", MIN_BLOCK)
        _check_power_of_two(self, "block_k", MIN_BLOCK)
        _check_power_of_two(self, "num_warps", 1)
        if not isinstance(self.num_stages, int) or isinstance(self.num_stages, bool):
            raise ValueError(f"GemmTiles.num_stages must be an int, got {self.num_stages!r}")
        if self.num_stages < 1:
            raise ValueError(f"GemmTiles.num_stages must be >= 1, got {self.num_stages}")

    def block_m_for(self, m: int) -> int:
        """`block_m`, or for ``None`` the smallest power of two >= M clamped to [16, 128]."""
        if self.block_m is not None:
            return self.block_m
        return min(128, max(MIN_BLOCK, 1 << max(m - 1, 0).bit_length()))


@dataclasses.dataclass(frozen=True, kw_only=True)
class QuantizeTiles:
    """Tiles of the activation-quantization kernel (``quantize_activation``).

    block: elements of the flattened input per program (a power of two >= 16).
    num_warps: Triton launch setting (a power of two >= 1).
    """

    block: int = 4096
    num_warps: int = 4

    def __post_init__(self) -> None:
        _check_power_of_two(self, "block", MIN_BLOCK)
        _check_power_of_two(self, "num_warps", 1)


Tiles = TypeVar("Tiles", GemmTiles, QuantizeTiles)


def resolve_tiles(tiles: Tiles | None, kind: type[Tiles]) -> Tiles:
    """`tiles`, or the defaults of `kind` for ``None``; a TypeError for another config class."""
    if tiles is None:
        return kind()
    if not isinstance(tiles, kind):
        raise TypeError(f"tiles must be a {kind.__name__} or None, got {type(tiles).__name__}")
    return tiles

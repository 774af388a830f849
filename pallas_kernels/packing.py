"""Sub-byte weight storage: signed int4 (two per byte) and int2 (four per byte).

Layout ("segment packing" along the reduction axis K = axis 0). With r = 8 // bits values
per byte and S = K // r, byte ``packed[j]`` holds the values of rows ``j, j + S, ..., j + (r-1)S``
in bit fields ``[0, bits), [bits, 2 bits), ...`` (two's complement inside each field).

Why segments rather than adjacent pairs: a GEMM kernel that reads packed rows ``[t, t + bk)``
then needs activation columns ``[s S + t, s S + t + bk)`` for each field ``s``: r contiguous
tiles and r plain dots, with no interleave/shuffle of the unpacked weights inside the kernel.
The format does not depend on any block size.

Bytes are stored as int8 so unpacking is two shifts: ``(byte << (8 - bits (s + 1))) >> (8 - bits)``
with an arithmetic right shift sign-extends field ``s``. K must be a multiple of r (a
ValueError otherwise; every SDXL layer satisfies this).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

PACKED_BITS = (4, 2)


def values_per_byte(bits: int) -> int:
    """Number of `bits`-wide fields in one byte (2 for int4, 4 for int2)."""
    if bits not in PACKED_BITS:
        raise ValueError(f"packed weights support bits in {PACKED_BITS}, got {bits}")
    return 8 // bits


def pack_weights(w: jax.Array, bits: int) -> jax.Array:
    """Packs signed `bits`-bit integers (any int dtype) along axis 0 into int8 bytes.

    Values must lie in [-2**(bits-1), 2**(bits-1) - 1]; only their low `bits` bits are kept.
    """
    r = values_per_byte(bits)
    w = jnp.asarray(w)
    if not jnp.issubdtype(w.dtype, jnp.integer):
        raise TypeError(f"pack_weights expects integer values, got {w.dtype}")
    if w.ndim < 1 or w.shape[0] % r:
        raise ValueError(
            f"int{bits} packing needs axis 0 (K) to be a multiple of {r}; got shape {w.shape}"
        )
    seg = w.shape[0] // r
    fields = w.astype(jnp.int32).reshape(r, seg, *w.shape[1:]) & ((1 << bits) - 1)
    byte = jnp.zeros(fields.shape[1:], jnp.int32)
    for s in range(r):
        byte = byte | (fields[s] << (bits * s))
    return jax.lax.bitcast_convert_type(byte.astype(jnp.uint8), jnp.int8)


def unpack_field(packed: jax.Array, bits: int, s: int) -> jax.Array:
    """Field `s` of every int8 byte, sign-extended, as int8 (pure shifts; used in kernels)."""
    return jnp.right_shift(
        jnp.left_shift(packed, jnp.int8(8 - bits * (s + 1))), jnp.int8(8 - bits)
    )


def unpack_weights(packed: jax.Array, bits: int) -> jax.Array:
    """Inverse of `pack_weights`: int8 bytes (S, ...) -> int8 values (S * 8 // bits, ...)."""
    r = values_per_byte(bits)
    packed = jnp.asarray(packed)
    if packed.dtype != jnp.int8:
        raise TypeError(f"packed weights are stored as int8, got {packed.dtype}")
    parts = [unpack_field(packed, bits, s) for s in range(r)]
    return jnp.concatenate(parts, axis=0)


def pack_int4(w: jax.Array) -> jax.Array:
    """Two signed int4 values per byte along axis 0 (see module docstring for the layout)."""
    return pack_weights(w, 4)


def unpack_int4(packed: jax.Array) -> jax.Array:
    return unpack_weights(packed, 4)


def pack_int2(w: jax.Array) -> jax.Array:
    """Four signed int2 values per byte along axis 0 (see module docstring for the layout)."""
    return pack_weights(w, 2)


def unpack_int2(packed: jax.Array) -> jax.Array:
    return unpack_weights(packed, 2)

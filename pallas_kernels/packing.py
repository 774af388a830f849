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


# --- group-segment packing (W4A4: SVDQuant's group-scaled int4) ----------------------------
# The same segment layout applied inside every group of `group` rows along K: with
# ``h = group // 2``, byte ``g h + j`` (j < h) holds row ``g group + j`` in its low nibble and row
# ``g group + h + j`` in its high nibble. A K tile of packed rows that is a multiple of ``h``
# (and starts at one) covers whole groups, so a kernel scales each group's int32 partial product
# without a shuffle; ``group = K`` is exactly `pack_int4`.


def _check_group(group: int, k: int, shape: tuple[int, ...], what: str) -> None:
    if not isinstance(group, int) or isinstance(group, bool) or group < 2 or group % 2:
        raise ValueError(f"group must be an even int >= 2, got {group!r}")
    if k % group:
        raise ValueError(
            f"{what}: K = {k} (axis 0) must be a multiple of group={group} (zero-pad K); "
            f"got shape {shape}"
        )


def pack_group_weights(w: jax.Array, group: int) -> jax.Array:
    """Signed int4 codes (K, ...) of any int dtype -> (K // 2, ...) int8 bytes, packed per group
    of `group` rows (see above). Values must lie in [-8, 7]; only their low 4 bits are kept."""
    w = jnp.asarray(w)
    if not jnp.issubdtype(w.dtype, jnp.integer):
        raise TypeError(f"pack_group_weights expects integer values, got {w.dtype}")
    if w.ndim < 1:
        raise ValueError(f"pack_group_weights needs at least 1 dimension, got shape {w.shape}")
    _check_group(group, w.shape[0], w.shape, "pack_group_weights")
    g, rest = w.shape[0] // group, w.shape[1:]
    fields = w.astype(jnp.int32).reshape(g, 2, group // 2, *rest) & 0xF
    byte = fields[:, 0] | (fields[:, 1] << 4)
    return jax.lax.bitcast_convert_type(byte.astype(jnp.uint8), jnp.int8).reshape(-1, *rest)


def unpack_group_weights(packed: jax.Array, group: int) -> jax.Array:
    """Inverse of `pack_group_weights`: int8 bytes (K // 2, ...) -> int8 codes (K, ...)."""
    packed = jnp.asarray(packed)
    if packed.dtype != jnp.int8:
        raise TypeError(f"packed weights are stored as int8, got {packed.dtype}")
    if packed.ndim < 1:
        raise ValueError(f"unpack_group_weights needs at least 1 dimension, got {packed.shape}")
    _check_group(group, 2 * packed.shape[0], packed.shape, "unpack_group_weights (2 x axis 0)")
    rest = packed.shape[1:]
    p = packed.reshape(-1, group // 2, *rest)
    both = jnp.stack([unpack_field(p, 4, 0), unpack_field(p, 4, 1)], axis=1)
    return both.reshape(-1, *rest)

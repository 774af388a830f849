"""Packing: round trips, the documented byte layout, and clear errors."""

import numpy as np
import pytest

from pallas_kernels import pack_int2, pack_int4, pack_weights, unpack_int2, unpack_int4


@pytest.mark.parametrize(
    ("pack", "unpack", "lo", "hi", "r"),
    [(pack_int4, unpack_int4, -8, 7, 2), (pack_int2, unpack_int2, -2, 1, 4)],
)
def test_round_trip_random_with_extremes(pack, unpack, lo, hi, r):
    rng = np.random.default_rng(0)
    w = rng.integers(lo, hi + 1, size=(8 * r, 13)).astype(np.int8)
    w[0, :] = lo
    w[-1, :] = hi
    w[:, 0] = np.resize([lo, hi], w.shape[0])
    packed = np.asarray(pack(w))
    assert packed.dtype == np.int8 and packed.shape == (8, 13)
    np.testing.assert_array_equal(np.asarray(unpack(packed)), w)


def test_round_trip_all_byte_values():
    """Every byte decodes and re-encodes to itself (the format has no invalid bytes)."""
    all_bytes = np.arange(-128, 128, dtype=np.int8).reshape(256, 1)
    for bits, pack, unpack in ((4, pack_int4, unpack_int4), (2, pack_int2, unpack_int2)):
        np.testing.assert_array_equal(np.asarray(pack(unpack(all_bytes))), all_bytes, err_msg=bits)


def _numpy_pack(w, bits):
    """Independent statement of the layout: byte j holds rows j + s*S in bits [s*b, (s+1)*b)."""
    r = 8 // bits
    seg = w.shape[0] // r
    out = np.zeros((seg,) + w.shape[1:], np.uint8)
    for s in range(r):
        out |= ((w[s * seg : (s + 1) * seg].astype(np.int64) & (2**bits - 1)) << (bits * s)).astype(
            np.uint8
        )
    return out.view(np.int8)


@pytest.mark.parametrize("bits", [4, 2])
def test_layout_matches_documented_segments(bits):
    rng = np.random.default_rng(1)
    lim = 2 ** (bits - 1)
    w = rng.integers(-lim, lim, size=(24, 5)).astype(np.int8)
    np.testing.assert_array_equal(np.asarray(pack_weights(w, bits)), _numpy_pack(w, bits))


def test_known_bytes():
    # int4: row 0 = 1 (low nibble), row 1 = -1 (high nibble 0xF) -> 0xF1 = -15 as int8.
    assert int(np.asarray(pack_int4(np.array([[1], [-1]], np.int8)))[0, 0]) == -15
    # int2: rows (1, -2, 0, -1) -> fields 01, 10, 00, 11 -> 0b11_00_10_01 = 0xC9 = -55.
    assert int(np.asarray(pack_int2(np.array([[1], [-2], [0], [-1]], np.int8)))[0, 0]) == -55


def test_errors():
    with pytest.raises(ValueError, match="multiple of 2"):
        pack_int4(np.zeros((7, 3), np.int8))
    with pytest.raises(ValueError, match="multiple of 4"):
        pack_int2(np.zeros((6, 3), np.int8))
    with pytest.raises(ValueError, match="bits"):
        pack_weights(np.zeros((6, 3), np.int8), 3)
    with pytest.raises(TypeError):
        pack_int4(np.zeros((4, 3), np.float32))
    with pytest.raises(TypeError):
        unpack_int4(np.zeros((4, 3), np.uint8))

"""W4A4 group-scaled GEMM with a low-rank epilogue: every backend against a numpy float64
statement of the contract (computed from the unpacked codes, not through the module), the
group-segment packing, argument errors, and the CUDA (Triton) lowering."""

import dataclasses
import functools
import re

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from pallas_kernels import (
    GemmTiles,
    pack_group_weights,
    pack_int4,
    unpack_group_weights,
    w4a4_matmul,
    w4a4_matmul_reference,
)
from pallas_kernels.grid import group_codes

F32_EPS = float(np.finfo(np.float32).eps)
FINAL_ROUNDING = {"float32": 0.0, "bfloat16": 2.0**-8, "float16": 2.0**-10}
BACKENDS = ["pallas", "xla", "reference"]
SMALL = GemmTiles(block_m=32, block_n=32, block_k=32)
NP_DTYPES = {"float16": np.float16, "bfloat16": ml_dtypes.bfloat16, "float32": np.float32}


@dataclasses.dataclass(frozen=True)
class Case:
    lead: tuple[int, ...]  # leading dims of x (M = their product)
    k: int
    n: int
    group: int
    rank: int | None  # None: no low-rank branch
    lr_dtype: str
    bias: bool
    out_dtype: str
    tiles: GemmTiles | None


CASES = {
    # ragged M and N over several 32x32 tiles, 2 groups, one group per K step
    "ragged_2groups_lr_bias": Case((77,), 128, 70, 64, 32, "float16", True, "float32", SMALL),
    # 5 groups of 32 with block_k 64: 2 groups per step, a loop step plus a remaining group
    "5groups_tail_bias_bf16": Case((5,), 160, 48, 32, None, "float16", True, "bfloat16",
                                   GemmTiles(block_m=16, block_n=16, block_k=64)),
    # leading dims, 5 groups of 64 with default tiles, rank 20 (padded to 32) in bfloat16
    "leading_dims_5groups_lr": Case((2, 3), 320, 40, 64, 20, "bfloat16", False, "float32", None),
    # group 128 deeper than block_k 32: two chunks per nibble; f32 factors, f16 output
    "group128_chunks_f32_lr": Case((16,), 256, 32, 128, 8, "float32", True, "float16", SMALL),
}


# jitted: one compile per call instead of a dispatch (and compile) per eager op keeps this file
# fast on two cores
pack = jax.jit(pack_group_weights, static_argnums=1)
unpack = jax.jit(unpack_group_weights, static_argnums=1)


def run(x_q, w_packed, **kw):
    """`w4a4_matmul` under jit: the array arguments traced, the rest static."""
    arrays = {k: v for k, v in kw.items() if isinstance(v, np.ndarray | jax.Array)}
    static = {k: v for k, v in kw.items() if k not in arrays}
    return jax.jit(functools.partial(w4a4_matmul, **static))(x_q, w_packed, **arrays)


def _operands(case: Case, seed: int):
    rng = np.random.default_rng(seed)
    m, g = int(np.prod(case.lead)), case.k // case.group
    x = rng.integers(-8, 8, size=(*case.lead, case.k)).astype(np.int8)
    x.reshape(m, case.k)[0] = -8  # the extremes on both operands
    x.reshape(m, case.k)[-1] = 7
    w = rng.integers(-8, 8, size=(case.k, case.n)).astype(np.int8)
    w[:, 0], w[:, -1] = -8, 7
    ops = dict(
        x_q=x,
        x_scale=rng.uniform(1e-3, 5e-2, size=(*case.lead, g)).astype(np.float32),
        w_scale=rng.uniform(1e-3, 2e-2, size=(g, case.n)).astype(np.float32),
    )
    if case.rank is not None:
        ops["lr_x"] = rng.normal(size=(*case.lead, case.rank)).astype(np.float32)
        ops["lr_up"] = (0.1 * rng.normal(size=(case.rank, case.n))).astype(
            NP_DTYPES[case.lr_dtype])
    if case.bias:
        ops["bias"] = rng.normal(size=(case.n,)).astype(np.float32)
    return w, ops


def numpy_w4a4(w, ops, group):
    """The contract in float64 from the unpacked codes: (result, sum of |terms|)."""
    k, n = w.shape
    x = ops["x_q"].reshape(-1, k).astype(np.int64)
    xs = ops["x_scale"].reshape(x.shape[0], -1).astype(np.float64)
    ws = ops["w_scale"].astype(np.float64)
    y = np.zeros((x.shape[0], n))
    mag = np.zeros_like(y)
    for g in range(k // group):
        sl = slice(g * group, (g + 1) * group)
        sc = xs[:, g, None] * ws[None, g, :]
        y += sc * (x[:, sl] @ w[sl].astype(np.int64))
        mag += sc * (np.abs(x[:, sl]) @ np.abs(w[sl].astype(np.int64)))
    if "lr_up" in ops:
        lu = ops["lr_up"]
        lx = ops["lr_x"].reshape(x.shape[0], -1).astype(lu.dtype).astype(np.float64)
        y += lx @ lu.astype(np.float64)
        mag += np.abs(lx) @ np.abs(lu.astype(np.float64))
    if "bias" in ops:
        y += ops["bias"]
        mag += np.abs(ops["bias"])
    return y.reshape(*ops["x_q"].shape[:-1], n), mag.reshape(*ops["x_q"].shape[:-1], n)


def assert_close(y, ref, mag, *, groups, rank, out_dtype):
    """f32 roundings: the products of the scales (2), the sum over the groups and the rank,
    the bias; plus the output dtype's final rounding."""
    assert y.shape == ref.shape and str(y.dtype) == out_dtype
    tol = (groups + (rank or 0) + 4) * F32_EPS * mag + FINAL_ROUNDING[out_dtype] * np.abs(ref)
    err = np.abs(np.asarray(y, np.float64) - ref)
    assert np.all(err <= tol + 1e-30), f"max err/tol {np.max(err / (tol + 1e-30)):.3g}"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(CASES))
def test_matches_numpy(backend, name):
    case = CASES[name]
    w, ops = _operands(case, seed=len(name))
    y = run(ops.pop("x_q"), pack(w, case.group), group=case.group, out_dtype=case.out_dtype,
            backend=backend, tiles=case.tiles, **ops)
    _, ops = _operands(case, seed=len(name))
    ref, mag = numpy_w4a4(w, ops, case.group)
    assert_close(y, ref, mag, groups=case.k // case.group, rank=case.rank,
                 out_dtype=case.out_dtype)


def test_flat_scales_and_jit():
    """x_scale / lr_x may come flattened to (M, ...); the op traces under jit."""
    case = CASES["leading_dims_5groups_lr"]
    w, ops = _operands(case, seed=3)
    ref, mag = numpy_w4a4(w, ops, case.group)
    flat = dict(ops, x_scale=ops["x_scale"].reshape(6, -1), lr_x=ops["lr_x"].reshape(6, -1))
    y = run(flat.pop("x_q"), pack(w, case.group), group=case.group, backend="xla", **flat)
    assert_close(y, ref, mag, groups=5, rank=case.rank, out_dtype="float32")


def test_quantized_activations_end_to_end():
    """Codes and scales from `grid.group_codes` (the producer of x_q / x_scale): the product
    approximates the float GEMM, and the XLA fallback agrees with the reference to f32
    rounding (the Pallas kernel is checked against numpy above)."""
    rng = np.random.default_rng(4)
    x = rng.normal(size=(9, 128)).astype(np.float32)
    w = rng.integers(-8, 8, size=(128, 24)).astype(np.int8)
    ws = rng.uniform(1e-3, 2e-2, size=(2, 24)).astype(np.float32)
    q, s = jax.jit(group_codes, static_argnums=(1, 2))(jnp.asarray(x), 4, 64)
    args = (q.reshape(9, 128).astype(jnp.int8), pack(w, 64))
    kw = dict(x_scale=s[..., 0], w_scale=ws, group=64)
    y_xla = np.asarray(run(*args, backend="xla", **kw))
    y_ref = np.asarray(jax.jit(functools.partial(w4a4_matmul_reference, group=64))(
        *args, x_scale=kw["x_scale"], w_scale=ws))
    w_deq = w.astype(np.float64) * np.repeat(ws, 64, axis=0)
    float_ref = x.astype(np.float64) @ w_deq
    assert np.max(np.abs(y_ref - float_ref)) < 0.2 * np.max(np.abs(float_ref))
    np.testing.assert_allclose(y_xla, y_ref, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------ packing


def _numpy_group_pack(w, group):
    """The documented layout: in group g, byte j holds row g*group + j (low nibble) and row
    g*group + group/2 + j (high nibble)."""
    h = group // 2
    out = np.zeros((w.shape[0] // 2, *w.shape[1:]), np.uint8)
    for g in range(w.shape[0] // group):
        lo = w[g * group:g * group + h].astype(np.int64) & 0xF
        hi = w[g * group + h:(g + 1) * group].astype(np.int64) & 0xF
        out[g * h:(g + 1) * h] = (lo | (hi << 4)).astype(np.uint8)
    return out.view(np.int8)


@pytest.mark.parametrize(("k", "group"), [(128, 64), (12, 4), (10, 2), (64, 64)])
def test_group_packing_round_trip_and_layout(k, group):
    rng = np.random.default_rng(k + group)
    w = rng.integers(-8, 8, size=(k, 7)).astype(np.int8)
    w[0], w[-1] = -8, 7
    packed = np.asarray(pack(w, group))
    assert packed.dtype == np.int8 and packed.shape == (k // 2, 7)
    np.testing.assert_array_equal(packed, _numpy_group_pack(w, group))
    np.testing.assert_array_equal(np.asarray(unpack(packed, group)), w)
    if group == k:  # one group: the plain segment packing
        np.testing.assert_array_equal(packed, np.asarray(pack_int4(w)))


def test_group_packing_every_byte_and_trailing_dims():
    all_bytes = np.arange(-128, 128, dtype=np.int8).reshape(32, 2, 4)
    unpacked = unpack(all_bytes, 16)
    assert unpacked.shape == (64, 2, 4)
    np.testing.assert_array_equal(np.asarray(pack(unpacked, 16)), all_bytes)


def test_group_packing_errors():
    with pytest.raises(ValueError, match="multiple of group=64"):
        pack_group_weights(np.zeros((96, 3), np.int8), 64)
    with pytest.raises(ValueError, match="even int"):
        pack_group_weights(np.zeros((96, 3), np.int8), 3)
    with pytest.raises(TypeError, match="integer"):
        pack_group_weights(np.zeros((64, 3), np.float32), 64)
    with pytest.raises(TypeError, match="int8"):
        unpack_group_weights(np.zeros((32, 3), np.uint8), 64)
    with pytest.raises(ValueError, match="multiple of group=64"):
        unpack_group_weights(np.zeros((48, 3), np.int8), 64)


# ------------------------------------------------------------------------------- errors


def test_bad_arguments_are_refused():
    m, k, n, grp = 4, 128, 8, 64
    x = np.zeros((m, k), np.int8)
    wp = np.zeros((k // 2, n), np.int8)
    good = dict(x_scale=np.ones((m, 2), np.float32), w_scale=np.ones((2, n), np.float32),
                group=grp, backend="xla")

    def call(x_=x, w_=wp, **kw):
        return w4a4_matmul(x_, w_, **{**good, **kw})

    with pytest.raises(TypeError, match="x_q must be int8"):
        call(x_=x.astype(np.float32))
    with pytest.raises(TypeError, match="w_packed"):
        call(w_=wp.view(np.uint8))
    with pytest.raises(ValueError, match="K mismatch"):
        call(x_=np.zeros((m, 96), np.int8))
    with pytest.raises(ValueError, match="multiple of group=48"):
        call(group=48)
    with pytest.raises(ValueError, match="even int"):
        call(group=7)
    with pytest.raises(ValueError, match=r"x_scale must have shape \(4, 2\)"):
        call(x_scale=np.ones((m, 3), np.float32))
    with pytest.raises(ValueError, match=r"w_scale must have shape .* \(2, 8\)"):
        call(w_scale=np.ones((n, 2), np.float32))
    with pytest.raises(ValueError, match="together"):
        call(lr_x=np.ones((m, 4), np.float32))
    with pytest.raises(ValueError, match="lr_x must have shape"):
        call(lr_x=np.ones((m, 5), np.float32), lr_up=np.ones((4, n), np.float16))
    with pytest.raises(ValueError, match="lr_up must have shape"):
        call(lr_x=np.ones((m, 4), np.float32), lr_up=np.ones((4, n + 1), np.float16))
    with pytest.raises(TypeError, match="lr_up"):
        call(lr_x=np.ones((m, 4), np.float32), lr_up=np.ones((4, n), np.int8))
    with pytest.raises(ValueError, match=r"bias must have shape \(N,\) = \(8,\)"):
        call(bias=np.ones((n + 1,), np.float32))
    with pytest.raises(ValueError, match="out_dtype"):
        call(out_dtype=jnp.int32)
    with pytest.raises(ValueError, match="backend"):
        call(backend="triton")
    with pytest.raises(ValueError, match="power of two"):  # the Triton kernel's limit
        w4a4_matmul(np.zeros((m, 96), np.int8), np.zeros((48, n), np.int8),
                    **{**good, "x_scale": np.ones((m, 2), np.float32), "group": 48,
                       "backend": "pallas"})
    with pytest.raises(ValueError, match="K mismatch"):  # the reference checks the same
        w4a4_matmul_reference(np.zeros((m, 96), np.int8), wp, x_scale=good["x_scale"],
                              w_scale=good["w_scale"])


# ------------------------------------------------------------------- CUDA (Triton) lowering


def test_lowers_to_int8_dots_and_a_16bit_low_rank_dot():
    lowering = pytest.importorskip("tests.pallas_kernels.test_gpu_lowering")
    m, k, n, grp, r = 77, 320, 100, 64, 20  # 5 groups: 2 loop steps of 2, then 1 more
    fn = functools.partial(w4a4_matmul, group=grp, out_dtype=jnp.bfloat16, backend="pallas",
                           interpret=False, tiles=GemmTiles(block_m=64, block_n=64, block_k=64))
    spec = jax.ShapeDtypeStruct
    [ttir] = lowering._triton_modules(
        lambda x, xs, w, ws, lx, lu, b: fn(x, w, x_scale=xs, w_scale=ws, lr_x=lx, lr_up=lu,
                                           bias=b),
        spec((m, k), jnp.int8), spec((m, k // grp), jnp.float32), spec((k // 2, n), jnp.int8),
        spec((k // grp, n), jnp.float32), spec((m, r), jnp.float16), spec((r, n), jnp.float16),
        spec((n,), jnp.float32),
    )
    # Two i8 x i8 -> i32 dots (one per nibble) of depth group/2 per group: 2 x 2 in the loop
    # body, 2 for the remaining group.
    dots = lowering.DOT_I8_I32.findall(ttir)
    assert dots == [("64", "32", "32", "64", "64", "64")] * 6, ttir
    assert "scf.for" in ttir  # the K loop runs inside the kernel
    assert re.search(r"tt\.load .*tensor<32x64x!tt\.ptr<i8>>", ttir)  # packed bytes
    assert re.search(r"arith\.shrsi .*: tensor<32x64xi8>", ttir)  # unpacked with shifts
    assert re.search(r"arith\.sitofp .*tensor<64x64xi32> to tensor<64x64xf32>", ttir)
    # the rank-20 branch, zero-padded to 32, as one f16 dot with an f32 accumulator
    assert re.search(r"tt\.dot .*tensor<64x32xf16> \* tensor<32x64xf16> -> tensor<64x64xf32>",
                     ttir)
    assert re.search(r"tt\.store .*tensor<64x64x!tt\.ptr<bf16>>", ttir)


def test_f32_low_rank_branch_lowers_at_ieee_precision():
    lowering = pytest.importorskip("tests.pallas_kernels.test_gpu_lowering")
    fn = functools.partial(w4a4_matmul, group=32, backend="pallas", interpret=False,
                           tiles=GemmTiles(block_m=16, block_n=16, block_k=16))
    spec = jax.ShapeDtypeStruct
    [ttir] = lowering._triton_modules(
        lambda x, xs, w, ws, lx, lu: fn(x, w, x_scale=xs, w_scale=ws, lr_x=lx, lr_up=lu),
        spec((16, 32), jnp.int8), spec((16, 1), jnp.float32), spec((16, 16), jnp.int8),
        spec((1, 16), jnp.float32), spec((16, 8), jnp.float32), spec((8, 16), jnp.float32),
    )
    f32_dots = [d for d in re.findall(r"tt\.dot .*", ttir) if "xf32> *" in d]
    # IEEE is tt.dot's default input precision, so the attribute is left out (TF32 would show)
    assert len(f32_dots) == 1 and "tf32" not in f32_dots[0], f32_dots

"""The Pallas kernels lower to Triton for CUDA on this GPU-less machine.

`jax.export` with platforms=["cuda"] runs the Pallas -> Triton lowering and embeds the Triton
module (MLIR bytecode) in a `__gpu$xla.gpu.triton` custom call. That target has no
export-compatibility guarantee, hence the disabled check. We decode the bytecode with jax's
Triton-dialect context (a private jax helper: test-only use) and assert on the Triton IR.
Triton -> PTX compilation happens at XLA compile time on a GPU and is not covered here.
"""

import functools
import re

import jax
import jax.numpy as jnp
import pytest

from pallas_kernels import (
    GemmTiles,
    QuantizeTiles,
    int8_matmul,
    pack_weights,
    quantize_activation,
    w4a8_matmul,
)

triton_lowering = pytest.importorskip("jax._src.pallas.triton.lowering")
from jax._src.interpreters import mlir  # noqa: E402
from jax._src.lib.mlir import ir  # noqa: E402

TRITON_TARGET = "__gpu$xla.gpu.triton"
DOT_I8_I32 = re.compile(
    r"tt\.dot .*: tensor<(\d+)x(\d+)xi8> \* tensor<(\d+)x(\d+)xi8> -> tensor<(\d+)x(\d+)xi32>"
)


def _triton_modules(fn, *args):
    exported = jax.export.export(
        jax.jit(fn), platforms=["cuda"],
        disabled_checks=[jax.export.DisabledSafetyCheck.custom_call(TRITON_TARGET)],
    )(*args)
    text = exported.mlir_module()
    assert TRITON_TARGET in text
    blobs = []
    with mlir.make_ir_context():
        module = ir.Module.parse(text)

        def walk(op):
            for region in op.regions:
                for block in region.blocks:
                    for child in block.operations:
                        if child.name == "stablehlo.custom_call":
                            config = ir.DictAttr(child.attributes["mhlo.backend_config"])
                            blobs.append(ir.StringAttr(config["ir"]).value_bytes)
                        walk(child.operation)

        walk(module.operation)
    with triton_lowering._new_ir_context():
        return [str(ir.Module.parse(blob)) for blob in blobs]


def _spec(shape, dtype):
    return jax.ShapeDtypeStruct(shape, dtype)


TILES = GemmTiles(block_m=64, block_n=64, block_k=32)


def test_int8_matmul_lowers_to_i8_dot_with_i32_accumulator():
    fn = functools.partial(int8_matmul, out_dtype=jnp.bfloat16, backend="pallas",
                           interpret=False, tiles=TILES)
    [ttir] = _triton_modules(
        lambda x, w, s, b: fn(x, w, a_scale=0.1, a_zero_point=3, w_scale=s, bias=b),
        _spec((77, 96), jnp.int8), _spec((96, 100), jnp.int8),
        _spec((100,), jnp.float32), _spec((100,), jnp.float32),
    )
    dots = DOT_I8_I32.findall(ttir)
    assert dots == [("64", "32", "32", "64", "64", "64")], ttir
    assert "scf.for" in ttir  # the K loop runs inside the kernel
    assert re.search(r"tt\.store .*tensor<64x64x!tt\.ptr<bf16>>", ttir)


@pytest.mark.parametrize(("bits", "fields"), [(4, 2), (2, 4)])
def test_packed_matmul_unpacks_in_kernel(bits, fields):
    fn = functools.partial(w4a8_matmul, bits=bits, out_dtype=jnp.int32, backend="pallas",
                           interpret=False, tiles=TILES)
    k = 128
    w = pack_weights(jnp.zeros((k, 64), jnp.int8), bits)
    [ttir] = _triton_modules(lambda x, w: fn(x, w), _spec((77, k), jnp.int8),
                             _spec(w.shape, jnp.int8))
    # One i8 x i8 -> i32 dot per packed field, fed by shifts of the loaded int8 bytes.
    assert len(DOT_I8_I32.findall(ttir)) == fields, ttir
    assert re.search(r"arith\.shli .*: tensor<32x64xi8>", ttir)
    assert re.search(r"arith\.shrsi .*: tensor<32x64xi8>", ttir)
    # The packed weights enter the kernel as int8 bytes, not unpacked in HBM.
    assert re.search(r"tt\.load .*tensor<32x64x!tt\.ptr<i8>>", ttir)


def test_quantize_activation_lowers():
    fn = functools.partial(quantize_activation, bits=8, backend="pallas", interpret=False,
                           tiles=QuantizeTiles(block=1024))
    [ttir] = _triton_modules(lambda x: fn(x, 0.1, 3), _spec((77, 640), jnp.bfloat16))
    assert "__nv_floorf" in ttir  # round-half-even is built from floor (no lax.round lowering)
    assert "div.rn.f32" in ttir  # IEEE division (Triton's plain f32 division is approximate)
    assert re.search(r"arith\.trunci .*tensor<1024xi32> to tensor<1024xi8>", ttir)
    assert re.search(r"tt\.store .*tensor<1024x!tt\.ptr<i8>>", ttir)

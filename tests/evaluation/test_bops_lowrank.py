"""SVDQuant's format in the efficiency columns: stored bytes (packed residual codes, group
scales, the f32 smoothing vector, the fp16 branch) and BOPs (the branch: ``r (K + N)`` MACs
per token at 16 x 16 bits), against hand counts on the tiny SDXL-shaped UNet; the exported
plan and the spec count the same."""

from __future__ import annotations

import jax.numpy as jnp
import pytest

from mixdq_jax.deploy.memory import lowrank_shapes, plan_for_spec, stored_param_bytes
from mixdq_jax.evaluation import bops
from mixdq_jax.models.unet import UNet2DConditionModel, UNetConfig, param_shapes
from mixdq_jax.quant.qconfig import QuantSpec
from tests.tiny_models import sdxl_unet_config

CONV_IN = "conv_in"  # 3x3, 4 -> 32, on the 16x16 latent: 256 tokens, K = 36
TO_Q = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"  # 64 -> 64, 8x8: 64 tokens
FF2 = "down_blocks.1.attentions.0.transformer_blocks.0.ff.net.2"  # 256 -> 64, at 8 bits
RANK, GROUP = 4, 8


@pytest.fixture(scope="module")
def config():
    return UNetConfig.from_dict(
        sdxl_unet_config(layers_per_block=1, transformer_layers_per_block=(1, 1))
    )


@pytest.fixture(scope="module")
def spec(config):
    return QuantSpec(
        weight_bits={CONV_IN: 4, TO_Q: 4, FF2: 8}, act_bits={CONV_IN: 4, TO_Q: 4, FF2: 8},
        default_weight_bits=16, default_act_bits=16, group_size=GROUP,
        lowrank=lowrank_shapes(config, RANK, layers=[CONV_IN, TO_Q, FF2]),
    )  # fmt: skip


def test_stored_bytes_count_codes_group_scales_smoothing_and_branch(config, spec):
    fp16 = stored_param_bytes(config, None)
    # conv_in: 3x3 x 4 channels, padded to one group of 8 per position: K_pad = 72
    conv_in = (
        -3 * 3 * 4 * 32 * 2  # the fp16 kernel, gone
        + 72 // 2 * 32  # int4 codes, two per byte
        + 72 // GROUP * 32 * 4  # f32 group scales
        + 4 * 4  # f32 smoothing
        + 3 * 3 * 4 * RANK * 2 + RANK * 32 * 2  # fp16 down (3, 3, 4, r), up (r, 32)
    )
    to_q = (
        -64 * 64 * 2 + 64 // 2 * 64 + 64 // GROUP * 64 * 4 + 64 * 4
        + 64 * RANK * 2 + RANK * 64 * 2
    )  # fmt: skip
    # ff.net.2 at 8 bits: int8 codes, scales, smoothing; no branch (only <= 4-bit weights)
    ff2 = -256 * 64 * 2 + 256 * 64 + 256 // GROUP * 64 * 4 + 256 * 4
    assert stored_param_bytes(config, spec) == fp16 + conv_in + to_q + ff2
    assert (conv_in, to_q, ff2) == (560, -2816, -7168)
    # the exported plan (mixdq export's metadata) counts the same
    fp16_params = param_shapes(UNet2DConditionModel(config=config, dtype=jnp.float16,
                                                    param_dtype=jnp.float16))  # fmt: skip
    plan, _ = plan_for_spec(config, spec, fp16_params)
    assert (plan.layers[CONV_IN].rank, plan.layers[FF2].rank, plan.layers[FF2].smooth) == (
        RANK, 0, True)  # fmt: skip
    stored = bops.storage_cost(config, plan=plan)["param_bytes"]
    assert stored == bops.storage_cost(config, spec)["param_bytes"] == fp16 + conv_in + to_q + ff2


def test_bops_count_the_branch_at_16_bits(config, spec):
    macs = bops.layer_macs(config, latent=16)
    assert macs[CONV_IN] == 256 * 32 * 36 and macs[TO_Q] == 64 * 64 * 64
    branch = {CONV_IN: 256 * RANK * (36 + 32), TO_Q: 64 * RANK * (64 + 64)}
    assert bops.layer_branch_macs(config, {CONV_IN: RANK, TO_Q: RANK}, latent=16) == branch
    assert bops.spec_ranks(config, spec) == {CONV_IN: RANK, TO_Q: RANK}  # not FF2: 8-bit
    total = sum(macs.values())
    want = (
        256 * total
        - (256 - 4 * 4) * (macs[CONV_IN] + macs[TO_Q])
        - (256 - 8 * 8) * macs[FF2]
        + 256 * sum(branch.values())
    )
    result = bops.efficiency(config, spec=spec, latent=16)["compute"]
    assert result["bops"] == want and result["branch_macs"] == sum(branch.values())
    assert result["float_bops"] == 256 * total and result["macs"] == total
    assert result["mean_op_bits"] == want / (total + sum(branch.values()))
    # the exported plan: the same ranks, the same count
    fp16_params = param_shapes(UNet2DConditionModel(config=config, dtype=jnp.float16,
                                                    param_dtype=jnp.float16))  # fmt: skip
    plan, _ = plan_for_spec(config, spec, fp16_params)
    assert bops.plan_ranks(plan) == bops.spec_ranks(config, spec)
    assert bops.efficiency(config, plan=plan, latent=16)["compute"]["bops"] == want
    # without the branch: the plain W4A4 count; ranks are capped at the GEMM sides
    plain = bops.compute_cost(config, *bops.spec_bits(config, spec), latent=16)
    assert plain["bops"] == want - 256 * sum(branch.values()) and plain["branch_macs"] == 0
    capped = lowrank_shapes(config, 1000, layers=[CONV_IN])[CONV_IN]
    assert capped.rank == 32 and capped.down.shape == (3, 3, 4, 32)
    with pytest.raises(ValueError, match="unknown layer"):
        bops.compute_cost(config, 4, 4, latent=16, ranks={"no.such.layer": 4})

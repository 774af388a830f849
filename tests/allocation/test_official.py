"""Real data check: the allocator on the official SDXL-turbo sensitivities and sizes.

Each released MixDQ config was picked from integer-program solutions, so at the released
config's own per-group average bits our optimum must score at least as high. The band is
placed as ``[released - 2 band, released]`` so our solution never uses more bits.
"""

from __future__ import annotations

import json
import math

import pytest
import yaml

from mixdq_jax import official_format as fmt
from mixdq_jax.allocation import (
    OFFICIAL_CANDIDATES,
    WEIGHT_K_SWEEP,
    BitProgram,
    GroupAllocator,
    budget_sweep,
    is_content_layer,
    most_sensitive,
    naive_sorting,
    random_allocation,
    size_ratio,
    split_budget,
)
from mixdq_jax.cli import main
from tests.reference_data import official, sdxl_turbo
from tests.reference_data import plain_yaml as _raw

BAND = 0.02
RELEASED = {
    "weight": ["3.66", "4.00", "4.08", "5.02", "8.00"],
    "act": ["7.38", "7.77", "7.84", "8.00"],
}
OFFICIAL_PROTECTED = {
    "conv_in",
    "conv_out",
    "down_blocks.0.resnets.0.conv2",
    "up_blocks.2.resnets.2.conv_shortcut",
    *(f"down_blocks.2.attentions.1.transformer_blocks.{i}.ff.net.2" for i in (5, 6, 7, 8)),
    "up_blocks.0.attentions.0.transformer_blocks.0.ff.net.2",
}


@pytest.fixture(scope="module")
def data():
    out = {}
    for kind in ("weight", "act"):
        out[kind] = {
            "sqnr": fmt.read_sensitivity(official("sensitivity", f"{kind}_sqnr.yaml")),
            "ssim": fmt.read_sensitivity(official("sensitivity", f"{kind}_ssim.yaml")),
            "sizes": fmt.read_sizes(official("tensor_ratio", f"{kind}_ratio.yaml")),
        }
    return out


def _weighted_avg(bits: dict, sizes: dict) -> float:
    return math.fsum(sizes[n] * b for n, b in bits.items()) / math.fsum(sizes[n] for n in bits)


@pytest.mark.parametrize(("kind", "tag"), [(k, t) for k, tags in RELEASED.items() for t in tags])
def test_released_configs_are_matched_or_beaten(data, kind, tag):
    released = _raw(official("final_config", kind, f"{kind}_{tag}.yaml"))
    d = data[kind]
    content_bits, quality_bits = OFFICIAL_CANDIDATES[kind]
    agree = 0
    for group, metric, cands in (
        ("content", "ssim", content_bits),
        ("quality", "sqnr", quality_bits),
    ):
        names = [n for n in released if is_content_layer(n) == (group == "content")]
        rel_bits = {n: released[n] for n in names}
        sens = {n: d[metric][n] for n in names}
        rel_avg = _weighted_avg(rel_bits, d["sizes"])
        rel_score = math.fsum(sens[n][(2, 4, 8).index(b)] for n, b in rel_bits.items())
        # The released weight_8.00 keeps content layers in {4, 8}: a subset of ours.
        assert set(rel_bits.values()) <= set(cands)
        got = BitProgram(sens, d["sizes"], candidates=cands).solve(rel_avg - BAND, band=BAND)
        assert rel_avg - 2 * BAND - 1e-6 <= got.avg_bits <= rel_avg + 1e-6, group
        assert got.sensitivity >= rel_score - 1e-6 * abs(rel_score), group
        agree += sum(got.bits[n] == rel_bits[n] for n in names)
    assert agree / len(released) >= (0.95 if kind == "weight" else 0.8)


def test_budget_split_reproduces_released_groups(data):
    """Algorithm 1's split with k = b_content / b_quality gives back both released groups."""
    sizes = data["weight"]["sizes"]
    content = [n for n in sizes if is_content_layer(n)]
    quality = [n for n in sizes if not is_content_layer(n)]
    ratio = size_ratio(content, quality, sizes)
    assert ratio == pytest.approx(2.24, abs=0.005)  # the README's r for weights
    released = _raw(official("final_config", "weight", "weight_4.00.yaml"))
    b_c = _weighted_avg({n: released[n] for n in content}, sizes)
    b_q = _weighted_avg({n: released[n] for n in quality}, sizes)
    total = _weighted_avg(released, sizes)
    assert total == pytest.approx(4.006, abs=5e-4)
    got_c, got_q = split_budget(total, k=b_c / b_q, ratio=ratio)
    assert (got_c, got_q) == (pytest.approx(b_c), pytest.approx(b_q))


def test_protected_layers_match_official(data):
    """Top 1% per group by the lowest score at 8 bits (SQNR for quality, SSIM for content):
    exactly the official protected layers; at 4 bits the content layers differ."""
    d = data["act"]
    quality = {n: s for n, s in d["sqnr"].items() if not is_content_layer(n)}
    content = {n: d["ssim"][n] for n in d["sizes"] if is_content_layer(n)}
    got_q = most_sensitive(quality, fraction=0.01, bits=8)
    got_c = most_sensitive(content, fraction=0.01, bits=8)
    assert set(got_q) | set(got_c) == OFFICIAL_PROTECTED
    assert len(got_q) + len(got_c) == len(OFFICIAL_PROTECTED) == 9
    assert set(most_sensitive(content, fraction=0.01, bits=4)) != set(got_c)
    assert (
        set(_raw(official("tensor_ratio", "act_ratio.yaml")))
        - set(_raw(official("final_config", "act", "act_7.77.yaml")))
        == OFFICIAL_PROTECTED
    )


def test_milp_beats_baselines(data):
    d = data["weight"]
    content = {n: d["ssim"][n] for n in d["sizes"] if is_content_layer(n)}
    budget = 3.4
    program = BitProgram(content, d["sizes"], candidates=(2, 4, 8))
    ours = program.solve(budget, band=BAND)
    for bits in (
        random_allocation(
            {n: d["sizes"][n] for n in content},
            candidates=(2, 4, 8),
            budget=budget,
            band=BAND,
            seed=0,
        ),
        naive_sorting(content, d["sizes"], candidates=(2, 4, 8), budget=budget, band=BAND),
    ):
        avg = _weighted_avg(bits, d["sizes"])
        assert avg <= budget + BAND + 1e-9
        score = math.fsum(content[n][(2, 4, 8).index(b)] for n, b in bits.items())
        assert ours.sensitivity > score


def test_weight_sweep(data):
    d = data["weight"]
    allocator = GroupAllocator(
        content_sensitivity={n: d["ssim"][n] for n in d["sizes"] if is_content_layer(n)},
        quality_sensitivity={n: d["sqnr"][n] for n in d["sizes"] if not is_content_layer(n)},
        sizes=d["sizes"],
        content_candidates=(2, 4, 8),
        quality_candidates=(4, 8),
    )
    targets = budget_sweep(4.0, num=2)
    got = allocator.sweep(targets=targets, ks=WEIGHT_K_SWEEP, band=BAND)
    assert len(got) == sum(allocator.in_range(t, k) for t in targets for k in WEIGHT_K_SWEEP) > 10
    for cand in got:
        b_c, b_q = allocator.group_budgets(cand.target, cand.k)
        assert abs(cand.content.avg_bits - b_c) <= BAND + 1e-6
        assert abs(cand.quality.avg_bits - b_q) <= BAND + 1e-6
        assert abs(cand.avg_bits(d["sizes"]) - cand.target) <= BAND + 1e-6


def _cli(kind: str, target: str, out, *extra: str) -> int:
    """``mixdq allocate`` on the official sensitivities and sizes of ``kind``."""
    sizes = official("tensor_ratio", f"{kind}_ratio.yaml")
    return main(
        [
            "allocate",
            "--sensitivity",
            str(official("sensitivity")),
            "--sizes",
            str(sizes),
            "--kind",
            kind,
            "--target",
            target,
            "--out",
            str(out),
            *extra,
        ]
    )


def test_cli_weight_and_act(tmp_path, capsys):
    out = tmp_path / "w.yaml"
    assert _cli("weight", "4.0", str(out), "--k", "0.62") == 0
    bits = _raw(out)
    assert len(bits) == 794 and set(bits.values()) <= {2, 4, 8}
    assert {bits[n] for n in bits if not is_content_layer(n)} <= {4, 8}
    assert "content:  420 layers" in capsys.readouterr().out

    out = tmp_path / "a.yaml"
    assert _cli("act", "7.7", str(out), "--protect-top", "1") == 0
    bits = _raw(out)
    assert len(bits) == 785 and set(bits.values()) <= {4, 8}
    assert set(_raw(official("tensor_ratio", "act_ratio.yaml"))) - set(bits) == OFFICIAL_PROTECTED


def test_cli_errors(tmp_path, capsys):
    sens_dir = tmp_path / "sens"
    sens_dir.mkdir()
    sqnr = _raw(official("sensitivity", "weight_sqnr.yaml"))
    ssim = _raw(official("sensitivity", "weight_ssim.yaml"))
    sizes = str(official("tensor_ratio", "weight_ratio.yaml"))
    dropped = sorted(ssim)[:2]
    fmt.write_sensitivity(sens_dir / "weight_sqnr.yaml", sqnr)
    fmt.write_sensitivity(
        sens_dir / "weight_ssim.yaml", {n: s for n, s in ssim.items() if n not in dropped}
    )
    args = [
        "allocate",
        "--sensitivity",
        str(sens_dir),
        "--sizes",
        sizes,
        "--kind",
        "weight",
        "--target",
        "4",
        "--out",
        str(tmp_path / "o.yaml"),
    ]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "content layers" in err and all(n in err for n in dropped) and "(2)" in err

    with_nan = {f"model.{n}": list(v) for n, v in sqnr.items()}
    with_nan["model.conv_in"][1] = float("nan")
    (sens_dir / "weight_sqnr.yaml").write_text(yaml.safe_dump(with_nan))
    fmt.write_sensitivity(sens_dir / "weight_ssim.yaml", ssim)
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "'conv_in'" in err and "weight_sqnr.yaml" in err and "non-finite" in err
    fmt.write_sensitivity(sens_dir / "weight_sqnr.yaml", sqnr)

    assert main([*args[:-2], "--target", "9", "--out", str(tmp_path / "o.yaml")]) == 2
    assert "outside the achievable range" in capsys.readouterr().err
    assert not (tmp_path / "o.yaml").exists()


def test_cli_sweep_writes_candidates(tmp_path):
    out = tmp_path / "sweep"
    assert _cli("weight", "4.0", str(out), "--k-sweep", "--b-num", "1") == 0
    index = json.loads((out / "index.json").read_text())["candidates"]
    assert index and len(list(out.glob("weight_B*.yaml"))) == len(index)
    for entry in index:
        assert entry["target"] == 4.0 and entry["k"] in WEIGHT_K_SWEEP
        assert len(fmt.read_bits(out / entry["file"])) == 794
        assert abs(entry["avg_bits"] - 4.0) <= BAND + 1e-6
    assert _cli("weight", "4.0", str(tmp_path / "x.yaml"), "--k-sweep") == 2


def test_weight_sizes_match_diffusers_shapes(data):
    """The size term: weight_ratio = weight numel / conv_in's (11520), for every Linear/Conv of
    the diffusers SDXL UNet built on the meta device (no weights)."""
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    config_path = sdxl_turbo("unet_config.json")
    with torch.device("meta"):
        unet = diffusers.UNet2DConditionModel.from_config(json.loads(config_path.read_text()))
    numel = {
        name: module.weight.numel()
        for name, module in unet.named_modules()
        if isinstance(module, torch.nn.Linear | torch.nn.Conv2d)
    }
    sizes = data["weight"]["sizes"]
    assert set(numel) == set(sizes) and len(numel) == 794
    assert numel["conv_in"] == 11520
    assert all(sizes[n] * 11520 == pytest.approx(numel[n], rel=1e-12) for n in numel)
    assert set(data["act"]["sizes"]) == set(numel)

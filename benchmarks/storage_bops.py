"""docs/evaluation.md's storage and compute table on the full-size SDXL-turbo UNet.

Counted from shapes (no weights): stored bytes as `mixdq export` packs them against the FP16
UNet, and bit operations of one forward at 512x512, for the uniform targets and the released
MixDQ configurations (vendored in tests/data/mixdq_official/; an activation config's absent
layers are its float layers).

    .venv/bin/python benchmarks/storage_bops.py [--format md|json]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from mixdq_jax.evaluation.bops import efficiency
from mixdq_jax.models.unet import UNetConfig
from mixdq_jax.official_format import read_bits
from mixdq_jax.quant import QuantSpec

ROOT = Path(__file__).resolve().parents[1]
OFFICIAL = ROOT / "tests" / "data" / "mixdq_official" / "final_config"
UNET = ROOT / "tests" / "data" / "sdxl_turbo" / "unet_config.json"


def _official(kind: str, name: str) -> dict[str, int]:
    return read_bits(OFFICIAL / kind / f"{name}.yaml")


def rows() -> list[dict]:
    """One row per configuration: storage and compute as every metrics.json states them."""
    config = UNetConfig.from_json(UNET)
    specs = {
        "FP16": None,
        "W8A8 uniform": QuantSpec(weight_bits=8, act_bits=8, symmetric_weights=True),
        "W4A8 uniform": QuantSpec(weight_bits=4, act_bits=8, symmetric_weights=True),
        "released W3.66A16 (weight_3.66)": QuantSpec(
            weight_bits=_official("weight", "weight_3.66"), symmetric_weights=True
        ),
        "released W8A8 (weight_8.00 + act_8.00)": QuantSpec(
            weight_bits=_official("weight", "weight_8.00"),
            act_bits=_official("act", "act_8.00"), default_act_bits=16, symmetric_weights=True,
        ),
        "released W5A8 (weight_5.02 + act_7.77)": QuantSpec(
            weight_bits=_official("weight", "weight_5.02"),
            act_bits=_official("act", "act_7.77"), default_act_bits=16, symmetric_weights=True,
        ),
        "released W4A8 (weight_4.00 + act_7.77)": QuantSpec(
            weight_bits=_official("weight", "weight_4.00"),
            act_bits=_official("act", "act_7.77"), default_act_bits=16, symmetric_weights=True,
        ),
    }  # fmt: skip
    out = []
    for name, spec in specs.items():
        cost = efficiency(config, spec=spec, latent=64)
        storage, compute = cost["storage"], cost["compute"]
        out.append({
            "configuration": name, "param_bytes": storage["param_bytes"],
            "storage_opt": storage["storage_opt"], "bops": compute["bops"],
            "compute_opt": compute["compute_opt"], "macs": compute["macs"],
        })  # fmt: skip
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--format", choices=("md", "json"), default="md")
    table = rows()
    if parser.parse_args().format == "json":
        print(json.dumps(table, indent=1))
        return
    print("| configuration | stored UNet | storage opt. | TBOPs | compute opt. |")
    print("| --- | --- | --- | --- | --- |")
    for r in table:
        mib, tbops = r["param_bytes"] / 2**20, r["bops"] / 1e12
        print(f"| {r['configuration']} | {mib:,.0f} MiB | {r['storage_opt']:.2f}x | "
              f"{tbops:.1f} | {r['compute_opt']:.2f}x |")  # fmt: skip


if __name__ == "__main__":
    main()

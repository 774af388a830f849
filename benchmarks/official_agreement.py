"""Agreement of our allocator with the released MixDQ SDXL-turbo configs.

For each released config (final_config/{weight,act}/*.yaml) and each layer group, the
released parameter-weighted average bits become the group budget, and our integer program is
solved on the official sensitivities and sizes with the official candidates. Two band
placements:
- ``upper`` (the check): average in [released - 2*band, released], never more bits;
- ``centered`` (the official form): average in [released - band, released + band].
Reports each group's summed sensitivity (ours vs released) and the fraction of layers with
the same bits. Also compares the top-1% protected activation layers with the official list.

    .venv/bin/python benchmarks/official_agreement.py [--official DIR] [--format md|json]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from mixdq_jax import official_format as fmt
from mixdq_jax.allocation import (
    OFFICIAL_CANDIDATES,
    BitProgram,
    average_bits,
    is_content_layer,
    most_sensitive,
    summed_sensitivity,
)

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OFFICIAL = ROOT / "tests" / "data" / "mixdq_official"  # vendored official data
BAND = 0.02
OFFICIAL_PROTECTED = [
    "conv_in",
    "conv_out",
    "down_blocks.0.resnets.0.conv2",
    "up_blocks.2.resnets.2.conv_shortcut",
    *(f"down_blocks.2.attentions.1.transformer_blocks.{i}.ff.net.2" for i in (5, 6, 7, 8)),
    "up_blocks.0.attentions.0.transformer_blocks.0.ff.net.2",
]


def agreement_rows(official: Path, band: float) -> list[dict]:
    rows = []
    for kind in ("weight", "act"):
        sqnr = fmt.read_sensitivity(official / "sensitivity" / f"{kind}_sqnr.yaml")
        ssim = fmt.read_sensitivity(official / "sensitivity" / f"{kind}_ssim.yaml")
        sizes = fmt.read_sizes(official / "tensor_ratio" / f"{kind}_ratio.yaml")
        content_bits, quality_bits = OFFICIAL_CANDIDATES[kind]
        for path in sorted((official / "final_config" / kind).glob(f"{kind}_*.yaml")):
            released = fmt.read_bits(path)
            for placement in ("upper", "centered"):
                row = {"config": path.stem, "placement": placement, "layers": len(released)}
                same_total = 0
                for group, metric, cands in (
                    ("content", ssim, content_bits),
                    ("quality", sqnr, quality_bits),
                ):
                    names = [n for n in released if is_content_layer(n) == (group == "content")]
                    rel = {n: released[n] for n in names}
                    sens = {n: metric[n] for n in names}
                    rel_avg = average_bits(rel, sizes)
                    center = rel_avg - band if placement == "upper" else rel_avg
                    center = min(center, max(cands) - band)  # all-8 configs: stay in range
                    got = BitProgram(sens, sizes, candidates=cands).solve(center, band=band)
                    same = sum(got.bits[n] == rel[n] for n in names)
                    same_total += same
                    row[group] = {
                        "layers": len(names),
                        "released_avg_bits": rel_avg,
                        "our_avg_bits": got.avg_bits,
                        "released_sum": summed_sensitivity(rel, sens),
                        "our_sum": got.sensitivity,
                        "agreement": same / len(names),
                        "solve_s": got.solve_seconds,
                    }
                row["agreement"] = same_total / len(released)
                rows.append(row)
    return rows


def protected_comparison(official: Path) -> dict:
    sqnr = fmt.read_sensitivity(official / "sensitivity" / "act_sqnr.yaml")
    ssim = fmt.read_sensitivity(official / "sensitivity" / "act_ssim.yaml")
    quality = {n: s for n, s in sqnr.items() if not is_content_layer(n)}
    out = {}
    for bits in (4, 2):
        ours = most_sensitive(ssim, fraction=0.01, bits=bits) + most_sensitive(
            quality, fraction=0.01, bits=bits
        )
        out[f"top1pct_at_{bits}bit"] = {
            "ours": sorted(ours),
            "overlap": len(set(ours) & set(OFFICIAL_PROTECTED)),
            "official_count": len(OFFICIAL_PROTECTED),
        }
    return out


def _markdown(rows: list[dict], protected: dict) -> str:
    head = (
        "| config | band | group | layers | released avg | our avg | released sum | our sum "
        "| our - released | same bits |\n|---|---|---|---|---|---|---|---|---|---|"
    )
    lines = [head]
    for r in rows:
        for group in ("content", "quality"):
            g = r[group]
            metric = "SSIM" if group == "content" else "SQNR"
            lines.append(
                f"| {r['config']} | {r['placement']} | {group} ({metric}) "
                f"| {g['layers']} | {g['released_avg_bits']:.4f} | {g['our_avg_bits']:.4f} "
                f"| {g['released_sum']:.4f} | {g['our_sum']:.4f} "
                f"| {g['our_sum'] - g['released_sum']:+.4f} | {g['agreement']:.1%} |"
            )
        lines.append(
            f"| {r['config']} | {r['placement']} | all | {r['layers']} | | | | | "
            f"| {r['agreement']:.1%} |"
        )
    lines.append("")
    for key, p in protected.items():
        lines.append(
            f"Protected activations, {key}: overlap {p['overlap']}/{p['official_count']} with "
            f"the official list; ours: {', '.join(p['ours'])}"
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--official", type=Path, default=DEFAULT_OFFICIAL, help=f"default: {DEFAULT_OFFICIAL}"
    )
    parser.add_argument("--band", type=float, default=BAND)
    parser.add_argument("--format", choices=("md", "json"), default="md")
    args = parser.parse_args()
    if not args.official.is_dir():
        print(f"official MixDQ data not found at {args.official}", file=sys.stderr)
        return 1
    rows = agreement_rows(args.official, args.band)
    protected = protected_comparison(args.official)
    for r in rows:  # the real-data check, restated
        for group in ("content", "quality"):
            g = r[group]
            worse = g["our_sum"] < g["released_sum"] - 1e-6 * abs(g["released_sum"])
            more_bits = r["placement"] == "upper" and (
                g["our_avg_bits"] > g["released_avg_bits"] + 1e-6
            )
            if worse or more_bits:
                raise RuntimeError(f"real-data check failed for {r['config']} {group}: {g}")
    if args.format == "json":
        print(json.dumps({"band": args.band, "rows": rows, "protected": protected}, indent=2))
    else:
        print(_markdown(rows, protected))
    return 0 if all(math.isfinite(r["agreement"]) for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())

"""``mixdq inspect PATH``: what an exported folder or a run directory holds."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "inspect",
        help="what an exported folder or a run directory holds (formats, sizes, stages)",
        description="For an exported folder: its source model, method, preset and objective, "
        "per-layer formats and bits, stored size vs FP16, checksums verified and the settings "
        "it was made with. For a run directory (--run): which stages are done and what each "
        "holds. Exit 0, or 2 when the path is not one of these or an export fails its "
        "checksums.",
    )
    p.add_argument("path", type=Path, help="an exported folder (--out) or a run directory (--run)")
    p.add_argument("--layers", action="store_true", help="every layer's formats, not a summary")
    p.add_argument("--json", action="store_true", help="the summary as JSON, for scripts")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from mixdq_jax.inspection import inspect_path  # noqa: PLC0415  (keeps --help fast)

    summary = inspect_path(args.path, layers=args.layers)
    if args.json:
        print(json.dumps(summary, indent=2, sort_keys=True))
    else:
        print(_text(summary))
    damaged = summary["kind"] == "export" and not summary["checksums"]["ok"]
    return 2 if damaged else 0


def _mb(n: int | None) -> str:
    return "?" if n is None else f"{n / 1e6:,.2f} MB"


def _text(s: dict[str, Any]) -> str:
    return _export_text(s) if s["kind"] == "export" else _run_text(s)


def _export_text(s: dict[str, Any]) -> str:
    sizes = s["sizes"]
    ratio = f"{sizes['ratio']:.2f}x smaller" if sizes["ratio"] else "?"
    lines = [
        f"exported quantized pipeline: {s['path']}",
        f"  source     {s['source']}",
        f"  method     {s['method'] or '?'}   preset {s['preset'] or '?'}   "
        f"objective {s['objective'] or 'default'}   target {s['target'] or '?'}",
        f"  float      {s['float_dtype']}",
        f"  unet       {_mb(sizes['unet_bytes'])} stored vs {_mb(sizes['fp16_bytes'])} in "
        f"FP16 ({ratio}); mean weight bits {s['weight_bits_mean']:.2f}",
        f"  layers     {s['layers']} quantizable:",
    ]
    for row in s["formats"]:
        lines.append(f"    W{row['weights']:<5} A{row['acts']:<5} {row['layers']:>5} layers")
    check = s["checksums"]
    if check["ok"]:
        lines.append("  checksums  every file verified")
    else:
        lines.append("  checksums  FAILED:")
        lines += [f"    {problem}" for problem in check["problems"]]
    options = s["settings"].get("settings", {})
    if options:  # what the user chose (command line or --config); --json has every value
        sources = s["settings"].get("sources", {})
        chosen = {k: v for k, v in options.items() if sources.get(k, "default") != "default"}
        shown = " ".join(f"--{k} {v}" for k, v in sorted(chosen.items())) or "(all defaults)"
        lines.append(f"  settings   mixdq {s['settings'].get('command', '?')} {shown}")
    if "per_layer" in s:
        lines.append("  per layer (weights/acts):")
        for name, row in s["per_layer"].items():
            lines.append(f"    {name:<64} W{row['weights']:<5} A{row['acts']}")
    return "\n".join(lines)


def _run_text(s: dict[str, Any]) -> str:
    lines = [f"run directory: {s['path']}"]
    calib = s["calibrate"]
    if calib["state"] == "not started":
        lines.append("  calibrate    not started")
    else:
        lines.append(
            f"  calibrate    {calib['state']}: {calib['batches']}/{calib['batches_expected']} "
            f"batches of {calib['prompts']} prompts ({calib['method']})"
        )
    if not s["sensitivity"]:
        lines.append("  sensitivity  not started")
    for folder, kinds in s["sensitivity"].items():
        for kind, sweep in kinds.items():
            chunks = ", ".join(f"{m} {n} chunks" for m, n in sweep["chunks"].items())
            lines.append(f"  {folder}/{kind:<7} {sweep['state']}: {chunks or 'no chunks'}")
    if not s["quantize"]:
        lines.append("  quantize     no recipe rows yet")
    for key, row in s["quantize"].items():
        st = row["stages"]
        done = [name for name in ("weights", "acts", "export", "report") if st[name]]
        if st["reconstruct"]:
            done.insert(2, f"reconstruct ({st['reconstruct']} units)")
        lines.append(
            f"  quantize/{key}: method {row['method']}, preset {row['preset']}, objective "
            f"{row['objective']}; done: {', '.join(done) or 'nothing yet'}"
        )
        if "out" in row:
            lines.append(f"    exported to {row['out']}")
        report = row.get("report")
        if report:
            lines.append("    " + ", ".join(f"{k} {_fmt(v)}" for k, v in report.items()))
    return "\n".join(lines)


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)

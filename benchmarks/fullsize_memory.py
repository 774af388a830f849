"""Peak memory and wall time of every `mixdq` command on a full-size SDXL-turbo (random weights).

Builds (once, cached) a diffusers-layout SDXL-turbo folder with random weights in fp16 from the
real component configs vendored in ``tests/data/sdxl_turbo`` (about 6.5 GB; torch, diffusers and
transformers build it in a child process), then runs each command
as its own process under ``/usr/bin/time -v`` and records the maximum resident set size and the
wall time. Results go to ``--out``/results.json after every command (a rerun skips finished
ones), so a kill loses at most the running command.

    python benchmarks/fullsize_memory.py --work /tmp/sdxl --dtype float32
    python benchmarks/fullsize_memory.py --work /tmp/sdxl --dtype float16 --only generate_float

The tokenizers (``tokenizer/`` and ``tokenizer_2/``) are SDXL-turbo's real CLIP BPE files
vendored (gzipped) in ``tests/data/sdxl_turbo``, or ``--tokenizers DIR`` (a folder holding both,
e.g. a local stabilityai/sdxl-turbo snapshot).

Commands: float generate, calibrate (2 prompts), fake-quant generate (W8A8 and the official
W3.66 / A7.77 configs), bounded sensitivity sweeps (``--sweep-layers`` layers x 3 bit-widths:
weight and activation SQNR at chunk 1 and 2, weight SSIM at chunk 1), export (W8A8),
generate from the export, `mixdq quantize --method qdiffusion` through its reconstruct
stage on two blocks (calibration included: its own run), and `mixdq quantize --method svdquant
--target W4A4` through its low-rank search and export (calibration included: its own run).
One 512x512 image, 1 step, everywhere. Each sweep runs in its own copy of the calibrated run
with no earlier results (so it measures, not resumes); ``--force`` measures the selected
entries again:

    python benchmarks/fullsize_memory.py --work /tmp/sdxl --dtype float32 --force \
        --only sensitivity_weight_sqnr_2_layers_chunk1 sensitivity_weight_ssim_2_layers_chunk1
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SDXL = REPO / "tests" / "data" / "sdxl_turbo"  # vendored component configs
OFFICIAL = REPO / "tests" / "data" / "mixdq_official" / "final_config"  # vendored released configs
RECON_BLOCKS = ("down_blocks.0.resnets.0", "down_blocks.1.attentions.0.transformer_blocks.0")
MIXDQ = [sys.executable, "-c", "import sys; from mixdq_jax.cli import main; sys.exit(main())"]

BUILD = r'''
import json, shutil, sys
from pathlib import Path
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection
ref, tokenizers, out = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
torch.manual_seed(0)
def save(model, name):
    model.to(torch.float16).save_pretrained(out / name, safe_serialization=True)
cfg = json.loads((ref / "unet_config.json").read_text())
save(UNet2DConditionModel.from_config(cfg), "unet")
save(AutoencoderKL.from_config(json.loads((ref / "vae_config.json").read_text())), "vae")
for name, cls in (("text_encoder", CLIPTextModel), ("text_encoder_2", CLIPTextModelWithProjection)):
    save(cls(CLIPTextConfig(**json.loads((ref / f"{name}_config.json").read_text()))), name)
for name in ("tokenizer", "tokenizer_2"):
    shutil.copytree(tokenizers / name, out / name)
(out / "scheduler").mkdir()
shutil.copy(ref / "scheduler_config.json", out / "scheduler" / "scheduler_config.json")
index = {
    "_class_name": "StableDiffusionXLPipeline", "force_zeros_for_empty_prompt": True,
    "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
    "text_encoder": ["transformers", "CLIPTextModel"],
    "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "tokenizer_2": ["transformers", "CLIPTokenizer"],
    "scheduler": ["diffusers", "EulerAncestralDiscreteScheduler"],
}
(out / "model_index.json").write_text(json.dumps(index, indent=1))
'''


def vendored_tokenizers(dest: Path) -> Path:
    """SDXL-turbo's two tokenizer folders from the vendored files (one gzipped vocab/merges)."""
    for name in ("tokenizer", "tokenizer_2"):
        folder = dest / name
        folder.mkdir(parents=True, exist_ok=True)
        for data in ("vocab.json", "merges.txt"):
            raw = (SDXL / "tokenizer" / f"{data}.gz").read_bytes()
            (folder / data).write_bytes(gzip.decompress(raw))
        for config in ("tokenizer_config.json", "special_tokens_map.json"):
            shutil.copy(SDXL / name / config, folder / config)
    return dest


def build_model(work: Path, tokenizers: Path | None) -> Path:
    """The cached random-weight SDXL-turbo folder (built into a temp folder, then renamed)."""
    folder = work / "sdxl-turbo-random"
    if (folder / "model_index.json").is_file():
        return folder
    tmp = work / "sdxl-turbo-random.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    print(f"building {folder} (random fp16 weights, ~6.5 GB)", flush=True)
    if tokenizers is None:
        tokenizers = vendored_tokenizers(work / "tokenizers")
    cmd = [sys.executable, "-c", BUILD, str(SDXL), str(tokenizers), str(tmp)]
    subprocess.run(cmd, check=True)
    tmp.rename(folder)
    return folder


def commands(model: Path, work: Path, dtype: str, sweep_layers: int) -> dict[str, list[str]]:
    run = work / f"run_{dtype}"
    d = ["--dtype", dtype]
    gen = [*MIXDQ, "generate", "--prompt", "a cat on a red sofa", "--height", "512",
           "--width", "512", *d]  # fmt: skip
    layers = work / f"sweep_layers_{sweep_layers}.yaml"
    official = [
        "--weight-bits", str(OFFICIAL / "weight" / "weight_3.66.yaml"),
        "--act-bits", str(OFFICIAL / "act" / "act_7.77.yaml"), "--symmetric-weights",
    ]  # fmt: skip

    def sweep(kind: str, metric: str, chunk: int) -> tuple[str, list[str]]:
        name = f"sensitivity_{kind}_{metric}_{sweep_layers}_layers_chunk{chunk}"
        return name, [*MIXDQ, "sensitivity", "--model", str(model), "--run",
                      str(sweep_run(work, dtype, name)), "--kind", kind, "--metric", metric,
                      "--chunk", str(chunk), "--layers", str(layers), *d]  # fmt: skip

    sweeps = [("weight", "sqnr", 1), ("act", "sqnr", 1), ("weight", "ssim", 1)]
    sweeps += [("weight", "sqnr", 2), ("act", "sqnr", 2)]
    export = work / f"export_{dtype}"
    return {
        "generate_float": [*gen, "--model", str(model), "--out", str(work / f"gen_float_{dtype}")],
        "calibrate_2_prompts": [*MIXDQ, "calibrate", "--model", str(model), "--run", str(run),
                                "--num-prompts", "2", "--batch-size", "2", *d],
        "generate_w8a8": [*gen, "--model", str(model), "--weight-bits", "8", "--act-bits", "8",
                          "--calib", str(run), "--out", str(work / f"gen_w8a8_{dtype}")],
        "generate_official_w3.66_a7.77": [*gen, "--model", str(model), *official, "--calib",
                                          str(run), "--out", str(work / f"gen_off_{dtype}")],
        **dict(sweep(*s) for s in sweeps),
        "export_w8a8": [*MIXDQ, "export", "--model", str(model), "--weight-bits", "8",
                        "--act-bits", "8", "--calib", str(run), "--out", str(export), *d],
        "generate_from_export": [*gen, "--model", str(export), "--out",
                                 str(work / f"gen_export_{dtype}")],
        # Q-Diffusion's reconstruction on two blocks (a top-level resnet, then the first
        # transformer block, 1024 tokens): calibration on 2 prompts, 10 + 5 steps per block
        "reconstruct_qdiffusion_w4a8_2_blocks": [
            *MIXDQ, "quantize", "--model", str(model), "--run", str(work / f"recon_{dtype}"),
            "--target", "W4A8", "--method", "qdiffusion", "--num-calib", "2", "--num-select",
            "1", "--batch-size", "2", "--recon-iters", "10", "--recon-act-iters", "5",
            "--recon-batch", "2", "--recon-lr", "5e-3", "--recon-blocks", RECON_BLOCKS[0],
            RECON_BLOCKS[1], "--stop-after", "reconstruct", *d],
        # SVDQuant's W4A4 through its low-rank search and the export (issue 26), calibrating
        # 2 prompts in its own run; one smoothing strength (the search's memory does not grow
        # with the number tried: they run one after another), rank 32, groups of 64
        "export_svdquant_w4a4": [
            *MIXDQ, "quantize", "--model", str(model), "--run", str(work / f"svdq_{dtype}"),
            "--target", "W4A4", "--method", "svdquant", "--lowrank-alphas", "0.5",
            "--num-calib", "2", "--num-select", "1", "--batch-size", "2", "--height", "512",
            "--width", "512", "--stop-after", "export", "--out", str(work / f"svdq_out_{dtype}"),
            *d],
    }  # fmt: skip


def sweep_run(work: Path, dtype: str, name: str) -> Path:
    """The run directory of one sweep entry (its own, so that results of another entry or an
    earlier measurement are not resumed)."""
    return work / f"run_{dtype}_{name}"


def fresh_outputs(cmd: list[str], work: Path, dtype: str, name: str) -> None:
    """Remove what an earlier measurement of the entry wrote, so that the command does the work
    again instead of resuming: its ``--out`` folder, the calibration, or the sweep's run (which
    gets a copy of the calibrated run's ``calib/``)."""
    if "--out" in cmd:
        shutil.rmtree(cmd[cmd.index("--out") + 1], ignore_errors=True)
    if name.startswith("calibrate"):
        shutil.rmtree(work / f"run_{dtype}" / "calib", ignore_errors=True)
    if name.startswith("reconstruct"):
        shutil.rmtree(work / f"recon_{dtype}", ignore_errors=True)
    if name.startswith("export_svdquant"):  # calibration is measured by its own entry
        shutil.rmtree(work / f"svdq_{dtype}", ignore_errors=True)
    if name.startswith("sensitivity_"):
        run = sweep_run(work, dtype, name)
        shutil.rmtree(run, ignore_errors=True)
        shutil.copytree(work / f"run_{dtype}" / "calib", run / "calib")


def write_sweep_layers(work: Path, n: int) -> None:
    """The first ``n`` layers of the SDXL registry with a content and a quality layer."""
    sys.path.insert(0, str(REPO))
    from mixdq_jax.quant.registry import registry_from_unet_config  # noqa: PLC0415

    layers = registry_from_unet_config(SDXL / "unet_config.json")
    content = [la.name for la in layers if la.group == "content"][: n // 2]
    quality = [la.name for la in layers if la.group == "quality"][: n - len(content)]
    path = work / f"sweep_layers_{n}.yaml"
    path.write_text("".join(f"- model.{name}\n" for name in content + quality))


def measure(cmd: list[str], log: Path) -> dict:
    """Run under ``/usr/bin/time -v``: exit code, wall seconds, max RSS (GB)."""
    t0 = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.run(
            ["/usr/bin/time", "-v", *cmd], stdout=f, stderr=subprocess.STDOUT, cwd=REPO,
            env={**os.environ, "PYTHONPATH": str(REPO)},
        )  # fmt: skip
    wall = time.perf_counter() - t0
    text = log.read_text(errors="replace")
    rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", text)
    return {
        "exit_code": proc.returncode,
        "wall_s": round(wall, 1),
        "max_rss_gb": round(int(rss.group(1)) / 1024**2, 2) if rss else None,
        "log": str(log),
        "command": "mixdq " + " ".join(cmd[3:]),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", type=Path, required=True, help="model folder, runs and results")
    ap.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    ap.add_argument("--sweep-layers", type=int, default=2)
    ap.add_argument("--only", nargs="*", default=None, help="run only these entries")
    ap.add_argument("--force", action="store_true", help="measure entries already measured")
    ap.add_argument("--tokenizers", type=Path, default=None,
                    help="folder with tokenizer/ and tokenizer_2/ (used when the model is built; "
                    "default: SDXL-turbo's vendored in tests/data/sdxl_turbo)")  # fmt: skip
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    model = build_model(args.work, args.tokenizers)
    write_sweep_layers(args.work, args.sweep_layers)
    results_path = args.work / "results.json"
    results = json.loads(results_path.read_text()) if results_path.is_file() else {}
    done = results.setdefault(args.dtype, {})
    for name, cmd in commands(model, args.work, args.dtype, args.sweep_layers).items():
        if args.only is not None and name not in args.only:
            continue
        if name in done and done[name]["exit_code"] == 0 and not args.force:
            continue
        fresh_outputs(cmd, args.work, args.dtype, name)
        print(f"[{args.dtype}] {name} ...", flush=True)
        done[name] = measure(cmd, args.work / f"{name}_{args.dtype}.log")
        print(f"[{args.dtype}] {name}: {done[name]}", flush=True)
        tmp = results_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(results, indent=1))
        tmp.replace(results_path)
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()

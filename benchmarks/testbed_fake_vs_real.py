"""Fake quantization vs the real low-bit path on the testbed, and why they differ at A8.

For each configuration, 64 held-out test captions at 1 step (caption i uses seed i, as
`mixdq evaluate` does):

- images of the fake-quantized pipeline, of the real integer path (`deploy_pipeline`, XLA
  int8 backend) with the unquantized params kept in float32, and with them stored in fp16
  (what `mixdq export` writes by default);
- the *rounding floor*: the fake path against itself with every float UNet parameter moved
  by one ulp (`np.nextafter`): the same computation with a float-rounding-sized change in
  every layer, as the real path's integer accumulation makes;
- the content score (judge) and SSIM against the float images of both paths;
- for the A8 configurations, where the paths first disagree inside the UNet (one forward at
  t = 999 on the same inputs): the first layer whose 8-bit input codes differ, how far that
  input was from a rounding boundary, and the fraction of flipped codes per block.

Needs a calibration run (`mixdq demo --out runs/demo`, or `mixdq calibrate --model testbed
--run runs/demo`). Run: ``.venv/bin/python benchmarks/testbed_fake_vs_real.py [--num 64]``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mixdq_jax.api import qconfig_for  # noqa: E402
from mixdq_jax.deploy import Deployed, deploy_pipeline  # noqa: E402
from mixdq_jax.deploy.checkpoint import freeze  # noqa: E402
from mixdq_jax.deploy.packed import node_at  # noqa: E402
from mixdq_jax.metrics import ssim_global  # noqa: E402
from mixdq_jax.quant import FakeQuant, QuantSpec, intercept  # noqa: E402
from mixdq_jax.rundir import RunDir  # noqa: E402
from mixdq_jax.testbed import data, judge  # noqa: E402
from mixdq_jax.testbed.evaluate import generate, load_testbed  # noqa: E402
from pallas_kernels import quantize_activation  # noqa: E402
from tests.deploy.conftest import capture_layer_io  # noqa: E402

CONFIGS = {
    "W4A16": QuantSpec(weight_bits=4, act_bits=16),
    "W8A8": QuantSpec(weight_bits=8, act_bits=8),
    "W4A8 (sym)": QuantSpec(weight_bits=4, act_bits=8, symmetric_weights=True),
}


def first_divergence(pipe, spec, ranges, captions) -> dict:
    """Where fake and real first disagree inside one UNet forward (8-bit input codes)."""
    plan, packed, _ = freeze(pipe, spec, ranges)
    qconfig = qconfig_for(pipe, spec, ranges)
    context, pooled = pipe.prompt_embeddings(list(captions), None, 0.0)
    cond = pipe.conditioning(context, pooled, 0.0, data.SIZE, data.SIZE)
    n = pipe.unet.config.sample_size
    x = jax.random.normal(jax.random.key(0), (len(captions), 4, n, n))
    t = jnp.float32(999.0)
    names = set(plan.layers)
    fake = capture_layer_io(pipe, pipe.params["unet"], x, t, cond, names,
                            inner=lambda: intercept(FakeQuant(), qconfig))  # fmt: skip
    deployed = Deployed(plan=plan, backend="xla")
    real = capture_layer_io(pipe, packed, x, t, cond, names,
                            inner=lambda: intercept(deployed))  # fmt: skip
    first, per_block = None, {}
    for name, (_, xf, _) in fake.items():
        xr = real[name][1]
        p, lp = node_at(packed, name), plan.layers[name]
        n_flip = n_all = 0
        for j, (a, b) in enumerate(lp.parts()):
            q = p[f"q{j}"]
            # the codes both paths compute (f32; an f64 recomputation rounds some
            # boundary values differently)
            cf, cr = (np.asarray(quantize_activation(v[..., a:b], q["a_scale"], q["a_zp"],
                                                     bits=8, backend="xla"))
                      for v in (xf, xr))  # fmt: skip
            flips = cf != cr
            n_flip += int(flips.sum())
            n_all += flips.size
            if flips.any() and first is None:
                u = np.asarray(xf[..., a:b], np.float32)[flips] / np.float32(q["a_scale"])
                xf64, xr64 = np.asarray(xf, np.float64), np.asarray(xr, np.float64)
                first = {
                    "layer": name,
                    "codes_flipped": int(flips.sum()),
                    "input_rel_diff": float(np.abs(xf64 - xr64).max() / np.abs(xf64).max()),
                    "distance_to_boundary_in_steps": float(
                        np.abs(np.abs(u - np.floor(u)) - 0.5).max()
                    ),
                }
        parts = name.split(".")
        block = ".".join(parts[:2]) if parts[0] in ("down_blocks", "up_blocks") else parts[0]
        f, n = per_block.get(block, (0, 0))
        per_block[block] = (f + n_flip, n + n_all)
    return {"first_flip": first,
            "flipped_code_fraction": {k: f / n for k, (f, n) in per_block.items() if n}}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--num", type=int, default=64)
    ap.add_argument("--calib", default="runs/demo")
    args = ap.parse_args()
    scenes = data.sample_scenes(args.num, seed=2024, split="test")
    caps = scenes.captions
    fp = load_testbed()
    ranges = RunDir(args.calib).act_ranges()
    jparams = judge.load_judge()

    def content(img):
        return judge.content_score(judge.read(jparams, img)[1], scenes).content_score

    def ssim(a, b):
        return float(np.mean(ssim_global(a * 255.0, b * 255.0)))

    fp_ulp = fp.with_params(unet=jax.tree.map(
        lambda a: np.nextafter(np.asarray(a), np.float32(np.inf)), fp.params["unet"]))

    def images(pipe, qconfig=None):  # caption i uses seed i in every pipeline
        return generate(pipe, caps, steps=1, qconfig=qconfig)

    ref = images(fp)
    out = {"float": {"content_score": content(ref),
                     "rounding_floor_max": float(np.abs(ref - images(fp_ulp)).max())}}
    for name, spec in CONFIGS.items():
        real_pipe = deploy_pipeline(fp, spec, ranges, backend="xla")
        real16 = deploy_pipeline(fp, spec, ranges, backend="xla", float_dtype=jnp.float16)
        fake = images(fp, qconfig_for(fp, spec, ranges))
        real, r16 = (images(p) for p in (real_pipe, real16))
        fake_ulp = images(fp_ulp, qconfig_for(fp_ulp, spec, ranges))
        row = {
            "fake_vs_real": {"max": float(np.abs(fake - real).max()),
                             "mean": float(np.abs(fake - real).mean())},
            "fake_vs_real_fp16_params": {"max": float(np.abs(fake - r16).max()),
                                         "mean": float(np.abs(fake - r16).mean())},
            "fake_rounding_floor": {"max": float(np.abs(fake - fake_ulp).max()),
                                    "mean": float(np.abs(fake - fake_ulp).mean())},
            "fake_vs_float_mean": float(np.abs(fake - ref).mean()),
            "content_score": {"fake": content(fake), "real": content(real)},
            "ssim_vs_float": {"fake": ssim(fake, ref), "real": ssim(real, ref)},
        }  # fmt: skip
        if spec.act_bits != 16:
            row["inside_unet"] = first_divergence(fp, spec, ranges, caps[:16])
        out[name] = row
        print(name, json.dumps(row, indent=1), flush=True)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()

"""Fake-quantized vs real low-bit (exported) testbed: image differences on 32 test captions.

Needs a calibration run and three exports first:

    mixdq demo --out runs/demo      # or: mixdq calibrate --model testbed --run runs/demo
    mixdq export --model testbed --weight-bits 8 --act-bits 8 --calib runs/demo --out /tmp/tb_w8a8
    mixdq export --model testbed --weight-bits 4 --act-bits 8 --symmetric-weights \
        --calib runs/demo --out /tmp/tb_w4a8_sym
    mixdq export --model testbed --weight-bits 4 --act-bits 16 --calib runs/demo --out /tmp/tb_w4a16
    .venv/bin/python benchmarks/testbed_fake_vs_real.py
"""

import json

import numpy as np

from mixdq_jax.pipeline import load_pipeline
from mixdq_jax.quant import QuantSpec, quantize_pipeline
from mixdq_jax.testbed import data

caps = list(data.sample_scenes(32, seed=2024, split="test").captions)
fp = load_pipeline("testbed")
out = {}
for name, (w, a, sym) in {
    "w8a8": (8, 8, False),
    "w4a8_sym": (4, 8, True),
    "w4a16": (4, 16, False),
}.items():
    spec = QuantSpec(weight_bits=w, act_bits=a, symmetric_weights=sym)
    fake = quantize_pipeline(fp, spec, calib="runs/demo")(caps, height=64, width=64, seed=0)
    real = load_pipeline(f"/tmp/tb_{name}")(caps, height=64, width=64, seed=0)
    ref = fp(caps, height=64, width=64, seed=0)
    out[name] = {
        "max_abs_fake_vs_real": float(np.abs(fake - real).max()),
        "mean_abs_fake_vs_real": float(np.abs(fake - real).mean()),
        "max_abs_fake_vs_float": float(np.abs(fake - ref).max()),
        "mean_abs_fake_vs_float": float(np.abs(fake - ref).mean()),
    }
print(json.dumps(out, indent=1))

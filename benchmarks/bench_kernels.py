"""Times the quantized GEMM/conv kernels on SDXL shapes against float dots; prints JSON.

    .venv/bin/python -m benchmarks.bench_kernels [--repeats 10] [--interpret] [--out FILE]

Every entry is the median wall time (ms) of `repeats` calls of a jitted function after one
warm-up call, on whatever backend JAX has. On CPU the "pallas" entries run in interpret mode
(only with --interpret; they measure the interpreter, not a kernel) and int8 has no hardware
advantage over f32 (no VNNI on the development machine); GPU numbers must come from a GPU.
"""

from __future__ import annotations

import argparse
import json

from mixdq_jax.deploy.latency import CONV_SHAPES, GEMM_SHAPES, run_kernel_bench

__all__ = ["CONV_SHAPES", "GEMM_SHAPES", "main", "run_kernel_bench"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument(
        "--interpret",
        action="store_true",
        help="on CPU, also time the Pallas kernels in interpret mode",
    )
    parser.add_argument("--out", help="also write the JSON here")
    args = parser.parse_args()
    result = run_kernel_bench(repeats=args.repeats, include_interpret=args.interpret)
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()

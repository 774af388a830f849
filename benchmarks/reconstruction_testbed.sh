#!/usr/bin/env bash
# The paper's reconstruction baselines on the testbed, measured as a user would: `mixdq quantize
# --method M --target T`, then `mixdq evaluate --model QDIR --num 256` (the testbed's judge on
# 256 held-out test captions, vs the float model the folder came from). Rows: Table 1's
# Q-Diffusion settings (W8A16, W4A16, W8A8, W4A8) beside naive PTQ and MixDQ, Table 2 at W8A8
# (PTQD, Q-Diffusion, EDA-DM, naive, MixDQ), and MixDQ with learned rounding at W3.66A16 and
# W4A8. All rows share one run directory (calibration and sweeps are computed once); each row's
# quantize time is recorded when it runs (a resumed row keeps its first time). Reconstruction
# settings (RECON_*) are smaller than BRECQ's 20000 steps to fit a 2-core CPU; the README states
# them. EDA-DM runs as `edadm-testbed` (the released `edadm` calibrates on 256 prompts; these
# rows use 16). STEPS (default 1) samples that many steps (the testbed's LCM sampler above
# one, in quantize and evaluate alike). Writes $OUT/summary.md. Resumable: run it again after
# a kill.
set -euo pipefail
cd "$(dirname "$0")/.."
MIXDQ=${MIXDQ:-.venv/bin/mixdq}
OUT=${OUT:-runs/reconstruction_testbed}
ITERS=${RECON_ITERS:-500}
ACT_ITERS=${RECON_ACT_ITERS:-125}
LR=${RECON_LR:-5e-3}
STEPS=${STEPS:-1}
COMMON=(--model testbed --steps "$STEPS" --num-calib 16 --num-select 8 --batch-size 16 --chunk 16
        --recon-iters "$ITERS" --recon-act-iters "$ACT_ITERS" --recon-batch 16 --recon-lr "$LR")
# in the order of the questions they answer: Q-Diffusion vs naive at W4A16, MixDQ with learned
# rounding at W3.66A16, Table 2 at W8A8, then W4A8 and W8A16
ROWS=${ROWS:-"naive W4A16
qdiffusion W4A16
mixdq W3.66A16
mixdq+adaround W3.66A16
naive W8A8
qdiffusion W8A8
ptqd W8A8
edadm-testbed W8A8
mixdq W8A8
naive W4A8
qdiffusion W4A8
mixdq W4A8
mixdq+adaround W4A8
naive W8A16
qdiffusion W8A16"}
mkdir -p "$OUT"

if [ ! -f "$OUT/eval-float/metrics.json" ]; then  # the float model on the same captions
  "$MIXDQ" evaluate --model testbed --steps "$STEPS" --num 256 --out "$OUT/eval-float" \
    > "$OUT/eval-float.log" 2>&1 < /dev/null
fi

while read -r method target; do
  name="$method-$target"
  if [ ! -f "$OUT/$name.seconds" ]; then
    start=$(date +%s)
    "$MIXDQ" quantize "${COMMON[@]}" --method "$method" --target "$target" --run "$OUT/run" \
      --out "$OUT/$name" > "$OUT/$name.quantize.log" 2>&1 < /dev/null
    echo $(( $(date +%s) - start )) > "$OUT/$name.seconds"
  fi
  if [ ! -f "$OUT/eval-$name/metrics.json" ]; then
    "$MIXDQ" evaluate --model "$OUT/$name" --steps "$STEPS" --num 256 --out "$OUT/eval-$name" \
      > "$OUT/eval-$name.log" 2>&1 < /dev/null
  fi
done <<< "$ROWS"

"${MIXDQ%mixdq}python" - "$OUT" "$ROWS" "$ITERS" "$ACT_ITERS" "$LR" "$STEPS" <<'PY'
import json, sys
from pathlib import Path
out, rows = Path(sys.argv[1]), sys.argv[2].splitlines()
iters, act_iters, lr, steps = sys.argv[3:7]
lines = [f"Reconstruction: {iters} weight steps and {act_iters} activation-step steps per "
         f"block, batch 16, Adam at {lr}. {steps} sampling step(s). Judge on 256 held-out "
         "test captions.", "",
         "| method | target | W bits | A bits (eff.) | content score | Frechet dist. | "
         "SSIM vs FP | PSNR vs FP | quantize time |", "|---|---|---|---|---|---|---|---|---|"]
fp = json.loads((out / "eval-float/metrics.json").read_text())
lines.append(f"| float | - | 16 | 16 | {fp['content_score']:.3f} | {fp['frechet_distance']:.1f} "
             "| 1 | - | - |")
for row in rows:
    method, target = row.split()
    name = f"{method}-{target}"
    if not (out / f"eval-{name}/metrics.json").is_file():
        continue  # not run yet (the loop above stopped or was killed)
    rep = json.loads((out / f"run/quantize/{target}_{method}/report.json").read_text())
    m = json.loads((out / f"eval-{name}/metrics.json").read_text())
    seconds = int((out / f"{name}.seconds").read_text())
    lines.append(f"| {method} | {target} | {rep['weight_avg_bits']:.2f} | "
                 f"{rep['act_effective_bits']:.2f} | {m['content_score']:.3f} | "
                 f"{m['frechet_distance']:.1f} | {m['ssim_vs_fp']:.4f} | "
                 f"{m['psnr_vs_fp']:.1f} | {seconds / 60:.1f} min |")
text = "\n".join(lines) + "\n"
(out / "summary.md").write_text(text)
print(text)
PY

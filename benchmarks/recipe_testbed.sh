#!/usr/bin/env bash
# `mixdq quantize` on the testbed, measured the way a user would: quantize, then
# `mixdq evaluate --model QDIR` on 256 held-out test captions (vs the float model it came from).
# Rows: the two quantizer presets (ours, official) at W4A8 and W3.66A16, and naive W4A8 (the
# recipe's `--method naive`). Writes runs/recipe_testbed/summary.md. About 15 min on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."
MIXDQ=${MIXDQ:-.venv/bin/mixdq}
OUT=${OUT:-runs/recipe_testbed}
COMMON=(--model testbed --num-calib 16 --num-select 8 --batch-size 16 --chunk 16)
mkdir -p "$OUT"

row() {  # name preset method target
  local name=$1 preset=$2 method=$3 target=$4
  "$MIXDQ" quantize "${COMMON[@]}" --preset "$preset" --method "$method" --target "$target" \
    --run "$OUT/run-$preset" --out "$OUT/$name" > "$OUT/$name.quantize.log" 2>&1
  if [ ! -f "$OUT/eval-$name/metrics.json" ]; then
    "$MIXDQ" evaluate --model "$OUT/$name" --num 256 --out "$OUT/eval-$name" > /dev/null
  fi
}

row ours-mixdq-W4A8 ours mixdq W4A8
row official-mixdq-W4A8 official mixdq W4A8
row ours-naive-W4A8 ours naive W4A8
row ours-mixdq-W3.66A16 ours mixdq W3.66A16
row official-mixdq-W3.66A16 official mixdq W3.66A16

"${MIXDQ%mixdq}python" - "$OUT" <<'PY'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
lines = ["| row | W bits | A bits (eff.) | content score | Frechet dist. | SSIM vs FP | PSNR vs FP |",
         "|---|---|---|---|---|---|---|"]
for name in ("ours-naive-W4A8", "ours-mixdq-W4A8", "official-mixdq-W4A8",
             "ours-mixdq-W3.66A16", "official-mixdq-W3.66A16"):
    preset, method, target = name.split("-")
    rep = json.loads((out / f"run-{preset}/quantize/{target}_{method}/report.json").read_text())
    m = json.loads((out / f"eval-{name}/metrics.json").read_text())
    lines.append(f"| {name} | {rep['weight_avg_bits']:.2f} | {rep['act_effective_bits']:.2f} | "
                 f"{m['content_score']:.3f} | {m['frechet_distance']:.1f} | "
                 f"{m['ssim_vs_fp']:.4f} | {m['psnr_vs_fp']:.1f} |")
text = "\n".join(lines) + "\n"
(out / "summary.md").write_text(text)
print(text)
PY

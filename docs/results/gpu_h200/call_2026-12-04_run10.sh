#!/usr/bin/env bash
# Device call 10 (2026-12-04, eleventh session): call 9 found the Pallas convolution no faster
# than im2col in bare SGD at 50 lanes (2.23 against 2.19 ms) for 44 % fewer bytes. So: each
# pass on its own (benchmarks/conv_passes.py) at 50 and 10 lanes, im2col's against the kernels'
# at several tile settings; then cohorts 200 and 10 with the kernels at the setting fastest over
# the three passes at 50 lanes (set in conv_kernels' globals for this experiment only).
set -u
export PYTHONUNBUFFERED=1
py="${PYTHON:-python3}"
budget="${BUDGET:-330}"
out="${OUT:?}"
if compgen -G ".whl/*.whl" > /dev/null; then
  "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="${PYTHONPATH:-}:."
timeout 170 "$py" benchmarks/conv_passes.py --lanes=50,10 --json="$out/conv_passes.json" \
    --tiles=128x4x4x2,64x4x4x2,128x4x8x2,128x4x4x3,128x16x4x2,64x4x2x2,256x4x8x2,128x1x4x2 \
    > "$out/passes.txt" 2>&1
echo "passes rc $?" >> "$out/passes.txt"
tile=$("$py" -c '
import json, sys, math
rows = [r for r in json.load(open(sys.argv[1])) if r["form"] == "pallas" and r["lanes"] == 50]
rows = [r for r in rows if all(math.isfinite(v) for v in r["ms"].values())]
print(min(rows, key=lambda r: sum(r["ms"].values()))["tile"] if rows else "128x4x4x2")' \
    "$out/conv_passes.json" 2>/dev/null || echo 128x4x4x2)
echo "fastest tile at 50 lanes: $tile" >> "$out/passes.txt"
for cohort in 200 10; do
  left=$(( budget - SECONDS )); [ "$left" -lt 40 ] && break
  timeout $(( left < 75 ? left : 75 )) "$py" - "$tile" "$cohort" "$out" >> "$out/passes.txt" 2>&1 <<'PY'
import runpy, sys
from fathom_sim import conv_kernels as ck
tile, cohort, out = sys.argv[1:4]
ck.ROWS, ck.SPLITS, ck.WARPS, ck.STAGES = map(int, tile.split('x'))
sys.argv = ['launch/benchmark.py', '--tasks=cnn', f'--cohort_sizes={cohort}', '--rounds=5',
            '--warmup=2', '--in_memory=True', '--conv=pallas',
            f'--json={out}/bench_cnn_{cohort}_pallas_{tile}.json']
runpy.run_path('launch/benchmark.py', run_name='__main__')
PY
done
grep -v '^[IW][0-9]' "$out/passes.txt" | tail -n 40

#!/usr/bin/env bash
# Device call 5 (2026-12-04, later session, a fresh H200), at bd0bc38: lanes_per_device auto
# (--lanes_per_device=0, the lanes it picks recorded in each row's JSON) against one client a
# lane (min(cohort, 50)) for the cohorts call 4 left predicted only: CNN 10, 100, 200 (and 67
# lanes at 200, lane_counts.py's fastest there), LSTM 10, 100, 200. Data on the GPU, FedAvg,
# float32, as `bash benchmarks/gpu.sh lanes OUT`. Carry .whl (benchmarks/gpu.sh's header).
# Every row has its own time limit inside BUDGET seconds; a row that fails or runs out says so
# and the next still runs. Dry run on a CPU: ROWS=cnn:10:0 ROUNDS=1 WARMUP=1 BUDGET=200 PYTHON=...
set -u
export PYTHONUNBUFFERED=1
py="${PYTHON:-python3}"
budget="${BUDGET:-520}"
out="${OUT:?}"
rows="${ROWS:-cnn:200:0 cnn:200:50 cnn:10:0 cnn:10:10 lstm:100:0 lstm:100:50 lstm:200:0 \
lstm:200:50 lstm:10:0 lstm:10:10 cnn:100:0 cnn:100:50 cnn:200:67}"
if compgen -G ".whl/*.whl" > /dev/null; then
  "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site
fi
{ date -u; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader \
    2>/dev/null || echo 'no nvidia-smi'; git log --oneline -1 2>/dev/null | cut -c1-60
  "$py" -c 'import jax, flax, optax; print("jax", jax.__version__, "flax", flax.__version__,
"optax", optax.__version__, jax.devices())'
} > "$out/env.txt" 2>&1
for row in $rows; do
  IFS=: read -r task cohort lanes <<< "$row"
  left=$(( budget - SECONDS ))
  if [ "$left" -lt 35 ]; then echo "== $row skipped ($left s left)" >> "$out/lanes.txt"; continue; fi
  limit=$(( left < 90 ? left : 90 )); t0=$SECONDS
  timeout "$limit" "$py" launch/benchmark.py --tasks="$task" --cohort_sizes="$cohort" \
      --rounds="${ROUNDS:-5}" --warmup="${WARMUP:-2}" --in_memory=True \
      --lanes_per_device="$lanes" --json="$out/lanes_${task}_${cohort}_$lanes.json" \
      > "$out/row.log" 2>&1
  rc=$?
  line=$(grep -v '^[IW][0-9]' "$out/row.log" | tail -n 1)
  got=$("$py" -c 'import json, sys; print(json.load(open(sys.argv[1]))[0]["lanes"])' \
      "$out/lanes_${task}_${cohort}_$lanes.json" 2>/dev/null || echo '?')
  echo "$line  (lanes $got, flag $lanes; rc $rc, $(( SECONDS - t0 )) s)" >> "$out/lanes.txt"
  [ "$rc" = 0 ] || tail -n 5 "$out/row.log" >> "$out/lanes.txt"
done
rm -f "$out/row.log"
cat "$out/lanes.txt"

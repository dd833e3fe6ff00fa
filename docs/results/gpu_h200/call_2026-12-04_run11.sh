#!/usr/bin/env bash
# Device call 11 (2026-12-04, eleventh session), the session's last: call 10 timed every pass of
# the second convolution at 0.2-0.4 TB/s of its least bytes, both forms: so are the passes bound
# by arithmetic? Each pass at 50 lanes in float32 at JAX's default precision and at 'highest',
# and in bfloat16 (conv_passes.py); then 1500 FATHOM rounds at matmul_precision='highest' (seed
# 0, the TF32 question on issue 8), then with conv='pallas' at the default precision, as long as
# BUDGET lasts. Carry .whl. Each FATHOM run starts from an empty compilation cache.
set -u
export PYTHONUNBUFFERED=1
budget="${BUDGET:-270}"
out="${OUT:?}"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:.
timeout 80 python3 benchmarks/conv_passes.py --lanes=50 --tiles=128x4x4x2,64x4x2x2 \
    --dtypes=float32,bfloat16 --precisions=default,highest --repeats=10 \
    --json="$out/conv_passes_precision.json" > "$out/passes.txt" 2>&1
echo "passes rc $? at $SECONDS s" >> "$out/passes.txt"
fathom() {  # name extra-flags...
  local name=$1; shift
  local left=$(( budget - SECONDS ))
  if [ "$left" -lt 60 ]; then echo "$name skipped ($left s left)" >> "$out/passes.txt"; return; fi
  rm -rf /tmp/c_$name
  local s=$(date +%s.%N)
  timeout "$left" python3 launch/main.py --config=configs/femnist.py --workdir=/tmp/w_$name \
      --compilation_cache=/tmp/c_$name --config.data.name=femnist_synthetic \
      --config.data.num_clients=3400 --config.data.in_memory=True \
      --config.num_rounds=1500 --config.eval_every=100 --config.eval_clients=340 \
      --config.checkpoint_every=500 "$@" > /tmp/log_$name.txt 2>&1
  echo "$name rc $? end to end $(python3 -c "import time; print(time.time() - $s)") s" \
      >> "$out/passes.txt"
  cp /tmp/w_$name/summary.json "$out/fathom1500_${name}_summary.json" 2>/dev/null
  gzip -c /tmp/log_$name.txt > "$out/fathom1500_${name}_log.txt.gz"
}
fathom highest --config.matmul_precision=highest
fathom pallas --config.model.conv=pallas
grep -v '^[IW][0-9]' "$out/passes.txt"

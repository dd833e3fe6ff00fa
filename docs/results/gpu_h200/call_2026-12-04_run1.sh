#!/usr/bin/env bash
# One H200 device call (2026-12-04): the CNN's cohorts 10 and 200 at HEAD (float32, the auto
# convolution), every convolution form at 50 lanes in bfloat16 and float32 (conv_vmap.py),
# 1500 FATHOM rounds end to end (float32, auto), then cohorts 10 and 200 with each dtype's
# fastest form.
# Each step has its own time limit inside BUDGET seconds; a step that fails or runs out says so
# and the next still runs. Sized down for a dry run on a CPU with COHORTS, CONV_LANES, STEPS,
# FATHOM_ROUNDS, BUDGET and PYTHON.
set -u
export PYTHONUNBUFFERED=1
py="${PYTHON:-python3}"
budget="${BUDGET:-545}"
cohorts="${COHORTS:-10,200}"
out="${OUT:?}"
if compgen -G ".whl/*.whl" > /dev/null; then
  "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site
fi
g=/tmp/g; rm -rf $g; mkdir -p $g/bench
left() { echo $(( budget - SECONDS )); }
{ date -u; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader \
    2>/dev/null || echo 'no nvidia-smi'; git log --oneline -1 2>/dev/null
  "$py" -c 'import jax, flax, optax, orbax.checkpoint as o; print("jax", jax.__version__,
"flax", flax.__version__, "optax", optax.__version__, "orbax", o.__version__, jax.devices())'
} > $out/env.txt 2>&1
bench() {  # name limit flags...
  local name=$1 limit=$2; shift 2
  [ "$(left)" -gt 40 ] || { echo "== $name skipped ($(left) s left)" >> $out/bench.txt; return; }
  [ "$limit" -lt "$(left)" ] || limit=$(left)
  local t0=$SECONDS
  timeout $limit "$py" launch/benchmark.py --tasks=cnn --cohort_sizes=$cohorts --rounds=5 \
      --warmup=2 --in_memory=True --json=$g/bench/$name.json "$@" > $g/$name.txt 2>&1
  local rc=$?
  echo "== $name rc $rc, $((SECONDS - t0)) s ($*)" >> $out/bench.txt
  grep -v '^[IW][0-9]' $g/$name.txt | tail -n 12 >> $out/bench.txt
}
best() {  # dtype: the fastest form at the most lanes in conv_forms.json
  "$py" - $out/conv_forms.json "$1" <<'PY'
import json, sys
rows = [r for r in json.load(open(sys.argv[1])) if r['dtype'] == sys.argv[2]]
most = max(r['lanes'] for r in rows)
print(min((r for r in rows if r['lanes'] == most), key=lambda r: r['ms_per_step'])['conv'])
PY
}
fathom() {  # name limit flags...
  local name=$1 limit=$2 start end; shift 2
  [ "$(left)" -gt 60 ] || { echo "== $name skipped ($(left) s left)" >> $out/log.txt; return; }
  [ "$limit" -lt "$(left)" ] || limit=$(left)
  start=$(date +%s.%N)
  timeout $limit "$py" launch/main.py --config=configs/femnist.py --workdir=$g/$name \
      --compilation_cache=$g/cache_$name \
      --config.data.name=femnist_synthetic --config.data.num_clients=3400 \
      --config.data.in_memory=True --config.num_rounds=${FATHOM_ROUNDS:-1500} \
      --config.eval_every=100 --config.eval_clients=340 --config.checkpoint_every=500 "$@" \
      > $g/$name.log 2>&1
  echo "== $name rc $? ($*)" >> $out/log.txt
  end=$(date +%s.%N)
  "$py" - $g/$name $start $end >> $out/log.txt 2>&1 <<'PY'
import json, os, sys
w, start, end = sys.argv[1], float(sys.argv[2]), float(sys.argv[3])
rows = [json.loads(l) for l in open(f'{w}/metrics.jsonl')]
bad = [r['round'] for r in rows if r['train_loss'] > 10]
acc = [(r['round'], round(r['test_accuracy'], 4)) for r in rows if 'test_accuracy' in r]
s = json.load(open(f'{w}/summary.json')) if os.path.exists(f'{w}/summary.json') else {}
print(f"{w}: end to end {end - start:.1f} s; rounds {len(rows)}; loop {s.get('wall_s')}; "
      f"compiles {s.get('compiles')} ahead {s.get('compiled_ahead')}; compute "
      f"{s.get('compute_dtype')}; padding {s.get('padding_efficiency')}; first loss>10 at "
      f"{bad[:1]} ({len(bad)} rounds); acc {acc[-3:]}; hp {s.get('final_hparams')}")
PY
  tail -n 2 $g/$name.log >> $out/log.txt
  (cd $g && tar czf $out/runs.tgz */metrics.jsonl */summary.json */*.log 2>/dev/null)
}

bench f32_auto 80 --compute_dtype=float32
[ "$(left)" -gt 60 ] && timeout $(( $(left) < 160 ? $(left) : 160 )) "$py" benchmarks/conv_vmap.py \
    --lanes="${CONV_LANES:-50}" --steps="${STEPS:-10}" --convs=all --dtypes=bfloat16,float32 \
    --json=$out/conv_forms.json > $g/conv_forms.txt 2>&1
echo "conv_vmap rc $?" >> $g/conv_forms.txt
grep -v '^[IW][0-9]' $g/conv_forms.txt > $out/conv_forms.txt
fathom fathom_f32_auto 140
for d in bfloat16 float32; do
  b=$(best $d 2>/dev/null) || { echo "== no conv_vmap rows for $d" >> $out/bench.txt; continue; }
  echo "fastest form in $d at the most lanes: $b" >> $out/bench.txt
  [ "$d/$b" = float32/matmul ] && continue  # f32_auto above ran it (auto is matmul on a GPU)
  bench "${d}_$(echo $b | tr / _)" 80 --compute_dtype=$d --conv=$b
done
(cd $g && tar czf $out/bench.tgz bench *.txt 2>/dev/null)
echo "total ${SECONDS} s" >> $out/log.txt

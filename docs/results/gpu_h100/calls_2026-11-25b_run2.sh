#!/usr/bin/env bash
# Device call 2: is the divergence at rounds 100-180 TF32's? 1500 rounds at float32 matmul
# precision (the issue's end-to-end figure if it stays healthy), 400 rounds of seed 1 at both
# precisions; then the CNN cohort sweep with the data on the GPU.
set -u
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site
g=/tmp/g; mkdir -p $g
run() {  # name precision seed rounds timeout
  local name=$1 prec=$2 seed=$3 rounds=$4 limit=$5 start end
  start=$(date +%s.%N)
  JAX_DEFAULT_MATMUL_PRECISION=$prec timeout $limit python3 launch/main.py \
      --config=configs/femnist.py --workdir=$g/$name --compilation_cache=$g/cache_$prec \
      --config.data.name=femnist_synthetic --config.data.num_clients=3400 \
      --config.data.in_memory=True --config.seed=$seed --config.num_rounds=$rounds \
      --config.eval_every=100 --config.eval_clients=340 --config.checkpoint_every=500 \
      > $g/$name.log 2>&1
  echo "$name rc $?" >> $OUT/log.txt
  end=$(date +%s.%N)
  python3 - $g/$name $start $end >> $OUT/log.txt <<'PY'
import json, os, sys
w, start, end = sys.argv[1], float(sys.argv[2]), float(sys.argv[3])
rows = [json.loads(l) for l in open(f'{w}/metrics.jsonl')]
bad = [r['round'] for r in rows if r['train_loss'] > 10]
acc = [(r['round'], round(r['test_accuracy'], 4)) for r in rows if 'test_accuracy' in r]
s = json.load(open(f'{w}/summary.json')) if os.path.exists(f'{w}/summary.json') else {}
print(f"{w}: end to end {end - start:.1f} s; rounds {len(rows)}; loop {s.get('wall_s')}; "
      f"compiles {s.get('compiles')} ahead {s.get('compiled_ahead')}; first loss>10 at "
      f"{bad[:1]} ({len(bad)} rounds); acc {acc}")
PY
  tail -n 3 $g/$name.log >> $OUT/log.txt
}
run hi_s0_1500 highest 0 1500 200
cd $g && tar czf $OUT/p1.tgz */metrics.jsonl */summary.json && cd - > /dev/null
run def_s1_400 default 1 400 90
run hi_s1_400 highest 1 400 90
cd $g && tar czf $OUT/p1.tgz */metrics.jsonl */summary.json && cd - > /dev/null
timeout 170 python3 launch/benchmark.py --tasks=cnn --cohort_sizes=10,50,100,200 --rounds=5 \
    --warmup=2 --in_memory=True --json=$OUT/bench_inmem.json 2>&1 | grep -v '^[IW][0-9]' \
    > $OUT/bench.txt
echo "bench rc $?" >> $OUT/log.txt

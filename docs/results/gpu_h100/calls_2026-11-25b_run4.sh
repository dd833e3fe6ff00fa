#!/usr/bin/env bash
# Device call 4 (see the calls below): 1500 FATHOM rounds with the compile-ahead that queues two sizes each way before
# round 1 compiles (float32 matmuls, seed 0; then JAX's default precision, seed 1); the CNN's
# cohorts 10 and 200 with loop_chunk 4 and 16, and with the host-driven loop.
set -u
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site
g=/tmp/g; mkdir -p $g
left() { echo $(( 470 - SECONDS )); }
run() {  # name precision seed rounds timeout extra-flags...
  local name=$1 prec=$2 seed=$3 rounds=$4 limit=$5 start end
  shift 5
  [ "$(left)" -gt 60 ] || { echo "$name skipped" >> $OUT/log.txt; return; }
  [ "$limit" -lt "$(left)" ] || limit=$(left)
  start=$(date +%s.%N)
  JAX_DEFAULT_MATMUL_PRECISION=$prec timeout $limit python3 launch/main.py \
      --config=configs/femnist.py --workdir=$g/$name --compilation_cache=$g/cache_$name \
      --config.data.name=femnist_synthetic --config.data.num_clients=3400 \
      --config.data.in_memory=True --config.seed=$seed --config.num_rounds=$rounds \
      --config.eval_every=100 --config.eval_clients=340 --config.checkpoint_every=500 "$@" \
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
      f"{bad[:1]} ({len(bad)} rounds); acc {acc[-3:]}; hp {s.get('final_hparams')}")
PY
  tail -n 2 $g/$name.log >> $OUT/log.txt
  cd $g && tar czf $OUT/runs.tgz */metrics.jsonl */summary.json && cd - > /dev/null
}
bench() {  # name limit cohorts flags...
  local name=$1 limit=$2 cohorts=$3; shift 3
  [ "$(left)" -gt 40 ] || { echo "$name skipped" >> $OUT/log.txt; return; }
  [ "$limit" -lt "$(left)" ] || limit=$(left)
  timeout $limit python3 launch/benchmark.py --tasks=cnn --cohort_sizes=$cohorts --rounds=5 \
      --warmup=2 --in_memory=True --json=$OUT/$name.json "$@" 2>&1 | grep -v '^[IW][0-9]' \
      > $g/$name.txt
  echo "== $name rc $? ($*)" >> $OUT/bench.txt; cat $g/$name.txt >> $OUT/bench.txt
}
bench device 60 10,200 --local_loop=device
bench host 60 10,200 --local_loop=host
run host_s1 default 1 1500 110 --config.local_loop=host
run chunk4_s1 default 1 1500 110 --config.loop_chunk=4
bench host_l100 45 200 --local_loop=host --lanes_per_device=100
bench host_l200 45 200 --local_loop=host --lanes_per_device=200
run def_s0 default 0 1500 110
echo "total ${SECONDS}s" >> $OUT/log.txt

#!/usr/bin/env bash
# Device calls 6-8 (2026-12-04, later session, the H200 of call 5 still warm), at bd0bc38:
# 1500 FATHOM rounds end to end, seed 0, float32 at JAX's default matmul precision, the data on
# the GPU, with lanes_per_device auto (7 lanes at cohort 10) and with one client a lane (10).
# Carry .whl (benchmarks/gpu.sh's header). Each run starts from an empty compilation cache.
# call 6: IN_MEMORY=True bash benchmarks/gpu.sh fathom $OUT/f          (auto: run 1)
# call 7: run lanes=10 below                                             (10 lanes: run 1)
# call 8: run lanes=0 then lanes=10 below, 105 s each (the 10-lane run 2 ran out at round 1041)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site
run() {  # lanes limit
  rm -rf /tmp/c$1
  s=$(date +%s.%N)
  timeout $2 python3 launch/main.py --config=configs/femnist.py --workdir=$OUT/f$1 \
      --compilation_cache=/tmp/c$1 --config.data.name=femnist_synthetic \
      --config.data.num_clients=3400 --config.data.in_memory=True --config.lanes_per_device=$1 \
      --config.num_rounds=1500 --config.eval_every=100 --config.eval_clients=340 \
      --config.checkpoint_every=500 > $OUT/fathom_lanes$1_log.txt 2>&1
  echo "lanes $1 rc $? end to end $(python3 -c "import time; print(time.time() - $s)")"
}
run 10 200          # call 7
run 0 105; run 10 105  # call 8

#!/usr/bin/env bash
# Device call 4 (2026-12-04, a fresh H200, the session's last 249 s of device time), as run at
# 1110b1b: cohort 50 with lanes_per_device auto's choice (LSTM 10 lanes, CNN 25) against one
# client a lane (50), the data on the GPU. Carry .whl (benchmarks/gpu.sh's header).
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
for p in lstm:50:10 lstm:50:50 cnn:50:25 cnn:50:50; do
  IFS=: read t c l <<< "$p"
  timeout 80 python3 launch/benchmark.py --tasks=$t --cohort_sizes=$c --rounds=5 --warmup=2 \
      --in_memory=True --lanes_per_device=$l --json=$OUT/lanes_${t}_${c}_$l.json 2>&1 \
      | grep -v '^[IW][0-9]' | tail -n 1 | sed "s/\$/  (lanes $l)/" | tee -a $OUT/lanes.txt
done

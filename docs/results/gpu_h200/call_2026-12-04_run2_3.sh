#!/usr/bin/env bash
# Device calls 2 and 3 (2026-12-04, the same H200, warm after call 1), as run: the cohort sweep
# with the training set in memory (on the GPU), then 1500 FATHOM rounds in bfloat16 with the
# fastest bfloat16 form of call 1's conv_vmap.py. Carry .whl (benchmarks/gpu.sh's header).
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
# call 2
timeout 330 python3 launch/benchmark.py --tasks=cnn,lstm --cohort_sizes=10,50,100,200 \
    --rounds=5 --warmup=2 --in_memory=True --json=$OUT/sweep.json 2>&1 \
    | grep -v '^[IW][0-9]' | tee $OUT/sweep.txt
# call 3
s=$(date +%s.%N)
timeout 150 python3 launch/main.py --config=configs/femnist.py --workdir=$OUT/bf16 \
    --compilation_cache=/tmp/cache_bf16 --config.data.name=femnist_synthetic \
    --config.data.num_clients=3400 --config.data.in_memory=True --config.num_rounds=1500 \
    --config.eval_every=100 --config.eval_clients=340 --config.checkpoint_every=500 \
    --config.model.compute_dtype=bfloat16 --config.model.conv=matmul/matmul/matmul \
    > $OUT/bf16.log 2>&1
echo rc $?
e=$(date +%s.%N); python3 -c "print('end to end', $e - $s)"

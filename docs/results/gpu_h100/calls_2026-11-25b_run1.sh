#!/usr/bin/env bash
# Device call 1: 1500 FATHOM rounds, data in memory (on the GPU) + rerun on the cache; with
# loop_chunk 4; and with the data fed per round. Selected files are tarred into $OUT.
set -u
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site
rm -rf .whl/*.whl  # gpu.sh would reinstall them otherwise
g=/tmp/g; mkdir -p $g
nproc > $OUT/machine.txt; free -g >> $OUT/machine.txt
IN_MEMORY=True RERUN=1 timeout 280 bash benchmarks/gpu.sh fathom $g/a > $OUT/a.log 2>&1; echo "a rc $?" >> $OUT/a.log
IN_MEMORY=True LOOP_CHUNK=4 timeout 140 bash benchmarks/gpu.sh fathom $g/b > $OUT/b.log 2>&1; echo "b rc $?" >> $OUT/b.log
IN_MEMORY=False timeout 140 bash benchmarks/gpu.sh fathom $g/c > $OUT/c.log 2>&1; echo "c rc $?" >> $OUT/c.log
cd $g && tar czf $OUT/runs.tgz $(ls -d */*/summary.json */*/metrics.jsonl */env.txt */*.txt 2>/dev/null)

#!/usr/bin/env bash
# Device call 9 (2026-12-04, eleventh session, a fresh H200): the CNN's second convolution as
# Pallas (Triton) kernels that read the input in place (config.model.conv='pallas',
# fathom_sim/conv_kernels.py) against the im2col form ('matmul', what auto picks on a GPU).
# 1. the kernels against XLA's convolution on the GPU (float32 at 'highest', 50 lanes vmapped);
# 2. bare vmapped SGD at 10 and 50 lanes, the kernels at three tile heights (conv_vmap.py);
# 3. cohorts 10 and 200 with each form, alternating (benchmark.py, lanes auto, data on the GPU).
# Carry .whl (benchmarks/gpu.sh's header). Every step has its own time limit inside BUDGET.
set -u
export PYTHONUNBUFFERED=1
py="${PYTHON:-python3}"
budget="${BUDGET:-500}"
out="${OUT:?}"
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
step() {  # step NAME LIMIT CMD...: run CMD with at most LIMIT s (less if the budget is short)
  local name=$1 limit=$2; shift 2
  local left=$(( budget - SECONDS ))
  if [ "$left" -lt 30 ]; then echo "== $name skipped ($left s left)" >> "$out/log.txt"; return; fi
  [ "$left" -lt "$limit" ] && limit=$left
  echo "== $name (limit $limit s)" >> "$out/log.txt"
  local t0=$SECONDS
  timeout "$limit" "$@" >> "$out/log.txt" 2>&1
  echo "== $name: rc $?, $(( SECONDS - t0 )) s" >> "$out/log.txt"
}
step check 90 env PYTHONPATH="${PYTHONPATH:-}:." "$py" - <<'PY'
import jax, jax.numpy as jnp, numpy as np
from fathom_sim import conv_kernels as ck
jax.config.update('jax_default_matmul_precision', 'highest')
ref = lambda x, k: jax.lax.conv_general_dilated(x, k, (1, 1), 'VALID',
                                                dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
r = np.random.default_rng(0)
x = jnp.asarray(r.standard_normal((50, 20, 26, 26, 32)), jnp.float32)
k = jnp.asarray(r.standard_normal((50, 3, 3, 32, 64)) / 24, jnp.float32)
dy = jnp.asarray(r.standard_normal((50, 20, 24, 24, 64)), jnp.float32)
for name, conv in (('pallas', ck.conv3x3), ('xla', ref)):
  y, vjp = jax.vjp(jax.vmap(conv), x, k)
  if name == 'pallas':
    got = (y,) + vjp(dy)
  else:
    want = (y,) + vjp(dy)
print('pallas against XLA (highest), 50 lanes: relative max error of y, dx, dk:',
      [float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b))) for a, b in zip(got, want)])
print(jax.jit(jax.vmap(ck.conv3x3)).lower(x, k).compile().as_text().count('__gpu'), 'kernels')
PY
step convs 200 "$py" benchmarks/conv_vmap.py --lanes=50,10 --convs=matmul,pallas \
    --pallas_rows=128,64,256 --steps=10 --json="$out/conv_vmap.json"
for row in cnn:200:pallas cnn:200:matmul cnn:10:pallas cnn:10:matmul; do
  IFS=: read -r task cohort conv <<< "$row"
  step "$row" 80 "$py" launch/benchmark.py --tasks="$task" --cohort_sizes="$cohort" \
      --rounds=5 --warmup=2 --in_memory=True --conv="$conv" \
      --json="$out/bench_${task}_${cohort}_$conv.json"
done
grep -v '^[IW][0-9]' "$out/log.txt" | tail -n 60

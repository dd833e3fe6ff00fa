#!/usr/bin/env bash
# Issue 8's GPU table, for a session that is lent a GPU machine (run by hand, never by CI).
#
#   bash benchmarks/gpu.sh fathom OUT   # 1500 FATHOM rounds, FEMNIST-shaped data, EMNIST CNN,
#                                       # 10 clients per round, end to end (target: < 2 min)
#   bash benchmarks/gpu.sh sweep OUT    # benchmark.py cohort sweep 10/50/100/200, CNN and LSTM,
#                                       # cohort 10 without the prefetch, and the host's cost to
#                                       # plan and send a round's examples (feed_round.py)
#   bash benchmarks/gpu.sh profile OUT  # the CNN's local step at 10 and 50 lanes (cohort 10's and
#                                       # cohort 200's layouts): the round's step against bare
#                                       # SGD, where the device time goes (profiler traces), and
#                                       # the step with the loop kept in a CUDA graph
#   bash benchmarks/gpu.sh loops OUT    # cohorts 10 and 200 (CNN) with the local loop on the
#                                       # device and driven by the host
#   bash benchmarks/gpu.sh chunks OUT   # cohorts 10 and 200 (CNN), the device loop checking its
#                                       # bound every 4 and every 16 steps (config.loop_chunk)
#   bash benchmarks/gpu.sh dtypes OUT   # the CNN in float32 and in bfloat16
#                                       # (config.model.compute_dtype): vmapped SGD at 10/50/200
#                                       # lanes, the round's step at 10 and 50 lanes, and
#                                       # cohorts 10 and 200 with the data on the GPU
#   bash benchmarks/gpu.sh convs OUT    # every convolution form (config.model.conv, mixed
#                                       # forms included) at 50 lanes in float32 and bfloat16,
#                                       # with XLA's estimate of each step's memory traffic;
#                                       # then cohorts 10 and 200 with each dtype's fastest
#   bash benchmarks/gpu.sh lanes OUT    # the CNN and the LSTM with lanes_per_device auto's
#                                       # choice (fewer lanes than clients) against one client
#                                       # a lane: cohort:lanes pairs LANE_PAIRS (default
#                                       # 10:7,10:10,50:25,50:50,100:39,100:50,200:45,200:50)
#                                       # and LSTM_PAIRS (default 10:4,10:10,50:10,50:50,
#                                       # 100:17,100:50,200:27,200:50), data on the GPU
#                                       # (TASKS=lstm: the LSTM's rows only);
#                                       # ~32 s a row on an H200, so 16 rows fill one call
#                                       # (docs/benchmarks.md, "Tenth session")
#   bash benchmarks/gpu.sh kernels OUT  # the Pallas convolution (model.conv='pallas') against
#                                       # im2col: each pass at six tile settings (TILES) with
#                                       # its device time by kernel, then cohorts 10 and 200
#                                       # in float32 and bfloat16 (~8 min)
#   bash benchmarks/gpu.sh ncu OUT      # Nsight Compute's account of each Pallas kernel at
#                                       # TILE, where the image has ncu, and kernel_ptx.py's
#                                       # by the image's jax (~2 min)
#   bash benchmarks/gpu.sh gemm OUT     # each convolution pass's matrix product alone (the
#                                       # ceiling of im2col) against the im2col pass, with
#                                       # XLA's Triton GEMMs and with cuBLAS's; then cohorts
#                                       # 10 and 200 with each (~5-7 min)
#   bash benchmarks/gpu.sh brief OUT    # what a session's 15 minutes of device time should ask
#                                       # first, in ~5 min by estimate (untimed on a GPU; each
#                                       # step under its own timeout):
#                                       # the CNN at cohorts 10 and 200 on auto's lanes (the
#                                       # 4x target at this commit), the LSTM at 10:4 and 50:10
#                                       # (its written-out, padded step against the tenth
#                                       # session's line), and the CNN's round step at 7 and
#                                       # 45 lanes traced, by kernel (trace_ops.txt)
#   bash benchmarks/gpu.sh update OUT   # cohorts 10 and 200 (CNN) with a lane's passes over
#                                       # its model as XLA's fusions and as
#                                       # fathom_sim/lane_update.py's kernels, in each
#                                       # convolution form, alternating (~4 min)
#
# Why `loops` and the CUDA graph: a round's local loop runs to the longest lane, a bound read
# from the cohort table on the device. XLA:GPU then cannot know the trip count, so it copies the
# loop's predicate to the host at every step and launches the next step's kernels only after
# that; with a known trip count it queues the steps without waiting. Command buffers with WHILE
# (CUDA conditional nodes) keep such a loop on the GPU; the host-driven loop
# (config.local_loop='host') queues one program per step without reading anything back; a
# chunked device loop (config.loop_chunk=N) runs N steps as an inner loop of known trip count
# between reads, at the cost of up to N - 1 padding steps a round (`profile`'s chunkN forms,
# `chunks`). LOOP_CHUNK=N runs `fathom` with config.loop_chunk=N, PER_OCTAVE=N with
# config.batch_pad_per_octave=N (padded batch sizes a doubling while FATHOM moves B),
# SHARED_GLYPHS=True with config.data.shared_glyphs=True (labels that overlap as FEMNIST's do).
#
# Each part fits one device call (10 min). The GPU image has jax 0.11.2 and absl but not
# ml_collections, and other flax / orbax versions than requirements.txt: carry the pinned wheels.
# Here, before the call:
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: -d .whl ml_collections==1.1.0 \
#       flax==0.12.8 optax==0.2.8 orbax-checkpoint==0.12.8
# then run `bash benchmarks/gpu.sh fathom $OUT` with carry=['.whl'].
# By default each round's clients are made while the previous round computes; IN_MEMORY=True
# makes the training set once and holds it in memory, so that data_on_device=auto keeps it on
# the GPU (how the 2026-11-25 (later) figures in docs/benchmarks.md were measured).
# SEED (default 0) and LOCAL_LOOP (default auto) set config.seed and config.local_loop for
# `fathom`; COMPUTE_DTYPE (default float32) and CONV (default auto) set
# config.model.compute_dtype and config.model.conv for `fathom`, `sweep`, `profile`, `loops` and
# `chunks`.
# JAX_DEFAULT_MATMUL_PRECISION=highest runs the float32 matmuls that CPU runs use
# (config.matmul_precision='auto' keeps it; JAX's default on an H100 is TF32, and
# docs/benchmarks.md has a seed that diverged under it).
# ROUNDS (default 1500), COHORTS (default 10,50,100,200; 10,200 for loops, chunks, dtypes and
# convs), LANES (default 10,50, profile and dtypes) and CONV_LANES (default 10,50,200 for
# dtypes, 50 for convs) shrink
# the runs for a dry check;
# RERUN=1 runs `fathom` a second time on the compilation cache the first one filled.
set -euo pipefail
cd "$(dirname "$0")/.."
usage='usage: benchmarks/gpu.sh fathom|sweep|profile|loops|chunks|dtypes|convs|lanes|kernels|ncu|gemm|update|brief OUT'
part="${1:?$usage}"
out="${2:?$usage}"
dtype="${COMPUTE_DTYPE:-float32}"
conv="${CONV:-auto}"
py="${PYTHON:-python3}"
# A mistyped part ends here, before the install spends device time.
case "$part" in
  fathom|sweep|profile|loops|chunks|dtypes|convs|lanes|kernels|ncu|gemm|update|brief) ;;
  *) echo "benchmarks/gpu.sh: unknown part '$part'; $usage" >&2
     exit 2 ;;
esac
mkdir -p "$out"
# BUDGET (seconds; 390 for brief, none for the other parts): later timeouts are cut to what is
# left of it, so that a slow step leaves time to pack the files inside the call's own limit
# (420 s for brief).
[ "$part" = brief ] && BUDGET="${BUDGET:-390}"
for limit in ROW_TIMEOUT PROFILE_TIMEOUT BUDGET; do  # `within` compares whole seconds
  [[ "${!limit:-0}" =~ ^[0-9]+$ ]] \
      || { echo "benchmarks/gpu.sh: $limit must be whole seconds, got '${!limit}'" >&2; exit 2; }
done
deadline=$((SECONDS + ${BUDGET:-1000000}))
within() {  # the smaller of $1 seconds and what is left of BUDGET (at least 1)
  local left=$((deadline - SECONDS))
  if (( left >= $1 )); then echo "$1"; elif (( left > 1 )); then echo "$left"; else echo 1; fi
}
if compgen -G ".whl/*.whl" > /dev/null; then
  "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
else
  echo "no .whl/*.whl: the image's own packages are used (ml_collections is not among them)"
fi
export PYTHONUNBUFFERED=1
# Stops at once, saying why in env.txt, where a package is missing or JAX found no GPU (it
# falls back to the CPU without a word, and every row would then run out its time).
{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null \
      || echo 'no nvidia-smi'
  "$py" -c 'import os, jax, flax, optax, ml_collections, orbax.checkpoint, fathom_sim.run
print("jax", jax.__version__, "flax", flax.__version__, "optax", optax.__version__,
      jax.devices())
if jax.default_backend() != "gpu" and os.environ.get("JAX_PLATFORMS") != "cpu":
  raise SystemExit(f"error: JAX runs on {jax.default_backend()}, not a GPU")' 2>&1
} | tee "$out/env.txt"

# One timed row of the CNN or LSTM (5 rounds after 2, the training set on the GPU), with the
# flags given: its printed line, tagged, appended to $out/NAME.txt, its JSON to
# $out/NAME_KEY.json. A failure is said and the part goes on (device time is scarce).
row() {
  local name="$1" key="$2" tag="$3" limit="${ROW_TIMEOUT:-}" log status=0
  shift 3
  [ -n "$limit" ] && limit="$(within "$limit")"
  log="$(mktemp)"
  ${limit:+timeout "$limit"} "$py" launch/benchmark.py --rounds=5 --warmup=2 \
      --in_memory=True "$@" --json="$out/${name}_$key.json" > "$log" 2>&1 || status=$?
  # The table's row and the lines said under it (a measured round that compiled; an error);
  # with none, the output's last lines (a traceback's exception) say why.
  { grep -E '^(cnn|lstm|mlp) |^  \(|^error' "$log" || tail -n 3 "$log"; } \
      | sed "s/\$/  ($tag)/" | tee -a "$out/$name.txt"
  [ "$status" = 0 ] || echo "benchmark.py $name $key: exit $status" | tee -a "$out/$name.txt"
  rm -f "$log"
}

# A device call returns at most 8 files: NAME's rows' JSON leave as one archive, NAME_json.tgz
# (the "Tenth session" lost 7 of its 13).
pack() {
  (cd "$out" && compgen -G "$1_*.json" > /dev/null \
      && tar -czf "$1_json.tgz" "$1"_*.json && rm -f "$1"_*.json) || true
}

# The CNN's round step at LANES (comma-separated) by lane_step.py, its forms traced (the loop
# checked every N steps as well for each N in CHUNKS), each trace in FORMS summed by kernel
# with its bytes (trace_ops.txt), and the traces left as one archive (a device call returns at
# most 8 files, none in deep folders, each under 16 MiB: past 15 MiB trace.tgz leaves out the
# raw XPlane files, and trace_ops.txt has their summary). lane_step.py runs under LIMIT
# seconds, each summary under 30, both cut to what is left of BUDGET.
# lane_step.py has no 'auto': the matmul form, auto's choice on a GPU.
step_conv="$conv"
[ "$step_conv" = auto ] && step_conv=matmul
step_form=(--steps=40 --clients_per_lane=4 --repeats=5 --compute_dtype="$dtype"
           --conv="$step_conv")
traced_step() {
  local lanes_list="$1" chunks="$2" forms="$3" limit="$4" lanes form
  timeout "$(within "$limit")" "$py" benchmarks/lane_step.py --lanes="$lanes_list" \
      --chunks="$chunks" "${step_form[@]}" --trace_dir="$out/trace" 2>&1 \
      | grep -v '^[IW][0-9]' | tee "$out/lane_step.txt" || echo "lane_step.py: exit $?"
  # Packed before the summaries, so that a call cut short still brings the traces back: under
  # 16 MiB (what a call returns) with the raw XPlane files, else without them.
  (cd "$out" && [ -d trace ] && tar -czf trace.tgz trace \
      && { [ "$(stat -c %s trace.tgz)" -lt $((15 << 20)) ] \
           || tar -czf trace.tgz --exclude='*.xplane.pb' trace; }) || true
  for lanes in $(echo "$lanes_list" | tr ',' ' '); do
    for form in $forms; do
      [ -d "$out/trace/${form}_L$lanes" ] || { echo "no trace of ${form}_L$lanes"; continue; }
      timeout "$(within 30)" "$py" benchmarks/trace_ops.py "$out/trace/${form}_L$lanes" \
          --calls=3 --top=30 || echo "trace_ops.py ${form}_L$lanes: exit $?"
    done
  done 2>&1 | tee "$out/trace_ops.txt"
  rm -rf "$out/trace"
}

case "$part" in
  fathom)
    # End to end: process start, data generation, compiles, 1500 rounds, 16 evaluations of
    # 340 test clients, checkpoints. The first run starts from an empty compilation cache (a
    # warm machine keeps ~/.cache between calls, which would hide the compiles); with RERUN=1 a
    # second run then loads its programs from that cache, as a rerun or resumed run does.
    cache="/tmp/gpu_sh_jax_cache"
    rm -rf "$cache"
    for name in fathom ${RERUN:+fathom_rerun}; do
      start=$(date +%s.%N)
      "$py" launch/main.py --config=configs/femnist.py --workdir="$out/$name" \
          --compilation_cache="$cache" \
          --config.data.name=femnist_synthetic --config.data.num_clients=3400 \
          --config.data.in_memory="${IN_MEMORY:-False}" --config.loop_chunk="${LOOP_CHUNK:-0}" \
          --config.seed="${SEED:-0}" --config.local_loop="${LOCAL_LOOP:-auto}" \
          --config.batch_pad_per_octave="${PER_OCTAVE:-2}" \
          --config.data.shared_glyphs="${SHARED_GLYPHS:-False}" \
          --config.model.compute_dtype="$dtype" --config.model.conv="$conv" \
          --config.num_rounds="${ROUNDS:-1500}" --config.eval_every=100 \
          --config.eval_clients=340 --config.checkpoint_every=500 2>&1 | tail -n 20
      end=$(date +%s.%N)
      "$py" - "$out/$name" "$start" "$end" <<'EOF' | tee "$out/$name.txt"
import json, sys
workdir, start, end = sys.argv[1], float(sys.argv[2]), float(sys.argv[3])
s = json.load(open(f'{workdir}/summary.json'))
glyphs = json.load(open(f'{workdir}/config.json'))['data'].get('shared_glyphs', False)
print(f"{workdir}: end to end {end - start:.1f} s; rounds {s['rounds']}; training loop "
      f"{s['wall_s']:.1f} s; compiles {s['compiles']} (ahead {s.get('compiled_ahead')}; "
      f"loaded from the cache {s.get('compile_cache_hits')}); planned ahead "
      f"{s.get('planned_ahead')}, replanned {s.get('replanned')}; "
      f"compute {s.get('compute_dtype')}; "
      f"padding {s['padding_efficiency']:.3f} (loop chunk {s.get('loop_chunk')}); "
      f"final test accuracy {s['final']['test_accuracy']:.4f} (shared glyphs {glyphs}); "
      f"devices {s['devices']} "
      f"({s['platform']})")
EOF
    done
    ;;
  sweep)
    "$py" launch/benchmark.py --tasks=cnn,lstm --cohort_sizes="${COHORTS:-10,50,100,200}" \
        --rounds=5 --warmup=2 --in_memory="${IN_MEMORY:-False}" --compute_dtype="$dtype" \
        --conv="$conv" \
        --json="$out/bench_gpu.json" 2>&1 \
        | grep -v '^[IW][0-9]' || echo "benchmark.py sweep: exit $?"
    # (Each part says its failure and the next runs: under set -e a failed row ended the
    # script before the parts after it, in a call whose device time is counted.)
    # What reading round t+1's clients during round t saves: host s per round without it.
    "$py" launch/benchmark.py --tasks=cnn --cohort_sizes=10 --rounds=5 --warmup=2 \
        --compute_dtype="$dtype" --conv="$conv" --noprefetch \
        --json="$out/bench_gpu_noprefetch.json" 2>&1 \
        | grep -v '^[IW][0-9]' || echo "benchmark.py --noprefetch: exit $?"
    # The host's cost to plan and send a round's examples: one buffer per lane or per device.
    "$py" benchmarks/feed_round.py --rounds=10 2>&1 | grep -v '^[IW][0-9]' \
        | tee "$out/feed_round.txt" || echo "feed_round.py: exit $?"
    ;;
  profile)
    # Each step says how it failed and the next one still runs: device time is scarce.
    traced_step "${LANES:-10,50}" 4,16 "selects chunk4 bare_scan" 420
    XLA_FLAGS="${XLA_FLAGS:+$XLA_FLAGS }--xla_gpu_enable_command_buffer=+WHILE,+CONDITIONAL" \
        "$py" benchmarks/lane_step.py --lanes="${LANES:-10,50}" "${step_form[@]}" 2>&1 \
        | grep -v '^[IW][0-9]' | tee "$out/lane_step_while_in_graph.txt" \
        || echo "lane_step.py with the loop in a CUDA graph: exit $?"
    ;;
  loops)
    for loop in device host; do
      "$py" launch/benchmark.py --tasks=cnn --cohort_sizes="${COHORTS:-10,200}" --rounds=5 \
          --warmup=2 --local_loop="$loop" --in_memory="${IN_MEMORY:-False}" \
          --compute_dtype="$dtype" --conv="$conv" \
          --json="$out/bench_gpu_loop_$loop.json" 2>&1 | grep -v '^[IW][0-9]' \
          || echo "benchmark.py --local_loop=$loop: exit $?"
    done
    ;;
  chunks)
    for chunk in 4 16; do
      "$py" launch/benchmark.py --tasks=cnn --cohort_sizes="${COHORTS:-10,200}" --rounds=5 \
          --warmup=2 --local_loop=device --loop_chunk="$chunk" --in_memory="${IN_MEMORY:-False}" \
          --compute_dtype="$dtype" --conv="$conv" \
          --json="$out/bench_gpu_chunk$chunk.json" 2>&1 | grep -v '^[IW][0-9]' \
          || echo "benchmark.py --loop_chunk=$chunk: exit $?"
    done
    ;;
  dtypes)
    # Why: at 50 lanes the step's convolutions move ~0.66 GB of shifted views a step in float32
    # (Conv3x3); bfloat16 halves that and runs the products on the tensor cores' faster path.
    "$py" benchmarks/conv_vmap.py --lanes="${CONV_LANES:-10,50,200}" --steps=10 \
        --dtypes=float32,bfloat16 2>&1 \
        | grep -v '^[IW][0-9]' | tee "$out/conv_vmap.txt" || echo "conv_vmap.py: exit $?"
    for d in float32 bfloat16; do
      "$py" benchmarks/lane_step.py --lanes="${LANES:-10,50}" --steps=40 --clients_per_lane=4 \
          --repeats=5 --chunks= --compute_dtype="$d" 2>&1 | grep -v '^[IW][0-9]' \
          | tee "$out/lane_step_$d.txt" || echo "lane_step.py --compute_dtype=$d: exit $?"
    done
    for d in float32 bfloat16; do
      "$py" launch/benchmark.py --tasks=cnn --cohort_sizes="${COHORTS:-10,200}" --rounds=5 \
          --warmup=2 --in_memory=True --compute_dtype="$d" --json="$out/bench_gpu_$d.json" 2>&1 \
          | grep -v '^[IW][0-9]' || echo "benchmark.py --compute_dtype=$d: exit $?"
    done
    ;;
  convs)
    # Why: under vmap XLA's convolution becomes a grouped one and the matmul form copies 9
    # shifted views; which of the forward pass, the input's gradient and the kernel's gradient
    # each form does fast is what decides the mixed forms (models.CONV_FORMS).
    "$py" benchmarks/conv_vmap.py --lanes="${CONV_LANES:-50}" --steps=10 --convs=all \
        --dtypes=float32,bfloat16 --json="$out/conv_forms.json" 2>&1 \
        | grep -v '^[IW][0-9]' | tee "$out/conv_forms.txt" || echo "conv_vmap.py: exit $?"
    for d in float32 bfloat16; do
      best=$("$py" - "$out/conv_forms.json" "$d" <<'EOF'
import json, sys
rows = [r for r in json.load(open(sys.argv[1])) if r['dtype'] == sys.argv[2]]
most = max(r['lanes'] for r in rows)
print(min((r for r in rows if r['lanes'] == most), key=lambda r: r['ms_per_step'])['conv'])
EOF
      ) || { echo "no conv_vmap.py rows for $d"; continue; }
      echo "fastest form in $d: $best"
      "$py" launch/benchmark.py --tasks=cnn --cohort_sizes="${COHORTS:-10,200}" --rounds=5 \
          --warmup=2 --in_memory=True --compute_dtype="$d" --conv="$best" \
          --json="$out/bench_gpu_${d}_$(echo "$best" | tr / _).json" 2>&1 \
          | grep -v '^[IW][0-9]' || echo "benchmark.py --compute_dtype=$d --conv=$best: exit $?"
    done
    ;;
  lanes)
    # Why: a step's cost grows linearly with the lanes (H200, 4-67 lanes: CNN ~0.54 ms +
    # 0.051 ms a lane; LSTM ~1.7 + 0.47), while a round runs to its longest lane. One client a
    # lane runs every lane to the cohort's longest client (cohort 50: padding 0.50 for the
    # CNN, 0.24 for the LSTM); auto packs them onto the fewest lanes that run at most 10 %
    # more steps (25 and 10 lanes at cohort 50). docs/benchmarks.md, "Ninth session": the
    # prediction (benchmarks/lane_counts.py) this part measures; "Tenth session": measured.
    for task in $(echo "${TASKS:-cnn,lstm}" | tr ',' ' '); do
      pairs="${LANE_PAIRS:-10:7,10:10,50:25,50:50,100:39,100:50,200:45,200:50}"
      [ "$task" = lstm ] \
          && pairs="${LSTM_PAIRS:-10:4,10:10,50:10,50:50,100:17,100:50,200:27,200:50}"
      for pair in $(echo "$pairs" | tr ',' ' '); do
        cohort="${pair%%:*}" lanes="${pair##*:}"
        row lanes "${task}_${cohort}_$lanes" "lanes $lanes" --tasks="$task" \
            --cohort_sizes="$cohort" --lanes_per_device="$lanes" --compute_dtype="$dtype" \
            --conv="$conv"
      done
    done
    pack lanes
    ;;
  kernels)
    # Why: the Pallas convolution (model.conv='pallas') cut a round's bytes 30 % but its time
    # 4-10 % in float32, and its passes ran 1.5x im2col's in bfloat16 (docs/benchmarks.md,
    # "Eleventh session"), never timed in bfloat16 rounds. Each pass at 50 lanes (CONV_LANES)
    # at the two tile settings that led at 50 and at 10 lanes, one with the taps in a pipelined
    # loop, the loop of most warps an SM (benchmarks/kernel_ptx.py: 48 against 8-12), and two
    # that keep the kernel's taps in shared memory over 8 row tiles (SPAN; all untimed), each
    # pass's device time split by kernel (--trace: the Pallas kernel against the padding and
    # slicing around it; "Twelfth session"); then cohorts 10 and 200 with each form in each
    # dtype, the forms alternating; the rows' JSON leave as one archive (8 files a device
    # call). ~8 min: the passes are cut at 4 so that the archive is made.
    timeout 240 "$py" benchmarks/conv_passes.py --lanes="${CONV_LANES:-50}" --trace \
        --tiles="${TILES:-64x4x2x2,128x4x4x2,64x4x2x3xloop,32x4x8x2xloop,32x4x4x2xspan8,32x4x8x2xspan8}" \
        --dtypes=float32,bfloat16 \
        --json="$out/kernels_passes.json" 2>&1 | grep -v '^[IW][0-9]' \
        | tee "$out/kernels_passes.txt" || echo "conv_passes.py: exit $?"
    for d in float32 bfloat16; do
      for cohort in $(echo "${COHORTS:-10,200}" | tr ',' ' '); do
        for form in matmul pallas; do
          row kernels "${d}_${cohort}_$form" "$d, $form" --tasks=cnn --cohort_sizes="$cohort" \
              --compute_dtype="$d" --conv="$form"
        done
      done
    done
    pack kernels
    ;;
  gemm)
    # Why: every pass of the second convolution ran at 20-37 TFLOP/s in either form, a tenth
    # of the tensor cores' peak (docs/benchmarks.md, "Eleventh session"), and im2col's passes
    # are a copy and one matrix product each (8.8 GB a 50-lane step either way, gpu_aot.py),
    # so the product itself may be what is slow at this shape (per lane 11520 x 288 by 288 x
    # 64, 50 lanes). conv_passes.py's gemm rows time the products alone on operands already in
    # memory; the same with XLA_FLAGS=--xla_gpu_enable_triton_gemm=false runs them as
    # cuBLAS's GEMMs instead of XLA's Triton ones (what the autotuner picked is in the traces'
    # kernel names). Then the round at cohorts 10 and 200 with each, alternating.
    cublas='--xla_gpu_enable_triton_gemm=false'
    for gemm in triton cublas; do
      flags="${XLA_FLAGS:-}"
      [ "$gemm" = cublas ] && flags="${flags:+$flags }$cublas"
      XLA_FLAGS="$flags" timeout 150 "$py" benchmarks/conv_passes.py \
          --lanes="${CONV_LANES:-50}" --forms=matmul,gemm --tiles= --trace \
          --dtypes=float32,bfloat16 --precisions=default,highest \
          --json="$out/gemm_passes_$gemm.json" 2>&1 | grep -v '^[IW][0-9]' \
          | tee "$out/gemm_passes_$gemm.txt" || echo "conv_passes.py $gemm: exit $?"
    done
    for cohort in $(echo "${COHORTS:-10,200}" | tr ',' ' '); do
      for gemm in triton cublas; do
        flags="${XLA_FLAGS:-}"
        [ "$gemm" = cublas ] && flags="${flags:+$flags }$cublas"
        XLA_FLAGS="$flags" row gemm_bench "${cohort}_$gemm" "$gemm" --tasks=cnn \
            --cohort_sizes="$cohort" --compute_dtype="$dtype" --conv=matmul
      done
    done
    pack gemm_bench
    ;;
  update)
    # Why: the four passes over every lane's model that XLA makes of a step's elementwise
    # work (2.4 GB of a 50-lane step's 8.8, or of the Pallas convolution's 6.2) become one
    # kernel that reads p, g and x once, and one that touches only the lanes whose client ends
    # at that step (lane_update.py; docs/benchmarks.md, "Thirteenth session"). Untimed.
    # The kernels first checked against jnp on this GPU (the CPU tests interpret them): if
    # they differ, only XLA's passes are timed.
    updates='xla pallas'
    "$py" benchmarks/check_lane_update.py 2>&1 | grep -v '^[IW][0-9]' \
        | tee "$out/update_check.txt" || updates=xla
    for cohort in $(echo "${COHORTS:-10,200}" | tr ',' ' '); do
      for form in matmul pallas; do
        for update in $updates; do
          row update "${cohort}_${form}_$update" "conv $form, lane_update $update" --tasks=cnn \
              --cohort_sizes="$cohort" --compute_dtype="$dtype" --conv="$form" \
              --lane_update="$update"
        done
      done
    done
    pack update
    ;;
  brief)
    # Why: a session now has 15 minutes of device time, a machine's start included, and the
    # parts above take 4-10 min each; this one asks the three questions the next call should
    # answer first, in ~5 min on an H200 by estimate (rows ~30 s each, docs/benchmarks.md
    # "Tenth session"; the trace untimed there), within BUDGET (390 s). A step that
    # fails or runs out of its time says so and the next one runs.
    # 1. The open target, cohort 200 <= 4x cohort 10 a round (CNN), on auto's lanes.
    # 2. The LSTM's step since fathom_sim/lstm.py (its backward written out, gates padded to
    #    ALIGN): cohort 10's round at 4 lanes was predicted at ~20-32 ms (46.8 with autodiff's
    #    layer); at 10 lanes for the line's slope ("Nineteenth session").
    # 3. Where the CNN's round step spends its device time at cohort 10's and cohort 200's
    #    lanes, by kernel with each kernel's bytes ("Fourteenth session"; never run).
    export ROW_TIMEOUT="${ROW_TIMEOUT:-75}"  # each timeout below is also cut to BUDGET's rest
    for cohort in $(echo "${COHORTS:-10,200}" | tr ',' ' '); do
      row brief "cnn_$cohort" "cnn, auto's lanes" --tasks=cnn --cohort_sizes="$cohort" \
          --compute_dtype="$dtype" --conv="$conv"
    done
    for pair in $(echo "${LSTM_PAIRS:-10:4,50:10}" | tr ',' ' '); do
      cohort="${pair%%:*}" lanes="${pair##*:}"
      row brief "lstm_${cohort}_$lanes" "lstm, lanes $lanes" --tasks=lstm \
          --cohort_sizes="$cohort" --lanes_per_device="$lanes" --compute_dtype="$dtype"
    done
    pack brief
    traced_step "${LANES:-7,45}" "" "selects bare_scan" "${PROFILE_TIMEOUT:-150}"
    ;;
  ncu)
    # Why a Pallas kernel takes its time, where Nsight Compute is installed and may read the
    # GPU's counters (not known of the image: it says so if not): the Pallas kernels of the
    # three passes at TILE (default 64x4x2x2, conv_kernels' own), 50 lanes, float32, each
    # launched twice (a warm-up and one timed call: ncu's launch count is of the kernels its
    # filter names). JAX's memory pool is not preallocated, for ncu's replays. ~2 min.
    if command -v ncu > /dev/null; then
      XLA_PYTHON_CLIENT_PREALLOCATE=false timeout 300 ncu \
          --kernel-name regex:'_shifted_sum_kernel|_kernel_grad_kernel' --launch-skip 0 \
          --launch-count 6 --section SpeedOfLight --section Occupancy --section WarpStateStats \
          --section MemoryWorkloadAnalysis --section ComputeWorkloadAnalysis \
          "$py" benchmarks/conv_passes.py --lanes=50 --tiles="${TILE:-64x4x2x2}" --repeats=1 \
          2>&1 | grep -v '^[IW][0-9]' > "$out/ncu.txt" || echo "ncu: exit $?"
      tail -n 60 "$out/ncu.txt"
    else
      echo "ncu: not installed" | tee "$out/ncu.txt"
    fi
    # The same tile's static account by the image's own jax and Triton (the one the timings
    # ran; docs/benchmarks.md's is the pinned jax's), compiled for a described H100.
    "$py" benchmarks/kernel_ptx.py --tiles="${TILE:-64x4x2x2}" --dtypes=float32,bfloat16 2>&1 \
        | grep -v '^[IW][0-9]' | tee "$out/kernel_ptx.txt" || echo "kernel_ptx.py: exit $?"
    ;;
esac

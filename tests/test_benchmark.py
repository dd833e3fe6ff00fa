"""launch/benchmark.py writes the fields issue 8's comparisons rely on (no timing asserted)."""

import contextlib
import functools
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from tests.test_cli import ROOT

FIELDS = {'task', 'cohort_size', 'rounds_per_s', 'examples_per_s', 'centralized_examples_per_s',
          'ratio_to_centralized', 'padding_efficiency', 'compiles', 'host_s_per_round',
          'device_s_per_round', 'ahead_s_per_round', 'peak_rss_gib', 'device_peak_gib',
          'rounds_timed', 'rounds_recompiled', 'compiles_while_measuring'}


def test_benchmark_reports_every_field_per_cohort(tmp_path):
  out = tmp_path / 'bench.json'
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  env.pop('XLA_FLAGS', None)
  p = subprocess.run([sys.executable, os.path.join(ROOT, 'launch', 'benchmark.py'),
                      '--tasks=mlp', '--cohort_sizes=3,6', '--rounds=2', '--warmup=1',
                      '--num_clients=40', f'--json={out}'], cwd=ROOT, env=env,
                     capture_output=True, text=True, timeout=300)
  assert p.returncode == 0, p.stderr[-3000:]
  results = json.loads(out.read_text())
  assert [r['cohort_size'] for r in results] == [3, 6]
  for r in results:
    assert FIELDS <= set(r)
    assert 0 < r['padding_efficiency'] <= 1 and r['compiles'] >= 1
    assert r['device_peak_gib'] is None  # XLA:CPU keeps no memory count; the RSS has it
    assert r['examples_per_s'] > 0 and r['centralized_examples_per_s'] > 0
    assert abs(r['ratio_to_centralized'] - r['examples_per_s'] /
               r['centralized_examples_per_s']) < 1e-9
    # One device: its ceiling is the mesh's, and no second one is timed.
    assert r['centralized_every_device_examples_per_s'] is None
    assert r['ratio_to_centralized_every_device'] is None
  assert 'ratio' in p.stdout  # the printed table
  # Each row in a process of its own, so that its memory peaks are its own; the table is
  # printed once, by this process.
  pids = {r['pid'] for r in results}
  assert len(pids) == 2
  lines = p.stdout.splitlines()
  assert [line.split()[:2] for line in lines if line.startswith(('task', 'mlp'))] == [
      ['task', 'cohort'], ['mlp', '3'], ['mlp', '6']]


def _bench(*args, devices=1, timeout=300):
  env = dict(os.environ, JAX_PLATFORMS='cpu',
             XLA_FLAGS=f'--xla_force_host_platform_device_count={devices}')
  return subprocess.run([sys.executable, os.path.join(ROOT, 'launch', 'benchmark.py'), *args],
                        cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def _real_and_computed(num_clients: int, cohort: int, rounds, lanes_per_device: int,
                       devices: int = 1, lockstep: bool = False) -> list[tuple[int, int]]:
  """FedAvg's (real, computed) example-gradients of each round, from the cohorts and the
  spec's K_i alone: B 20 computed as 20 rows (its B never moves: run.batch_moves), clients
  packed longest first onto the least loaded lane, the lanes in order over the devices, and
  each device's lanes all run to its longest (the device loop, one step a chunk); with
  `lockstep`, every lane to the longest of all (what the round's collectives wait for)."""
  import math
  import numpy as np
  from fathom_sim.config import base_config
  from fathom_sim.data import load_task
  from fathom_sim.data.sampling import sample_cohort
  c = base_config()
  c.data.num_clients = num_clients
  train = load_task(c.data).train
  out = []
  for t in rounds:
    sizes = np.asarray(train.num_examples)[sample_cohort(train, c.seed, t, cohort)]
    steps = sorted((max(1, math.ceil(c.epochs * n / 20)) for n in sizes), reverse=True)
    lanes = [0] * (lanes_per_device * devices)
    for k in steps:
      lanes[lanes.index(min(lanes))] += k
    per_device = [lanes[d * lanes_per_device:(d + 1) * lanes_per_device]
                  for d in range(devices)]
    computed = (len(lanes) * max(lanes) if lockstep else
                sum(len(l) * max(l) for l in per_device))
    out.append((sum(steps) * 20, computed * 20))
  return out


def test_a_measured_round_that_compiles_is_left_out_of_the_rates_and_counted(tmp_path):
  """On 2 devices, a client of round 3 larger than the warm-up's grows the padded stream:
  that round compiles, and timing it would fold the compile into every rate (a ratio of 0.04
  where the other rounds give 0.2-1). Its padding is counted: that round holds the largest
  client yet, and leaving it out raises the efficiency here from 0.697 to 0.704."""
  out = tmp_path / 'bench.json'
  p = _bench('--tasks=mlp', '--cohort_sizes=3', '--rounds=6', '--warmup=1',
             '--num_clients=300', '--lanes_per_device=2', '--loop_chunk=1',
             '--local_loop=device', '--noisolate_rows', f'--json={out}', devices=2)
  assert p.returncode == 0, p.stderr[-3000:]
  (r,) = json.loads(out.read_text())
  assert r['rounds_recompiled'] == 1 and r['rounds_timed'] == 5, r
  assert r['compiles_while_measuring'] >= 1 and r['compiles'] == 2
  assert 'left out of the rates' in p.stdout
  # The mesh's own ceiling, a chain on each device at once, beside the one-device one.
  assert r['centralized_every_device_examples_per_s'] > 0
  assert abs(r['ratio_to_centralized_every_device'] - r['examples_per_s'] /
             r['centralized_every_device_examples_per_s']) < 1e-9
  assert 'ceiling with a chain on each of the 2 devices at once' in p.stdout
  counts = _real_and_computed(300, 3, range(2, 8), lanes_per_device=2, devices=2)
  real, computed = map(sum, zip(*counts))
  assert abs(r['padding_efficiency'] - real / computed) < 1e-12
  # Devices held to the longest lane of all: here 2 devices run different lengths.
  real, lockstep = map(sum, zip(*_real_and_computed(300, 3, range(2, 8), lanes_per_device=2,
                                                    devices=2, lockstep=True)))
  assert abs(r['lockstep_padding_efficiency'] - real / lockstep) < 1e-12
  assert r['lockstep_padding_efficiency'] < r['padding_efficiency']
  # The six rounds' counts without any one of them give another efficiency: the test can
  # tell a benchmark that left the compiled round's padding out (round 3's: 0.704).
  assert round(real / computed, 3) == 0.697
  assert round((real - counts[1][0]) / (computed - counts[1][1]), 3) == 0.704
  assert all(abs((real - a) / (computed - b) - real / computed) > 5e-3 for a, b in counts)
  p = _bench('--tasks=mlp', '--cohort_sizes=3', '--rounds=1', '--warmup=0',
             '--num_clients=40', f'--json={out}')
  errors = [line for line in p.stderr.splitlines() if line.startswith('error:')]
  assert p.returncode == 2 and len(errors) == 1, p.stderr[-2000:]
  assert 'each of the 1 measured round(s) compiled a program; raise --warmup' in errors[0]


def test_device_peak_is_the_largest_device_peak_and_none_if_any_device_has_no_count():
  import types
  import numpy as np
  from launch.benchmark import device_peak_gib

  class Device:
    def __init__(self, stats):
      self.stats = stats

    def memory_stats(self):
      return self.stats

  mesh = lambda *stats: types.SimpleNamespace(devices=np.array([Device(s) for s in stats]))
  assert device_peak_gib(mesh({'peak_bytes_in_use': 2**30}, {'peak_bytes_in_use': 3 * 2**29},
                              {'peak_bytes_in_use': 2**29})) == 1.5
  assert device_peak_gib(mesh({'peak_bytes_in_use': 2**30}, None)) is None
  assert device_peak_gib(mesh({'bytes_in_use': 5})) is None


def test_benchmark_refuses_an_out_of_range_flag_before_measuring(tmp_path):
  out = tmp_path / 'bench.json'
  p = subprocess.run([sys.executable, os.path.join(ROOT, 'launch', 'benchmark.py'),
                      '--tasks=mlp', '--loop_chunk=-1', f'--json={out}'], cwd=ROOT,
                     env=dict(os.environ, JAX_PLATFORMS='cpu'), capture_output=True, text=True,
                     timeout=120)
  assert p.returncode == 2, p.stderr[-2000:]
  assert 'config.loop_chunk must be in [0, 1024], got -1' in p.stderr
  assert 'Traceback' not in p.stderr and not out.exists()


def test_a_row_that_fails_in_its_process_ends_the_benchmark_with_its_error(tmp_path):
  out = tmp_path / 'bench.json'
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  env.pop('XLA_FLAGS', None)  # one device: 4 are not there, which build() finds in the row
  p = subprocess.run([sys.executable, os.path.join(ROOT, 'launch', 'benchmark.py'),
                      '--tasks=mlp', '--cohort_sizes=3', '--num_devices=4', f'--json={out}'],
                     cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert p.returncode == 2, p.stderr[-2000:]
  errors = [line for line in p.stderr.splitlines() if line.startswith('error: ')]
  assert errors == ['error: config.num_devices must be at most the 1 devices present '
                    "(0 = all), got 4 (set by benchmark.py's --num_devices)"]
  assert 'Traceback' not in p.stderr and not out.exists()


def test_a_row_out_of_memory_is_one_error_naming_the_row(monkeypatch):
  import jax
  import pytest
  from fathom_sim.config import ConfigError
  from launch import benchmark

  def measure(name, cohort):
    if cohort == 200:
      raise jax.errors.JaxRuntimeError('RESOURCE_EXHAUSTED: Out of memory allocating 8 bytes.')
    raise jax.errors.JaxRuntimeError('INTERNAL: something else')

  monkeypatch.setattr(benchmark, 'measure', measure)
  with pytest.raises(ConfigError, match=r'^cnn at cohort 200 ran out of memory \(XLA: RESOURCE_'
                     r'EXHAUSTED: Out of memory allocating 8 bytes.\); measure it on a device '
                     'with more memory, or with fewer --lanes_per_device$'):
    benchmark._measure_or_fail('cnn', 200)
  with pytest.raises(jax.errors.JaxRuntimeError, match='INTERNAL'):  # not memory: as it was
    benchmark._measure_or_fail('cnn', 10)


def test_benchmark_refuses_unknown_task_and_positional_arguments():
  p = subprocess.run([sys.executable, os.path.join(ROOT, 'launch', 'benchmark.py'),
                      '--tasks=resnet'], cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert p.returncode == 2 and "unknown task 'resnet'" in p.stderr
  # After a `--`, flags would be positional arguments, and the rows' processes would not see
  # the flags that pick their row.
  p = subprocess.run([sys.executable, os.path.join(ROOT, 'launch', 'benchmark.py'),
                      '--tasks=mlp', '--', '--cohort_sizes=3'], cwd=ROOT, capture_output=True,
                     text=True, timeout=120)
  assert p.returncode == 2 and "unexpected arguments '--cohort_sizes=3'" in p.stderr


def test_trace_ops_counts_an_operation_s_own_time_without_what_nests_in_it():
  trace_ops = _trace_ops()
  meta = [{'ph': 'M', 'name': 'process_name', 'pid': 1, 'args': {'name': '/host:CPU'}},
          {'ph': 'M', 'name': 'process_name', 'pid': 2, 'args': {'name': '/device:GPU:0'}},
          {'ph': 'M', 'name': 'thread_name', 'pid': 2, 'tid': 7, 'args': {'name': 'Stream #1'}},
          {'ph': 'M', 'name': 'thread_name', 'pid': 2, 'tid': 8, 'args': {'name': 'XLA Ops'}}]
  op = lambda name, ts, dur, pid=2, tid=7: {'ph': 'X', 'name': name, 'pid': pid, 'tid': tid,
                                            'ts': ts, 'dur': dur}
  events = meta + [op('while', 0, 100), op('fusion', 10, 30), op('dot', 15, 5),
                   op('fusion', 50, 20), op('fusion', 120, 10), op('python', 0, 500, pid=1),
                   op('fusion', 10, 30, tid=8)]  # the same kernel on the device's op line
  timelines = trace_ops.device_threads(events)
  assert timelines == {(2, 7)}  # the stream alone: not the host, nor the op line again
  assert trace_ops.self_times(events, timelines) == {
      'while': (50.0, 1), 'fusion': (55.0, 3), 'dot': (5.0, 1)}


@functools.cache  # once a process: the script defines absl flags
def _trace_ops():
  import importlib.util
  spec = importlib.util.spec_from_file_location(
      'trace_ops', os.path.join(ROOT, 'benchmarks', 'trace_ops.py'))
  trace_ops = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(trace_ops)
  return trace_ops


def test_trace_ops_times_each_hlo_instruction_a_traced_program_ran(tmp_path):
  """A CPU trace of 3 calls of a 5-step loop: every kernel of the loop's body ran 15 times,
  the entry's 3, each with hlo_traffic's account of a run; nothing of the program is left
  unmatched but the loop's own bookkeeping; the command prints the table from the directory."""
  import glob
  import gzip
  import json
  import jax
  import jax.numpy as jnp
  from benchmarks import hlo_traffic
  trace_ops = _trace_ops()

  def f(x, w):
    return jax.lax.scan(lambda c, _: (jnp.tanh(c @ w) * 2 + 1, None), x, None, length=5)[0]

  g = jax.jit(f)
  x, w = jnp.ones((256, 256)), jnp.full((256, 256), 0.01)
  g(x, w).block_until_ready()
  hlo = g.lower(x, w).compile().as_text()
  (tmp_path / 'program.hlo.txt').write_text(hlo)
  jax.jit(jnp.sin)(x).block_until_ready()
  with jax.profiler.trace(str(tmp_path), create_perfetto_trace=True):
    for _ in range(3):
      g(x, w).block_until_ready()
    jax.jit(jnp.sin)(x).block_until_ready()  # another program: not this one's
  found, = glob.glob(str(tmp_path / '**' / 'perfetto_trace.json.gz'), recursive=True)
  with gzip.open(found, 'rt') as fh:
    events = json.load(fh)['traceEvents']
  rows, other, by_module = trace_ops.by_instruction(
      events, trace_ops.device_threads(events), hlo)
  assert by_module
  body, = hlo_traffic.loop_bodies(hlo)
  in_body = {k.name for k in hlo_traffic.kernels(hlo, body)}
  entry = {k.name for k in hlo_traffic.kernels(hlo)}
  runs = {r.kernel.name: r.runs for r in rows}
  assert in_body <= set(runs) and all(runs[n] == 15 for n in in_body)
  assert all(runs[n] == 3 for n in entry & set(runs))
  accounts = hlo_traffic.all_kernels(hlo)
  assert all(r.kernel == accounts[r.kernel.name] and r.us > 0 for r in rows)
  assert not any('sin' in r.kernel.name for r in rows)
  p = subprocess.run([sys.executable, os.path.join(ROOT, 'benchmarks', 'trace_ops.py'),
                      str(tmp_path), '--calls=3'], cwd=ROOT, capture_output=True, text=True,
                     timeout=120)
  assert p.returncode == 0, p.stderr[-2000:]
  assert 'by HLO instruction of jit_f' in p.stdout
  product, = (r.kernel for r in rows if r.kernel.flops)
  assert product.flops == 2 * 256 ** 3 and product.bytes == 3 * 256 * 256 * 4
  line, = (line for line in p.stdout.splitlines() if f' {product.name} ' in line)
  assert line.split()[2:4] == ['5', '0.79']  # runs a call, MB a run
  missing = tmp_path / 'nothing.hlo.txt'
  p = subprocess.run([sys.executable, os.path.join(ROOT, 'benchmarks', 'trace_ops.py'),
                      str(tmp_path), f'--hlo={missing}'], cwd=ROOT, capture_output=True,
                     text=True, timeout=120)
  assert p.returncode == 1 and f"--hlo: no file '{missing}'" in p.stderr


def test_trace_ops_counts_a_run_once_however_many_kernels_it_launches():
  """GPU-style events: a split GEMM launches two kernels a run, both annotated with their
  instruction; a kernel without annotation is matched by XLA:GPU's name for it; another
  program's kernels and unknown names are not this program's."""
  trace_ops = _trace_ops()
  hlo = """HloModule jit_step, is_scheduled=true

%fused_dot (p0: f32[64,32], p1: f32[32,16]) -> f32[64,16] {
  %p0 = f32[64,32]{1,0} parameter(0)
  %p1 = f32[32,16]{1,0} parameter(1)
  ROOT %dot.1 = f32[64,16]{1,0} dot(%p0, %p1), lhs_contracting_dims={1}, rhs_contracting_dims={0}
}

%fused_add (p0.1: f32[64,16]) -> f32[64,16] {
  %p0.1 = f32[64,16]{1,0} parameter(0)
  ROOT %add.1 = f32[64,16]{1,0} add(%p0.1, %p0.1)
}

ENTRY %main (a: f32[64,32], b: f32[32,16]) -> f32[64,16] {
  %a = f32[64,32]{1,0} parameter(0)
  %b = f32[32,16]{1,0} parameter(1)
  %gemm_fusion.3 = f32[64,16]{1,0} fusion(%a, %b), kind=kCustom, calls=%fused_dot
  ROOT %loop_add_fusion.2 = f32[64,16]{1,0} fusion(%gemm_fusion.3), kind=kLoop, calls=%fused_add
}
"""
  meta = [{'ph': 'M', 'name': 'process_name', 'pid': 2, 'args': {'name': '/device:GPU:0'}},
          {'ph': 'M', 'name': 'thread_name', 'pid': 2, 'tid': 7, 'args': {'name': 'Stream #1'}}]
  ts = iter(range(0, 10_000, 100))

  def kernel(name, dur, **args):
    return {'ph': 'X', 'name': name, 'pid': 2, 'tid': 7, 'ts': next(ts), 'dur': dur,
            'args': args}

  run = lambda: [kernel('sm90_gemm_splitk', 30, hlo_op='gemm_fusion.3', hlo_module='jit_step'),
                 kernel('splitk_reduce', 10, hlo_op='gemm_fusion.3', hlo_module='jit_step'),
                 kernel('loop_add_fusion_2', 5)]
  events = meta + run() + run() + [
      kernel('loop_add_fusion_2', 50, hlo_op='loop_add_fusion.2', hlo_module='jit_other'),
      kernel('memcpy', 7, hlo_module='jit_step')]
  rows, other, by_module = trace_ops.by_instruction(events, trace_ops.device_threads(events), hlo)
  assert by_module
  assert [(r.kernel.name, r.us, r.runs) for r in rows] == [
      ('gemm_fusion.3', 80.0, 2), ('loop_add_fusion.2', 10.0, 2)]
  assert rows[0].kernel.flops == 2 * 64 * 16 * 32 and other == 7.0


def test_compile_shapes_replays_the_round_programs_a_run_compiled():
  """benchmarks/compile_shapes.py, from the (E, B) each round used and the client sizes alone,
  finds as many round programs as the run compiled, B_pad moving between them."""
  import importlib.util
  import numpy as np
  from tests.common import run_rounds, tiny_config, tiny_task
  spec = importlib.util.spec_from_file_location(
      'compile_shapes', os.path.join(ROOT, 'benchmarks', 'compile_shapes.py'))
  compile_shapes = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(compile_shapes)
  # A fast hyper step on B makes B_int cross padded sizes within a few rounds.
  task = tiny_task()
  for placement in ('yes', 'no'):  # the training set on the devices, or sent per round
    config = tiny_config(algorithm='fathom', num_devices=1, eta_h2=30.0, batch_size=4.0,
                         cohort_size=4, data_on_device=placement)
    _, history, rounds = run_rounds(config, task, 8)
    rows = {t: {'epochs': float(m.hparams[0]), 'batch_size': float(m.hparams[2]),
                'batch_size_int': plan.batch_size} for t, (m, plan) in enumerate(history, 1)}
    compiles = compile_shapes.replay(
        np.asarray(task.train.num_examples), rows, cohort_size=4,
        lanes=rounds.planner.num_lanes, seed=config.seed, resident=placement == 'yes',
        per_octave=config.batch_pad_per_octave)
    assert len(compiles) == rounds.compiles >= 3
    assert compiles[0] == (1, 'first round')


def test_examples_and_padding_are_the_plans_counts_recomputed_from_the_cohorts(tmp_path):
  """examples_per_s / rounds_per_s is the mean of Σ K_i·B_int over the timed rounds, and the
  padding efficiency that over what the lanes computed, recomputed here from the cohorts and
  the spec's K_i alone. Two lanes on one device, packed longest first, make real and computed
  differ (the range checks above would pass a benchmark that counted padding steps as
  examples); FedAvg's B 20 is computed as 20 rows (its B never moves: run.batch_moves)."""
  out = tmp_path / 'bench.json'
  p = _bench('--tasks=mlp', '--cohort_sizes=5', '--rounds=3', '--warmup=1', '--num_clients=40',
             '--lanes_per_device=2', '--loop_chunk=1',
             '--local_loop=device', '--noisolate_rows', f'--json={out}')
  assert p.returncode == 0, p.stderr[-3000:]
  (r,) = json.loads(out.read_text())
  assert (r['rounds_timed'], r['rounds_recompiled'], r['lanes'], r['batch_size']) == (
      3, 0, 2, 20)
  # The warm-up is round 1; both lanes run to the longer one.
  real, computed = map(sum, zip(*_real_and_computed(40, 5, (2, 3, 4), lanes_per_device=2)))
  assert abs(r['examples_per_s'] / r['rounds_per_s'] - real / 3) < 1e-6 * real
  assert abs(r['padding_efficiency'] - real / computed) < 1e-12
  assert real < computed  # the lanes' imbalance: a case where the two differ
  # The ceiling: a median over chunks, between the slowest and fastest, on one device.
  assert (r['centralized_examples_per_s_min'] <= r['centralized_examples_per_s']
          <= r['centralized_examples_per_s_max'])
  from launch.timing import CHUNKS
  assert r['centralized_chunks'] == CHUNKS and r['centralized_devices'] == 1
  assert r['xla_compiles'] > r['compiles'] >= 1


def test_the_commit_recorded_is_the_checkouts_and_none_for_a_copy_outside_one(tmp_path,
                                                                              monkeypatch):
  """A copy unpacked inside another repository recorded that repository's commit (benchmark
  rows and run summaries record the same: provenance.source_commit)."""
  import re
  import shutil
  from fathom_sim import provenance
  commit = provenance.source_commit.__wrapped__  # uncached: __file__ moves below
  if shutil.which('git') is None:  # (the tests run from an archive too, git or not)
    pytest.skip('git is not installed: nothing records a commit')
  if os.path.exists(os.path.join(ROOT, '.git')):
    assert re.fullmatch(r'[0-9a-f]{40}[+?]?', commit() or ''), commit()
  else:  # an archive's copy, not a checkout
    assert commit() is None
  outer = tmp_path / 'outer'
  (outer / 'copy' / 'fathom_sim').mkdir(parents=True)
  git = lambda *a: subprocess.run(['git', *a], cwd=outer, capture_output=True, check=True)
  git('init', '-q')
  git('-c', 'user.email=a@b', '-c', 'user.name=a', 'commit', '-q', '--allow-empty', '-m', 'x')
  monkeypatch.setattr(provenance, '__file__', str(outer / 'copy' / 'fathom_sim' / 'provenance.py'))
  assert commit() is None
  monkeypatch.setattr(provenance, '__file__', str(tmp_path / 'fathom_sim' / 'provenance.py'))
  assert commit() is None  # no repository at all


def test_every_part_of_gpu_sh_parses_and_is_in_its_usage_and_header():
  """benchmarks/gpu.sh runs only where a session is lent a GPU, for a few scarce minutes: a
  typo there or a part its usage line or header does not name would cost one of them."""
  script = os.path.join(ROOT, 'benchmarks', 'gpu.sh')
  syntax = subprocess.run(['bash', '-n', script], capture_output=True, text=True)
  assert syntax.returncode == 0, syntax.stderr
  text = open(script).read()
  body = text[text.index('case "$part" in'):]
  parts = re.findall(r'^  ([a-z_]+)\)$', body, re.MULTILINE)
  assert 'brief' in parts and 'fathom' in parts and len(parts) == len(set(parts))
  usage = re.search(r"^usage='usage: benchmarks/gpu\.sh ([a-z_|]+) OUT'$", text, re.MULTILINE)
  assert usage and sorted(usage.group(1).split('|')) == sorted(parts)
  header = text[:text.index('set -euo pipefail')]
  named = re.findall(r'^#   bash benchmarks/gpu\.sh ([a-z_]+) OUT', header, re.MULTILINE)
  assert sorted(named) == sorted(parts)


@pytest.mark.parametrize('model', ['mlp', 'lstm'])
def test_the_mesh_ceiling_runs_an_independent_chain_on_each_device(model):
  """centralized_every_device: chain c on device c, its own model copy, batch and key, with no
  collective between devices; each chain's step is the one-device step on its own inputs.
  (The LSTM's chains were refused by shard_map's check of its scan carry: a traceback on any
  mesh of several devices, after the rounds had been measured.)"""
  import jax
  import numpy as np
  from fathom_sim.data.federated import concat_clients
  from fathom_sim.data.synthetic import stackoverflow_like
  from fathom_sim.run import build, init_state
  from launch.benchmark import ceiling_program
  from tests.common import tiny_config, tiny_task
  task = tiny_task() if model == 'mlp' else stackoverflow_like(num_clients=12)
  config = tiny_config(num_devices=4)
  config.model.name = model
  if model == 'lstm':  # the paper's LSTM layer and scan, at small widths
    config.model.hidden = (4, 6, 5)
  run = build(config, task)
  pooled = concat_clients(task.train, range(len(task.train.num_examples)))
  step, params, batches, keys, chains = ceiling_program(run, pooled, 4, 2, every_device=True)
  assert chains == 4
  for leaf in jax.tree.leaves((params, batches[0], keys[0])):  # one chain's slice a device
    assert leaf.sharding.device_set == set(run.mesh.devices.flat)
    assert leaf.sharding.spec[0] == 'clients' and leaf.shape[0] == chains
  hlo = step.lower(params, batches[0], keys[0]).compile().as_text()
  assert not any(op in hlo for op in ('all-reduce', 'all-gather', 'collective-permute',
                                      'all-to-all', 'reduce-scatter'))
  new, loss = step(params, batches[0], keys[0])
  start = jax.device_get(init_state(run).params)
  grad = jax.jit(jax.value_and_grad(run.model.loss))
  for c in range(chains):
    batch = {k: np.asarray(v)[c] for k, v in batches[0].items()}
    want_loss, g = grad(start, batch, np.ones(4, bool), np.asarray(keys[0])[c])
    np.testing.assert_allclose(np.asarray(loss)[c], want_loss, rtol=1e-6)
    for got, w, gw in zip(jax.tree.leaves(new), jax.tree.leaves(start), jax.tree.leaves(g)):
      np.testing.assert_allclose(np.asarray(got)[c], w - 0.01 * gw, rtol=1e-5, atol=1e-7)
  assert len(set(np.asarray(loss).tolist())) == chains  # each chain its own batch
  _, _, _, _, one = ceiling_program(run, pooled, 4, 2)
  assert one == 1


def _children(pid: int) -> list[int]:
  found = []
  for entry in os.listdir('/proc'):
    try:
      with open(f'/proc/{entry}/stat') as f:
        fields = f.read().rsplit(')', 1)[1].split()
    except (OSError, IndexError):
      continue
    if int(fields[1]) == pid and fields[0] != 'Z':
      found.append(int(entry))
  return found


def _running(pid: int) -> bool:
  try:
    with open(f'/proc/{pid}/stat') as f:
      return f.read().rsplit(')', 1)[1].split()[0] != 'Z'
  except OSError:
    return False


@pytest.mark.skipif(not os.path.isdir('/proc'), reason='finds the row by /proc')
def test_a_row_s_process_stops_when_the_command_that_started_it_is_killed(tmp_path):
  """SIGKILL to the command (or SIGTERM, which ends Python at once) left its row's process
  measuring for minutes on the device, with no one to print the row."""
  env = dict(os.environ, JAX_PLATFORMS='cpu', XLA_FLAGS='--xla_force_host_platform_device_count=1')
  p = subprocess.Popen([sys.executable, os.path.join(ROOT, 'launch', 'benchmark.py'),
                        '--tasks=mlp', '--cohort_sizes=3', '--rounds=100000', '--warmup=1',
                        '--num_clients=30', f'--json={tmp_path / "bench.json"}'],
                       cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                       text=True, start_new_session=True)
  try:
    assert p.stdout.readline().startswith('task'), p.stderr.read()  # the header
    deadline = time.time() + 60
    while not _children(p.pid):
      assert time.time() < deadline and p.poll() is None, p.stderr.read()
      time.sleep(0.1)
    (row,) = _children(p.pid)
    time.sleep(3)  # (into its measurement)
    p.kill()
    p.wait()
    deadline = time.time() + 20
    while _running(row) and time.time() < deadline:
      time.sleep(0.1)
    assert not _running(row)
  finally:
    with contextlib.suppress(ProcessLookupError):  # (none left: the row stopped)
      os.killpg(p.pid, signal.SIGKILL)
  assert 'error: the benchmark command that started this row is gone' in p.stderr.read()


@pytest.mark.parametrize('signum,to_group,words,status', [
    (signal.SIGINT, True, 'Ctrl-C', 130),  # Ctrl-C: the terminal signals the whole group
    (signal.SIGTERM, False, 'SIGTERM', 143),  # `kill PID`: the command alone
])
def test_ctrl_c_or_sigterm_ends_the_benchmark_in_one_line_and_leaves_no_temporary_folder(
    tmp_path, signum, to_group, words, status):
  """Ctrl-C (SIGINT to the terminal's process group) said 'stopped by a second Ctrl-C; the same
  command resumes the run from its last checkpoint', a training run's words, and the row's own
  process printed a KeyboardInterrupt traceback beside it. SIGTERM ended Python at once: no
  line, and the row's temporary folder left behind."""
  temp = tmp_path / 'tmp'
  temp.mkdir()
  env = dict(os.environ, JAX_PLATFORMS='cpu', XLA_FLAGS='--xla_force_host_platform_device_count=1',
             TMPDIR=str(temp))
  out = tmp_path / 'bench.json'
  p = subprocess.Popen([sys.executable, os.path.join(ROOT, 'launch', 'benchmark.py'),
                        '--tasks=mlp', '--cohort_sizes=3', '--rounds=100000', '--warmup=1',
                        '--num_clients=30', f'--json={out}'],
                       cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                       text=True, start_new_session=True)  # a group of its own, as a shell's
  try:
    assert p.stdout.readline().startswith('task'), p.stderr.read()  # the header
    # The row's process running, its folder made (a fixed 8 s wait was short of that on a
    # loaded 2-core machine), then into its measurement.
    deadline = time.time() + 60
    while not (_children(p.pid) and os.listdir(temp)):
      assert time.time() < deadline and p.poll() is None, p.stderr.read()
      time.sleep(0.1)
    time.sleep(3)
    assert p.poll() is None
    if to_group:
      os.killpg(p.pid, signum)
    else:
      os.kill(p.pid, signum)
    stdout, stderr = p.communicate(timeout=60)
  finally:
    if p.poll() is None:
      os.killpg(p.pid, signal.SIGKILL)
  assert p.returncode == status, stderr[-3000:]
  errors = [line for line in stderr.splitlines() if line.startswith('error:')]
  assert errors == [f'error: stopped by {words}'], stderr[-3000:]
  assert 'Traceback' not in stderr + stdout and 'KeyboardInterrupt' not in stderr + stdout
  assert os.listdir(temp) == []
  assert not out.exists()  # no row was measured


def test_fedjax_s_clients_are_the_sizes_the_benchmark_trains_on():
  """compare_fedjax.py gave FedJAX clients cut at test_fraction 0.1 (mean ~197 examples) while
  launch/benchmark.py trained its config's, cut at 0.2 (mean ~175): not the same workload."""
  code = ('import json, sys; from absl import flags; from launch import benchmark; '
          'from benchmarks import compare_fedjax; flags.FLAGS(["b", "--num_clients=300"]); '
          'task = benchmark.load("cnn", benchmark.task_config("cnn", 10)); '
          'print(json.dumps([[int(n) for n in task.train.num_examples], '
          'compare_fedjax.benchmark_sizes(300)]))')
  p = subprocess.run([sys.executable, '-c', code], cwd=ROOT, capture_output=True, text=True,
                     env=dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=ROOT), timeout=120)
  assert p.returncode == 0, p.stderr[-2000:]
  trained, given = json.loads(p.stdout.splitlines()[-1])
  assert given == trained and len(given) == 300


def test_a_row_process_s_peak_memory_is_its_own_not_its_parent_s():
  """ru_maxrss, which peak_rss_gib read, carries the parent's peak across fork and exec: a row
  started by a parent of 0.5 GiB read at least 0.5 GiB, whatever it held itself."""
  code = ('import subprocess, sys\n'
          'held = bytearray(512 << 20)\n'  # (zeroed pages, each touched: resident)
          'child = "from launch.timing import peak_rss_gib; print(peak_rss_gib())"\n'
          'print(subprocess.run([sys.executable, "-c", child], capture_output=True, text=True,\n'
          '                     check=True).stdout.strip())\n')
  p = subprocess.run([sys.executable, '-c', code], cwd=ROOT, capture_output=True, text=True,
                     env={**os.environ, 'PYTHONPATH': ROOT}, timeout=120)
  assert p.returncode == 0, p.stderr
  assert 0 < float(p.stdout) < 0.25  # a bare interpreter's tens of MiB


def test_peak_measured_reads_the_child_s_own_peak_as_python_would_run_it(tmp_path):
  """The memory benchmarks (host_memory, cohort_rss, report_memory, stream_prepared) read a
  child's peak from its rusage, which carries the parent's across fork and exec: the keep_rows
  child of host_memory.py, smaller than its parent, read the parent's figure."""
  script = tmp_path / 'script.py'
  script.write_text('import sys\n'
                    'held = bytearray(int(sys.argv[1]) << 20)\n'
                    'print(__name__, sys.argv[1:], sys.path[0])\n'
                    'sys.exit(int(sys.argv[2]))\n')
  code = ('import json, subprocess, sys\n'
          'from launch.timing import peak_measured\n'
          'held = bytearray(512 << 20)\n'
          'out = []\n'
          'for args in ([sys.argv[1], "0", "0"], [sys.argv[1], "192", "3"],\n'
          '             ["-c", "import sys; print(sys.argv)", "x"],\n'
          '             ["-c", "import os, signal; os.kill(os.getpid(), signal.SIGKILL)"]):\n'
          '  cmd, peak = peak_measured(args)\n'
          '  p = subprocess.run(cmd, capture_output=True, text=True)\n'
          '  out.append([p.returncode, p.stdout.strip(), peak()])\n'
          'peak_measured(["-c", "pass"])\n'  # (made, never run or read: removed at exit)
          'print(json.dumps(out))\n')
  temp = tmp_path / 'temp'  # (where the peaks are written, each file removed once read)
  temp.mkdir()
  p = subprocess.run([sys.executable, '-c', code, str(script)], cwd=ROOT, capture_output=True,
                     text=True, env={**os.environ, 'PYTHONPATH': ROOT, 'TMPDIR': str(temp)},
                     timeout=120)
  assert p.returncode == 0, p.stderr
  bare, held, inline, killed = json.loads(p.stdout)
  assert bare[:2] == [0, f"__main__ ['0', '0'] {tmp_path}"]
  assert 0 < bare[2] < 0.1  # a bare interpreter's tens of MiB, not the parent's 0.5 GiB
  assert held[0] == 3 and 0.19 < held[2] < 0.3
  assert inline[:2] == [0, "['-c', 'x']"]
  assert killed[0] == -9 and killed[2] is None
  assert not os.listdir(temp)


def test_a_row_process_killed_by_a_signal_is_said_with_the_rows_kept(tmp_path):
  """A row's process ended by SIGKILL (the out-of-memory killer's signal) was said as "ended
  by signal 9", without a word of the rows measured before it, which --json keeps."""
  out = tmp_path / 'bench.json'
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  env.pop('XLA_FLAGS', None)
  parent = subprocess.Popen([sys.executable, os.path.join(ROOT, 'launch', 'benchmark.py'),
                             '--tasks=mlp', '--num_clients=20', '--cohort_sizes=2,3',
                             '--rounds=1', f'--json={out}'], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  try:
    deadline = time.time() + 240
    row = None
    while row is None and time.time() < deadline and parent.poll() is None:
      for pid in filter(str.isdigit, os.listdir('/proc')):
        try:
          with open(f'/proc/{pid}/stat') as f:
            ppid = int(f.read().rsplit(')', 1)[1].split()[1])
          with open(f'/proc/{pid}/cmdline', 'rb') as f:
            cmdline = f.read().split(b'\0')
        except (OSError, ValueError, IndexError):
          continue
        if ppid == parent.pid and b'--cohort_sizes=3' in cmdline:
          row = int(pid)
      time.sleep(0.05)
    assert row is not None, 'no process measured the second row'
    os.kill(row, signal.SIGKILL)
    _, err = parent.communicate(timeout=120)
  finally:
    if parent.poll() is None:
      parent.kill()
  assert parent.returncode == 1, err[-2000:]
  assert ('error: the row mlp at cohort 3 was ended by signal 9 (SIGKILL: also what the '
          "kernel's out-of-memory killer sends; see dmesg)") in err.splitlines()
  assert f'the 1 row(s) measured before it are in {out}' in err.splitlines()
  assert [r['cohort_size'] for r in json.loads(out.read_text())] == [2]

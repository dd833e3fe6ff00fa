"""Device time by operation in a jax.profiler trace (run by hand; no TensorBoard needed).

  python benchmarks/trace_ops.py /tmp/t/selects_L50 [--top=25] [--calls=3]

Reads the newest perfetto_trace.json.gz under the directory (written by
jax.profiler.trace(..., create_perfetto_trace=True), e.g. by benchmarks/lane_step.py) and sums
the self time of each operation (its duration less that of the operations nested in it) over the
devices' timelines: GPU/TPU kernels, or on CPU the XLA client's and worker threads (there the
sum is CPU time over the cores, not wall time). `--calls` divides the totals by the number of
traced calls.

With the program's optimized HLO text (`--hlo`; by default `program.hlo.txt` in TRACE_DIR, which
benchmarks/lane_step.py writes beside each trace) it also lists the time by HLO instruction,
each with what it moves and computes a run (benchmarks/hlo_traffic.py) and so the rates it ran
at: which kernels sit near the device's bandwidth or its arithmetic and which near neither. An
event is an instruction's by the `hlo_op` XLA annotates it with (a library call or a split
GEMM launches several kernels a run: a run is counted once), else by its name (XLA:GPU names
a kernel after its fusion, '.' and '-' as '_'); events of other programs (`hlo_module`) are left
out. A Pallas kernel is a custom call whose products the HLO text does not show: its GFLOP
read 0 (conv_passes.py has the convolution's arithmetic).
"""

from __future__ import annotations

import collections
import glob
import gzip
import json
import os
import re
import sys
from typing import NamedTuple

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks import hlo_traffic  # noqa: E402

_TOP = flags.DEFINE_integer('top', 25, 'Operations to list.')
_CALLS = flags.DEFINE_integer('calls', 1, 'Traced calls the totals are divided by.')
_HLO = flags.DEFINE_string('hlo', None, 'The traced program\'s optimized HLO text; default '
                           'TRACE_DIR/program.hlo.txt where it exists.')


def device_threads(events: list[dict]) -> set[tuple]:
  """(pid, tid) of the timelines that run XLA's operations, each counted once: a GPU's stream
  lines ('Stream #...'; its 'XLA Modules' / 'XLA Ops' lines span the same kernels again), else a
  TPU's 'XLA Ops' line, else any /device:* line; where there is no device (CPU), the XLA client
  and worker threads of the host."""
  processes, threads = {}, {}
  for e in events:
    if e.get('ph') == 'M' and e.get('name') == 'process_name':
      processes[e['pid']] = e['args']['name']
    elif e.get('ph') == 'M' and e.get('name') == 'thread_name':
      threads[(e['pid'], e['tid'])] = e['args']['name']
  timelines = {(e['pid'], e['tid']) for e in events if e.get('ph') == 'X'}
  on_device = {t for t in timelines if processes.get(t[0], '').startswith('/device:')}
  for kind in ('Stream', 'XLA Ops'):
    lines = {t for t in on_device if threads.get(t, '').startswith(kind)}
    if lines:
      return lines
  return on_device or {t for t in timelines
                       if any(k in threads.get(t, '') for k in ('PjRtCpuClient', 'XLAEigen'))}


# Host-side events on XLA:CPU's timelines that are no operation's work: the executor waiting
# for its thunks, and zero-length end markers.
_NOT_OPS = ('ThunkExecutor::', 'end: ')


def self_times(events: list[dict], timelines: set[tuple],
               key=lambda e: e['name']) -> dict:
  """key(event) (default its name) -> (self time in microseconds, calls) over complete ('X')
  events of `timelines`."""
  by_timeline = collections.defaultdict(list)
  for e in events:
    if (e.get('ph') == 'X' and (e['pid'], e['tid']) in timelines
        and not e['name'].startswith(_NOT_OPS)):
      by_timeline[(e['pid'], e['tid'])].append(e)
  totals: dict[str, list] = collections.defaultdict(lambda: [0.0, 0])
  for timeline in by_timeline.values():
    timeline.sort(key=lambda e: (e['ts'], -e.get('dur', 0)))
    stack: list[list] = []  # [end, name, self time]
    def close(until: float | None):
      while stack and (until is None or stack[-1][0] <= until):
        _, name, own = stack.pop()
        totals[name][0] += own
        totals[name][1] += 1
    for e in timeline:
      start, dur = float(e['ts']), float(e.get('dur', 0))
      close(start)
      if stack:
        stack[-1][2] -= dur  # time inside a nested operation is not the parent's own
      stack.append([start + dur, key(e), dur])
    close(None)
  return {name: (t, n) for name, (t, n) in totals.items()}


class Instruction(NamedTuple):
  kernel: hlo_traffic.Kernel  # its account of one run
  us: float                   # device time in microseconds, over the trace
  runs: int                   # over the trace


def by_instruction(events: list[dict], timelines: set[tuple], hlo: str
                   ) -> tuple[list[Instruction], float, bool]:
  """The traced time of each kernel of the program `hlo` (longest first), the time of the
  timelines' events that are none of its kernels (microseconds), and whether events were told
  apart by their program (`hlo_module`; False: every event was taken)."""
  kernels = hlo_traffic.all_kernels(hlo)
  names = dict(zip(kernels, kernels))
  for name in kernels:
    names.setdefault(re.sub(r'[.\-]', '_', name), name)
  module = hlo_traffic.module_name(hlo)
  by_module = any((e.get('args') or {}).get('hlo_module') == module for e in events)
  if by_module:
    events = [e for e in events if (e.get('args') or {}).get('hlo_module', module) == module]

  def instruction(e):
    op = (e.get('args') or {}).get('hlo_op')
    return names.get(op) or names.get(e['name'])

  times = self_times(events, timelines, key=lambda e: (instruction(e), e['name']))
  us: dict = collections.defaultdict(float)
  runs: dict = collections.defaultdict(int)
  for (name, _), (t, n) in times.items():
    us[name] += t
    runs[name] = max(runs[name], n)  # each run launches each of its kernels once
  rows = [Instruction(kernels[name], t, runs[name]) for name, t in us.items() if name]
  return sorted(rows, key=lambda r: -r.us), us.get(None, 0.0), by_module


def print_instructions(events: list[dict], timelines: set[tuple], hlo: str, path: str,
                       calls: int, top: int) -> None:
  rows, other, by_module = by_instruction(events, timelines, hlo)
  total = sum(r.us for r in rows) + other
  moved = sum(r.kernel.bytes * r.runs for r in rows)
  flops = sum(r.kernel.flops * r.runs for r in rows)
  seconds = sum(r.us for r in rows) / 1e6
  print(f'\nby HLO instruction of {hlo_traffic.module_name(hlo) or "?"} ({path}'
        f'{"" if by_module else "; no event named its program: all taken"}): '
        f'{1 - other / max(total, 1e-9):.1%} of the time; '
        f'{moved / calls / 1e6:.0f} MB and {flops / calls / 1e9:.2f} GFLOP a call, '
        f'{moved / max(seconds, 1e-12) / 1e9:.0f} GB/s and '
        f'{flops / max(seconds, 1e-12) / 1e12:.1f} TFLOP/s over their time')
  print(f'{"ms/call":>9} {"share":>6} {"runs":>6} {"MB/run":>9} {"GB/s":>7} {"GFLOP/run":>9} '
        f'{"TFLOP/s":>7}  {"kind":<10} instruction  [JAX operation]')
  for r in rows[:top]:
    seconds = r.us / 1e6
    k = r.kernel
    op = k.op_name if len(k.op_name) <= 60 else '...' + k.op_name[-60:].split('/', 1)[-1]
    print(f'{r.us / calls / 1e3:>9.3f} {r.us / max(total, 1e-9):>6.1%} {r.runs / calls:>6.0f} '
          f'{k.bytes / 1e6:>9.2f} {k.bytes * r.runs / max(seconds, 1e-12) / 1e9:>7.0f} '
          f'{k.flops / 1e9:>9.3f} {k.flops * r.runs / max(seconds, 1e-12) / 1e12:>7.1f}  '
          f'{k.kind:<10} {k.name}  [{op}]')


def main(argv):
  if len(argv) != 2:
    sys.exit('usage: trace_ops.py TRACE_DIR [--top=N] [--calls=N] [--hlo=FILE]')
  found = sorted(glob.glob(os.path.join(argv[1], '**', 'perfetto_trace.json.gz'),
                           recursive=True), key=os.path.getmtime)
  if not found:
    sys.exit(f'trace_ops.py: no perfetto_trace.json.gz under {argv[1]!r}')
  with gzip.open(found[-1], 'rt') as f:
    trace = json.load(f)
  events = trace['traceEvents'] if isinstance(trace, dict) else trace
  timelines = device_threads(events)
  times = self_times(events, timelines)
  total = sum(t for t, _ in times.values())
  calls = max(1, _CALLS.value)
  print(f'{found[-1]}\noperations\' time {total / calls / 1e3:.3f} ms per call, '
        f'{sum(n for _, n in times.values()) / calls:.0f} operations per call')
  print(f'{"ms/call":>9} {"share":>6} {"calls":>7}  operation')
  for name, (t, n) in sorted(times.items(), key=lambda kv: -kv[1][0])[:_TOP.value]:
    print(f'{t / calls / 1e3:>9.3f} {t / max(total, 1e-9):>6.1%} {n / calls:>7.0f}  {name}')
  hlo_path = _HLO.value or os.path.join(argv[1], 'program.hlo.txt')
  if _HLO.value and not os.path.isfile(hlo_path):
    sys.exit(f'trace_ops.py: --hlo: no file {hlo_path!r} (the traced program\'s optimized HLO '
             'text, as lane_step.py writes it)')
  if os.path.isfile(hlo_path):
    with open(hlo_path) as f:
      hlo = f.read()
    print_instructions(events, timelines, hlo, hlo_path, calls, _TOP.value)


if __name__ == '__main__':
  app.run(main)

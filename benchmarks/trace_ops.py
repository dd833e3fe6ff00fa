"""Device time by operation in a jax.profiler trace (run by hand; no TensorBoard needed).

  python benchmarks/trace_ops.py /tmp/t/selects_L50 [--top=25] [--calls=3]

Reads the newest perfetto_trace.json.gz under the directory (written by
jax.profiler.trace(..., create_perfetto_trace=True), e.g. by benchmarks/lane_step.py) and sums
the self time of each operation (its duration less that of the operations nested in it) over the
devices' timelines: GPU/TPU kernels, or on CPU the XLA client's and worker threads (there the
sum is CPU time over the cores, not wall time). `--calls` divides the totals by the number of
traced calls.
"""

from __future__ import annotations

import collections
import glob
import gzip
import json
import os
import sys

from absl import app, flags

_TOP = flags.DEFINE_integer('top', 25, 'Operations to list.')
_CALLS = flags.DEFINE_integer('calls', 1, 'Traced calls the totals are divided by.')


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


def self_times(events: list[dict], timelines: set[tuple]) -> dict[str, tuple[float, int]]:
  """name -> (self time in microseconds, calls) over complete ('X') events of `timelines`."""
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
      stack.append([start + dur, e['name'], dur])
    close(None)
  return {name: (t, n) for name, (t, n) in totals.items()}


def main(argv):
  if len(argv) != 2:
    sys.exit('usage: trace_ops.py TRACE_DIR [--top=N] [--calls=N]')
  found = sorted(glob.glob(os.path.join(argv[1], '**', 'perfetto_trace.json.gz'),
                           recursive=True), key=os.path.getmtime)
  if not found:
    sys.exit(f'trace_ops.py: no perfetto_trace.json.gz under {argv[1]!r}')
  with gzip.open(found[-1], 'rt') as f:
    trace = json.load(f)
  events = trace['traceEvents'] if isinstance(trace, dict) else trace
  times = self_times(events, device_threads(events))
  total = sum(t for t, _ in times.values())
  calls = max(1, _CALLS.value)
  print(f'{found[-1]}\noperations\' time {total / calls / 1e3:.3f} ms per call, '
        f'{sum(n for _, n in times.values()) / calls:.0f} operations per call')
  print(f'{"ms/call":>9} {"share":>6} {"calls":>7}  operation')
  for name, (t, n) in sorted(times.items(), key=lambda kv: -kv[1][0])[:_TOP.value]:
    print(f'{t / calls / 1e3:>9.3f} {t / max(total, 1e-9):>6.1%} {n / calls:>7.0f}  {name}')


if __name__ == '__main__':
  app.run(main)

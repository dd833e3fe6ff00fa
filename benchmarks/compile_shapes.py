r"""Which rounds of a recorded run compile a round program, and why, replayed (by hand):

  python benchmarks/compile_shapes.py --config=configs/femnist.py \
      --metrics=docs/results/gpu_h100/fathom1500_after_6b1cb65_metrics.jsonl.gz \
      --config.data.name=femnist_synthetic --config.data.num_clients=3400 --lanes=10

A round program is compiled for each new plan shape: padded batch B_pad, index-stream length
and (data not on the devices) per-device example-buffer length. Those are functions of the
cohort's client sizes and the round's (E, B) alone, so the run's metrics.jsonl (the E and B
each round used) and the data's client sizes replay them exactly, for either data placement
and any number of lanes, without a device. The planner runs on a stand-in dataset with the
real client sizes and one byte per example. As a check, each round's replayed B_int must equal
the run's. Compiles the thread of config.compile_ahead can take over are the moves of B_pad to
a neighbouring padded size (what it compiles) whose stream and buffer lengths are in use.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file('config', None, 'The run\'s config file.')
_METRICS = flags.DEFINE_string('metrics', None, 'The run\'s metrics.jsonl (or .jsonl.gz).')
_LANES = flags.DEFINE_integer('lanes', None, 'Lanes of the run (devices x lanes per device); '
                               'by default, those its summary.json beside --metrics records.')
_DEVICES = flags.DEFINE_integer('devices', None, 'Devices of the run (its lanes share one '
                                'example buffer per device); by default 1 with --lanes, else '
                                'its summary.json\'s.')


def _run_lanes() -> tuple[int, int]:
  """(lanes, devices) of the run: the flags', else its summary.json's (the lane count decides
  the stream's length: replayed with another, the rounds that compile differ)."""
  if _LANES.value is not None:
    return _LANES.value, _DEVICES.value or 1
  import json
  path = os.path.join(os.path.dirname(os.path.abspath(_METRICS.value)), 'summary.json')
  try:
    with open(path, encoding='utf-8') as f:
      summary = json.load(f)
    devices = int(summary['devices'])
    lanes = devices * int(summary['lanes_per_device'])
  except (OSError, ValueError, KeyError, TypeError) as e:
    raise SystemExit(f'--lanes and --devices not given, and {path} does not say them '
                     f'({type(e).__name__}: {e}); give both') from None
  if len(summary.get('executions') or []) > 1:
    print(f'the run ran under {len(summary["executions"])} executions; replayed with the '
          f'last\'s {lanes} lanes on {devices} device(s)')
  return lanes, devices if _DEVICES.value is None else _DEVICES.value


def replay(sizes, rows: dict, *, cohort_size: int, lanes: int, seed: int, resident: bool,
           per_octave: int, max_batch_size: int = 2**30, devices: int = 1,
           exact_batch: bool = False,
           buffer_rows: list | None = None) -> list[tuple[int, str]]:
  """(round, why) for every round whose plan has a shape not seen before. `exact_batch`: the
  run's B could not move (run.batch_moves), so its steps computed B_int rows (runs since
  2a7a6ee; before, every run padded B_int up to the grid). `buffer_rows`, when given, gets
  each round's (example rows sent, the cohort's examples): the rows are the buffers times
  their padded length, 0 when resident."""
  import numpy as np
  from fathom_sim.data.federated import ArrayClientDataset
  from fathom_sim.data.sampling import sample_cohort
  from fathom_sim.data.plan import Planner, neighbour_buckets

  offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
  data = ArrayClientDataset({'x': np.zeros(int(offsets[-1]), np.uint8)}, offsets,
                            np.arange(len(sizes)).astype(str))
  planner = Planner(data, cohort_size, lanes, seed, resident=resident,
                    batch_per_octave=per_octave, exact_batch=exact_batch,
                    lanes_per_buffer=lanes // devices)
  seen, compiles, last = set(), [], None
  for t in sorted(rows):
    r = rows[t]
    plan = planner.plan(sample_cohort(data, seed, t, cohort_size), t, np.float32(r['epochs']),
                        np.float32(r['batch_size']))
    if plan.batch_size != r['batch_size_int']:
      raise SystemExit(f'round {t}: replayed B_int {plan.batch_size}, the run used '
                       f'{r["batch_size_int"]}: not the run\'s data or config')
    lengths = (planner.stream_pad, planner.buffer_pad)
    if buffer_rows is not None:
      buffer = plan.shape[1]
      buffer_rows.append((0 if buffer is None else buffer[0] * buffer[1],
                          int(plan.num_examples.sum())))
    if plan.shape not in seen:
      if last is None:
        why = 'first round'
      elif lengths == last[1] and plan.batch_pad in neighbour_buckets(
          last[0], per_octave, min_batch_pad=planner.min_batch_pad,
          max_batch_size=max_batch_size):
        why = f'B_pad {last[0]} -> {plan.batch_pad} (compile ahead can take it)'
      else:
        grew = [f'{name} {a} -> {b}' for name, a, b in
                zip(('stream', 'buffer'), last[1], lengths) if a != b]
        why = ', '.join(grew + ([f'B_pad {last[0]} -> {plan.batch_pad}']
                                if plan.batch_pad != last[0] else []))
      compiles.append((t, why))
      seen.add(plan.shape)
    last = (plan.batch_pad, lengths)
  return compiles


def main(argv):
  del argv
  import numpy as np
  from fathom_sim.data import load_task
  from fathom_sim.metrics import read_rows
  from fathom_sim.fathom import batch_size_int
  from fathom_sim.run import batch_moves

  c = _CONFIG.value
  sizes = np.asarray(load_task(c.data).train.num_examples)
  rows = {r['round']: r for r in read_rows(_METRICS.value)}
  lanes, devices = _run_lanes()
  for resident in (False, True):
    buffer_rows = []
    compiles = replay(sizes, rows, cohort_size=c.cohort_size, lanes=lanes, seed=c.seed,
                      resident=resident, per_octave=c.batch_pad_per_octave,
                      max_batch_size=batch_size_int(min(c.upper_batch_size, 2**30)),
                      devices=devices, exact_batch=not batch_moves(c),
                      buffer_rows=buffer_rows)
    where = 'on the devices' if resident else 'sent per round'
    print(f'data {where}: {len(compiles)} round programs over {len(rows)} rounds')
    if not resident:
      sent, real = np.asarray(buffer_rows).T
      print(f'  example rows sent per round: mean {sent.mean():.0f}, max {sent.max()}; '
            f'the cohorts\' examples: mean {real.mean():.0f}')
    for t, why in compiles:
      print(f'  round {t:5d}: {why}')


if __name__ == '__main__':
  flags.mark_flags_as_required(['config', 'metrics'])
  app.run(main)

r"""Predicted round time by lanes, from the client sizes and a cost a step (no device needed):

  python benchmarks/lane_counts.py [--task=cnn|lstm] [--cohort_lanes=10:5/7/10,50:17/25/50] \
      [--step_ms=... --lane_ms=...]

For each cohort size, samples --samples cohorts of the benchmark's training clients (cnn: the
FEMNIST-shaped ones, B 20; lstm: the Stack-Overflow-shaped ones, B 16), turns each client's
examples into local steps (E --epochs), packs them onto each lane count as a round does and
takes the longest lane, the round's steps (`plan.longest_lane`). A step at k lanes is taken
to cost step_ms + lane_ms * k, by default a line fit to the task's rounds timed on one H200
at 4-67 lanes (docs/benchmarks.md, "Tenth session"). Prints the mean steps and the
predicted ms a round per lane count; `*` marks the count that lanes_per_device auto picks on
one accelerator (`run.LANE_STEP_SLACK` more steps at most, over its own sampled cohorts).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

_TASK = flags.DEFINE_enum('task', 'cnn', ['cnn', 'lstm'], 'The benchmark\'s task.')
_PAIRS = flags.DEFINE_string('cohort_lanes', '10:5/7/10,50:17/20/25/34/50,100:34/40/50,'
                             '200:50/67/100', 'cohort:lanes/lanes/... per cohort size.')
_CLIENTS = flags.DEFINE_integer('num_clients', 1000, 'Clients of the generated data.')
_EPOCHS = flags.DEFINE_float('epochs', 1.0, 'Local epochs.')
_BATCH = flags.DEFINE_integer('batch_size', 0, 'Local batch size (0: the task\'s).')
_SAMPLES = flags.DEFINE_integer('samples', 200, 'Cohorts sampled per cohort size.')
_STEP_MS = flags.DEFINE_float('step_ms', None, 'A step\'s fixed cost (ms; default the task\'s).')
_LANE_MS = flags.DEFINE_float('lane_ms', None, 'A step\'s cost per lane (ms; default the task\'s).')
# (B, step ms, ms a lane): a least-squares line through the ms a step of every lanes row timed
# on one H200 (CNN 7-67 lanes, within 6 %; LSTM 4-50, within 1 %), docs/benchmarks.md, "Tenth
# session" (the "Ninth session"'s predictions used 0.59 + 0.048 k and 1.5 + 0.47 k). The LSTM's
# line was timed before fathom_sim/lstm.py wrote its backward pass out and padded its gates
# ("Eighteenth" and "Nineteenth session": 2.6x fewer bytes a step at 4-27 lanes in float32 by
# the H100 account): refit it from the next GPU call's rows.
TASKS = {'cnn': (20, 0.54, 0.051), 'lstm': (16, 1.71, 0.469)}


def main(argv):
  del argv
  from fathom_sim.config import base_config
  from fathom_sim.data.plan import longest_lane
  from fathom_sim.run import accelerator_lanes
  from fathom_sim.data.synthetic import femnist_like, stackoverflow_like
  batch, step_ms, lane_ms = TASKS[_TASK.value]
  batch = _BATCH.value or batch
  step_ms = step_ms if _STEP_MS.value is None else _STEP_MS.value
  lane_ms = lane_ms if _LANE_MS.value is None else _LANE_MS.value
  make = femnist_like if _TASK.value == 'cnn' else stackoverflow_like
  sizes = np.asarray(make(num_clients=_CLIENTS.value).train.num_examples)
  steps = np.maximum(np.ceil(_EPOCHS.value * sizes / batch), 1).astype(int)
  rng = np.random.default_rng(0)
  for pair in _PAIRS.value.split(','):
    cohort, lanes = pair.split(':')
    cohorts = [steps[rng.choice(len(steps), int(cohort), replace=False)]
               for _ in range(_SAMPLES.value)]
    config = base_config()
    config.cohort_size, config.epochs, config.batch_size = int(cohort), _EPOCHS.value, batch
    auto = accelerator_lanes(config, 1, sizes)
    cells = []
    for k in sorted({*map(int, lanes.split('/')), auto}):
      longest = np.mean([longest_lane(c, k) for c in cohorts])
      cells.append(f'{k}{"*" if k == auto else ""}: {longest:.1f} steps, '
                   f'{longest * (step_ms + lane_ms * k):.1f} ms')
    print(f'cohort {cohort}: ' + '; '.join(cells))


if __name__ == '__main__':
  app.run(main)

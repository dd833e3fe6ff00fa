"""Predicted round time by lanes, from the client sizes and a cost a step (no device needed):

  python benchmarks/lane_counts.py --cohort_lanes=10:5/7/10,50:17/20/25/34/50 \
      --step_ms=0.59 --lane_ms=0.048

For each cohort size, samples --samples cohorts of the FEMNIST-shaped training clients (the
benchmark's data), turns each client's examples into local steps (E --epochs, B --batch_size),
packs them onto each lane count as a round does (`plan.pack_lanes`, longest first) and takes
the longest lane: the round's steps. A step at k lanes is taken to cost step_ms + lane_ms * k
(fit these to two measured lane counts; the defaults are the CNN's round on one H200,
docs/benchmarks.md). Prints the mean steps and the predicted ms a round per lane count.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

_PAIRS = flags.DEFINE_string('cohort_lanes', '10:5/7/10,50:17/20/25/34/50,100:34/40/50,'
                             '200:50/67/100', 'cohort:lanes/lanes/... per cohort size.')
_CLIENTS = flags.DEFINE_integer('num_clients', 1000, 'Clients of the generated data.')
_EPOCHS = flags.DEFINE_float('epochs', 1.0, 'Local epochs.')
_BATCH = flags.DEFINE_integer('batch_size', 20, 'Local batch size.')
_SAMPLES = flags.DEFINE_integer('samples', 200, 'Cohorts sampled per cohort size.')
_STEP_MS = flags.DEFINE_float('step_ms', 0.59, 'A step\'s fixed cost (ms).')
_LANE_MS = flags.DEFINE_float('lane_ms', 0.048, 'A step\'s cost per lane (ms).')


def main(argv):
  del argv
  from fathom_sim.data.plan import pack_lanes
  from fathom_sim.data.synthetic import femnist_like
  sizes = np.asarray(femnist_like(num_clients=_CLIENTS.value).train.num_examples)
  steps = np.maximum(np.ceil(_EPOCHS.value * sizes / _BATCH.value), 1).astype(int)
  rng = np.random.default_rng(0)
  for pair in _PAIRS.value.split(','):
    cohort, lanes = pair.split(':')
    cohorts = [steps[rng.choice(len(steps), int(cohort), replace=False)]
               for _ in range(_SAMPLES.value)]
    cells = []
    for k in map(int, lanes.split('/')):
      longest = np.mean([max(sum(c[i] for i in lane) for lane in pack_lanes(c, k))
                         for c in cohorts])
      cells.append(f'{k}: {longest:.1f} steps, '
                   f'{longest * (_STEP_MS.value + _LANE_MS.value * k):.1f} ms')
    print(f'cohort {cohort}: ' + '; '.join(cells))


if __name__ == '__main__':
  app.run(main)

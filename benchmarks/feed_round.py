"""What a round's data cost the host when they are sent per round (by hand, not in CI):

  python benchmarks/feed_round.py --cohort_sizes=10,200 --lanes=10,50

Plans FEMNIST-shaped cohorts (the generated data of configs/femnist.py's shapes) and sends
their example buffers to one device, the way a run whose training set is not on the devices
does (one device holding every lane, as on one GPU). Two layouts, alternating in one process:
a buffer per lane (`lanes_per_buffer=1`, before 2026-11-25) and one buffer per device shared by
its lanes. Prints the example rows sent per round against the cohort's own, and the median
time to plan and to put a round's arrays on the device (`block_until_ready`).
"""

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402

_COHORTS = flags.DEFINE_list('cohort_sizes', ['10', '200'], 'Clients per round.')
_LANES = flags.DEFINE_list('lanes', ['10', '50'], 'Lanes (all on one device), per cohort size.')
_ROUNDS = flags.DEFINE_integer('rounds', 20, 'Rounds planned and sent per layout.')
_NUM_CLIENTS = flags.DEFINE_integer('num_clients', 1000, 'Clients of the generated data.')


def main(argv):
  del argv
  import jax
  import numpy as np
  from fathom_sim.data import load_task
  from fathom_sim.data.sampling import sample_cohort
  from fathom_sim.data.plan import Planner
  import configs.femnist as femnist

  config = femnist.get_config()
  config.data.name = 'femnist_synthetic'
  config.data.num_clients = _NUM_CLIENTS.value
  train = load_task(config.data).train
  device = jax.devices()[0]
  print(f'{device.platform}, jax {jax.__version__}, {_NUM_CLIENTS.value} clients')
  print('cohort  lanes  layout      rows sent  cohort rows  plan ms  put ms')
  for cohort, lanes in zip(map(int, _COHORTS.value), map(int, _LANES.value), strict=True):
    layouts = {'per lane': 1, 'per device': lanes}
    planners = {k: Planner(train, cohort, lanes, 0, lanes_per_buffer=v)
                for k, v in layouts.items()}
    times = {k: ([], [], [], []) for k in layouts}
    for t in range(1, _ROUNDS.value + 1):
      clients = sample_cohort(train, 0, t, cohort)
      for name, planner in planners.items():  # alternating, round by round
        plan_s, put_s, sent, real = times[name]
        start = time.perf_counter()
        plan = planner.plan(clients, t, 1.0, 20.0)
        planned = time.perf_counter()
        jax.block_until_ready(jax.device_put(plan.lanes.source, device))
        put_s.append(time.perf_counter() - planned)
        plan_s.append(planned - start)
        buffers, length = plan.shape[1]
        sent.append(buffers * length)
        real.append(int(plan.num_examples.sum()))
    for name, (plan_s, put_s, sent, real) in times.items():
      # The first rounds size the buffers; the medians are over every round.
      print(f'{cohort:6d} {lanes:6d}  {name:10s} {np.mean(sent):10.0f} {np.mean(real):12.0f} '
            f'{1e3 * np.median(plan_s):8.1f} {1e3 * np.median(put_s):7.1f}')


if __name__ == '__main__':
  app.run(main)

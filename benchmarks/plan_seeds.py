"""What planning a round of vectorised seeds costs the host (by hand, not in CI):

  python benchmarks/plan_seeds.py --seeds=5 --cohort_sizes=10,50 --lanes=10,8 --per_buffer=10,1

Plans FEMNIST-shaped cohorts (femnist_synthetic's generated data, 3,400 writers by default)
for S seeds side by side, as `launch/sweep.py --vmap_seeds` does with the data read per round:
each seed's own plan, then the stacked [S, ...] arrays the round takes. The clients of the
rounds timed are made before timing (generating them is not planning). Prints the stacked
example buffer and the median time of `SeedPlanners.plan` over the rounds after the first 4
(their lengths grow).
"""

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402

_SEEDS = flags.DEFINE_integer('seeds', 5, 'Seeds planned side by side.')
_COHORTS = flags.DEFINE_list('cohort_sizes', ['10', '50'], 'Clients per round.')
_LANES = flags.DEFINE_list('lanes', ['10', '8'], 'Lanes, per cohort size.')
_PER_BUFFER = flags.DEFINE_list('per_buffer', ['10', '1'],
                                'Lanes sharing an example buffer (a device\'s), per cohort size.')
_ROUNDS = flags.DEFINE_integer('rounds', 14, 'Rounds planned per cohort size.')
_NUM_CLIENTS = flags.DEFINE_integer('num_clients', 3400, 'Writers of the generated data.')


def main(argv):
  del argv
  import numpy as np

  from fathom_sim.data.sampling import sample_cohort
  from fathom_sim.data.plan import SeedPlanners
  from fathom_sim.data.synthetic import femnist_like

  train = femnist_like(num_clients=_NUM_CLIENTS.value).train
  made = {}

  class Held:
    """The generated clients, each made once and then held."""
    client_ids, num_examples = train.client_ids, train.num_examples

    def client(self, i):
      if i not in made:
        made[i] = train.client(i)
      return made[i]

  seeds = list(range(_SEEDS.value))
  for cohort, lanes, per in zip(*(map(int, f.value) for f in (_COHORTS, _LANES, _PER_BUFFER)),
                                strict=True):
    cohorts = [[sample_cohort(train, s, t, cohort) for s in seeds]
               for t in range(1, _ROUNDS.value + 1)]
    for i in np.concatenate([np.concatenate(c) for c in cohorts]):
      Held().client(int(i))
    planners = SeedPlanners(Held(), cohort, lanes, seeds, lanes_per_buffer=per)
    hparams = np.array([[1.0, 0.1, 20.0]] * len(seeds))  # (E, eta, B)
    times = []
    for t, chosen in enumerate(cohorts, 1):
      start = time.perf_counter()
      stacked = planners.plan(chosen, t, hparams)
      times.append(time.perf_counter() - start)
    mib = sum(a.nbytes for a in stacked.lanes.source.values()) / 2**20
    print(f'cohort {cohort}, {lanes} lanes, {len(seeds)} seeds: stacked buffer {mib:.0f} MiB, '
          f'SeedPlanners.plan median {1e3 * np.median(times[4:]):.1f} ms '
          f'(rounds 5-{_ROUNDS.value})', flush=True)


if __name__ == '__main__':
  app.run(main)

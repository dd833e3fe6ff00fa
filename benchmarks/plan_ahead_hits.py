r"""How often a plan made ahead would have been used, replayed from a recorded run (by hand):

  python benchmarks/plan_ahead_hits.py --config=configs/femnist.py \
      --metrics=docs/results/gpu_h100/fathom1500_after_6b1cb65_metrics.jsonl.gz \
      --config.data.name=femnist_synthetic --config.data.num_clients=3400

Rounds plans round t+1 under round t's (E, B) and uses that plan when round t+1's own (E, B)
give the same B_int and K_i. Cohorts depend only on (seed, round), so the run's metrics.jsonl
(the E and B each round used) and the data's client sizes say, round by round, whether it would
have been used. As a check, each round's replayed sum of K_i must equal the run's local steps.
Not replayed: since 695cc2d a plan is also made again when planning on time would leave other
padded lengths (the stream is sized for the largest client under E). "Used" may be too high by
those rounds; the run's summary.json counts every plan made again (`replanned`).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file('config', None, 'The run\'s config file.')
_METRICS = flags.DEFINE_string('metrics', None, 'The run\'s metrics.jsonl (or .jsonl.gz).')


def main(argv):
  del argv
  import numpy as np
  from fathom_sim.metrics import read_rows
  from fathom_sim import fathom
  from fathom_sim.data import load_task
  from fathom_sim.data.sampling import sample_cohort

  c = _CONFIG.value
  task = load_task(c.data)
  sizes = np.asarray(task.train.num_examples)
  rows = {r['round']: r for r in read_rows(_METRICS.value)}
  hp = {t: (np.float32(r['epochs']), np.float32(r['batch_size'])) for t, r in rows.items()}
  used = b_changed = k_changed = mismatched = 0
  for t in range(2, max(rows) + 1):
    n = sizes[sample_cohort(task.train, c.seed, t, c.cohort_size)]
    b_ahead, k_ahead = fathom.integer_schedule(*hp[t - 1], n)
    b, k = fathom.integer_schedule(*hp[t], n)
    mismatched += int(k.sum()) != rows[t]['local_steps'] - rows[t - 1]['local_steps']
    if b != b_ahead:
      b_changed += 1
    elif not np.array_equal(k, k_ahead):
      k_changed += 1
    else:
      used += 1
  total = max(rows) - 1
  print(f'rounds 2-{max(rows)}: plan made ahead used {used} ({used / total:.1%}); planned '
        f'again: B_int changed {b_changed}, only K_i changed {k_changed}; rounds whose '
        f'replayed K_i disagree with the run: {mismatched}')


if __name__ == '__main__':
  flags.mark_flags_as_required(['config', 'metrics'])
  app.run(main)

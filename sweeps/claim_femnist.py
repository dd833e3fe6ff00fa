"""The paper's claim on FEMNIST-shaped data with the paper's EMNIST CNN: FATHOM (reference
defaults of the paper's FEMNIST runs) against FedAvg with static (eta, E, B) tuned by a
3 x 3 x 3 grid around the reference values, 5 seeds each, 10 clients per round.

Generated FEMNIST-shaped data (3,400 writers, 62 classes, 28 x 28 images, lognormal sizes),
500 rounds: 140 runs of about 1M client examples each. That is an accelerator's job (the CNN
trains at a few hundred examples/s on a 2-core CPU, docs/benchmarks.md); claim_femnist_cpu.py
is the CPU-sized variant.

  bash experiments/claim.sh femnist
"""

import itertools

ETAS = (0.03, 0.1, 0.3)
EPOCHS = (0.5, 1.0, 2.0)
BATCH_SIZES = (10.0, 20.0, 50.0)


def settings() -> list[dict]:
  out = [{'algorithm': 'fathom'}]
  out += [{'algorithm': 'fedavg', 'eta': eta, 'epochs': e, 'batch_size': b}
          for eta, e, b in itertools.product(ETAS, EPOCHS, BATCH_SIZES)]
  return out


def get_sweep():
  return {
      'config': '../configs/femnist.py',
      'fixed': {'data.name': 'femnist_synthetic', 'data.num_clients': 3400, 'num_rounds': 500,
                'eval_every': 10,
                'eval_clients': 340},
      'overrides': settings(),
      'seeds': 5,
  }

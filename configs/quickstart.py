"""The embedded default task: Synthetic(1, 1) with 1,000 clients and a small MLP.

Needs no download and runs in minutes on a 2-core CPU. FATHOM by default, with the reference
initial values, alpha, eta_h, scales and bounds of the paper's FEMNIST runs; run the static
baseline with --config.algorithm=fedavg.
"""

from fathom_sim.config import base_config


def get_config():
  c = base_config()
  c.num_rounds = 500
  c.cohort_size = 20
  c.eval_every = 5
  c.checkpoint_every = 50
  c.target_accuracy = 0.4
  c.model.name = 'mlp'
  c.model.hidden = (64,)
  c.data.name = 'synthetic'
  c.data.num_clients = 1000
  return c

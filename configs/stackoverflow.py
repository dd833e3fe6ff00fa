"""Stack Overflow next-word prediction (342k users) with the paper's LSTM: the reference run.

Needs the prepared dataset at data.data_dir (README: Real datasets), e.g.
  python launch/prepare_data.py --format=fedjax_sqlite --task=stackoverflow --source=DIR \
      --vocab=DIR/stackoverflow.word_count --out=data/stackoverflow
FATHOM by default; --config.algorithm=fedavg runs the static baseline with the same values.
"""

from fathom_sim.config import base_config


def get_config():
  c = base_config()
  c.num_rounds = 1500
  c.cohort_size = 50
  c.eval_every = 5
  c.eval_clients = 1000  # the full test set is ~200k clients: sample for periodic evals
  c.server_optimizer = 'sgd'
  c.server_lr = 1.0
  c.eta, c.epochs, c.batch_size = 0.32, 1.0, 16.0
  c.alpha = 0.5
  c.eta_h = 0.01
  c.eta_h0, c.eta_h1, c.eta_h2 = 1.0, 1.0, 10.0
  c.upper_epochs, c.upper_eta, c.upper_batch_size = 10.0, 1.0, 5096.0
  c.model.name = 'stackoverflow_lstm'
  # The reference runs took FedJAX's STACKOVERFLOW_WORD task, whose training loss sums each
  # sentence's token losses over an expected length of 13.3 (models.sequence_model).
  c.model.expected_length = 13.3
  # ... and its model started from FedJAX's (Haiku's) initial values.
  c.model.init = 'fedjax'
  c.data.name = 'stackoverflow'
  c.data.data_dir = 'data/stackoverflow'
  return c

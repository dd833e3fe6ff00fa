"""The quickstart FATHOM run: few compilations while eta, E and B move."""

import json
import os

from fathom_sim.train import train_and_evaluate
from tests.test_cli import load_config_file


def test_300_round_fathom_quickstart_compiles_at_most_12_times(tmp_path):
  config = load_config_file('configs/quickstart.py')
  assert config.algorithm == 'fathom'
  config.num_rounds = 300
  config.eval_every = 50
  config.log_every = 100
  summary = train_and_evaluate(config, str(tmp_path))
  assert summary['compiles'] <= 12, summary['compiles']
  with open(os.path.join(tmp_path, 'metrics.jsonl')) as f:
    rows = [json.loads(line) for line in f]
  first, last = rows[0], rows[-1]
  for key in ('eta', 'epochs', 'batch_size'):  # all three moved visibly
    assert abs(last[key] / first[key] - 1) > 0.02, (key, first[key], last[key])
  assert summary['padding_efficiency'] > 0.5

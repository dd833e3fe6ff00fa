r"""fathom_sim against FedJAX 0.0.17's FedAvg, same model, workload and cohort, alternating the
two sides in one run (the machine's speed drifts between runs). Run by hand, never by CI:

  python3 -m venv .venv-fedjax && .venv-fedjax/bin/pip install -r benchmarks/requirements-fedjax.txt
  XLA_FLAGS=--xla_force_host_platform_device_count=8 .venv/bin/python \
      benchmarks/compare_fedjax.py --fedjax_python=.venv-fedjax/bin/python \
      --cohort_sizes=10,50 --repeats=2 --json=docs/bench_fedjax.json

Workload (both sides): FedAvg, the EMNIST CNN (62 classes), client SGD lr 0.1, B 20, E 1, server
SGD lr 1.0, 1,000 FEMNIST-shaped clients with the train sizes of the femnist_synthetic data
launch/benchmark.py trains on (its config's test_fraction, 0.2: lognormal, mean ~175; before
this was read from that config, FedJAX's clients were cut at 0.1, mean ~197). Both count client
examples as E * n_i per client.

FedJAX needs jax < 0.6, so the two sides run different jax versions. Each side also times the
same CNN trained centrally at B 20 on its own jax (one jitted step per batch, one device): the
ratio of those ceilings is what the newer jax and each stack's convolution give, and
`speedup_over_ceiling_ratio` is the part of the speedup fathom_sim adds beyond it. The sides
alternate which goes first, repeat by repeat.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


_NUM_CLIENTS = 1000


def benchmark_sizes(num_clients: int) -> list[int]:
  """The train clients' sizes of launch/benchmark.py's cnn task with `num_clients` clients:
  its config's femnist_synthetic data, so that both sides train the same workload."""
  from fathom_sim.config import base_config
  from fathom_sim.data import load_task
  data = base_config().data
  data.name, data.num_clients = 'femnist_synthetic', num_clients
  return [int(n) for n in load_task(data).train.num_examples]


def _run(argv: list[str], what: str, **kwargs) -> subprocess.CompletedProcess:
  """Runs one side; a failure ends the comparison with that side's own output."""
  try:
    p = subprocess.run(argv, capture_output=True, text=True, **kwargs)
  except OSError as e:
    sys.exit(f'{what} could not start ({argv[0]}: {e.strerror or e})')
  if p.returncode:
    how = (f'signal {-p.returncode}' if p.returncode < 0 else f'exit status {p.returncode}')
    sys.exit(f'{what} failed ({how}):\n{(p.stderr or p.stdout)[-3000:]}')
  return p


def _last_json(text: str) -> dict | list:
  return json.loads([line for line in text.splitlines() if line.startswith(('{', '['))][-1])


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('--fedjax_python', required=True)
  parser.add_argument('--cohort_sizes', default='10,50')
  parser.add_argument('--repeats', type=int, default=2)
  parser.add_argument('--rounds', type=int, default=3)
  parser.add_argument('--fedjax_backend', default='jit', choices=['jit', 'pmap'])
  parser.add_argument('--json', default=None)
  args = parser.parse_args()

  sizes = benchmark_sizes(_NUM_CLIENTS)
  results = []
  with tempfile.TemporaryDirectory() as tmp:
    sizes_file = os.path.join(tmp, 'sizes.json')
    with open(sizes_file, 'w') as f:
      json.dump(sizes, f)
    for repeat in range(args.repeats):
      for cohort in [int(c) for c in args.cohort_sizes.split(',')]:
        fedjax_env = dict(os.environ)
        fedjax_env.pop('XLA_FLAGS', None)  # FedJAX's jit backend trains on one device
        if args.fedjax_backend == 'pmap':
          fedjax_env['XLA_FLAGS'] = '--xla_force_host_platform_device_count=2'
        ours_file = os.path.join(tmp, 'ours.json')

        def run_fedjax():
          p = _run([args.fedjax_python, os.path.join(ROOT, 'benchmarks', 'fedjax_fedavg.py'),
                    f'--sizes={sizes_file}', f'--cohort={cohort}', f'--rounds={args.rounds}',
                    f'--backend={args.fedjax_backend}', '--centralized'], 'fedjax_fedavg.py',
                   env=fedjax_env)
          return _last_json(p.stdout)

        def run_ours():
          _run([sys.executable, os.path.join(ROOT, 'launch', 'benchmark.py'), '--tasks=cnn',
                f'--num_clients={_NUM_CLIENTS}', f'--cohort_sizes={cohort}',
                f'--rounds={args.rounds}', f'--json={ours_file}'],
               'launch/benchmark.py')
          with open(ours_file) as f:
            return json.load(f)[0]

        # Each side goes first in every other repeat: the machine's speed drifts, and a side
        # always run second would always meet a warmer (or more throttled) machine.
        if repeat % 2 == 0:
          fedjax, ours = run_fedjax(), run_ours()
        else:
          ours, fedjax = run_ours(), run_fedjax()
        if ours['rounds_recompiled']:
          print(f'  ({ours["rounds_recompiled"]} of our measured rounds compiled and were left '
                'out of the rate; a larger --rounds measures more)', flush=True)
        speedup = ours['epoch_examples_per_s'] / fedjax['examples_per_s']
        # Each stack's centralized training of the same model at B 20 on its own jax: their
        # ratio is what the newer jax (and each model's convolution) gives either simulator,
        # and the speedup over it is what fathom_sim adds.
        ceilings = ours['centralized_examples_per_s'] / fedjax['centralized']['median']
        row = {'repeat': repeat, 'cohort_size': cohort,
               # the clients both sides trained (FedJAX's from the benchmark's config)
               'num_clients': len(sizes), 'mean_client_examples': statistics.fmean(sizes),
               'fedjax_examples_per_s': fedjax['examples_per_s'],
               'fathom_sim_examples_per_s': ours['epoch_examples_per_s'],
               'speedup': speedup,
               'fedjax_centralized_examples_per_s': fedjax['centralized']['median'],
               'fathom_sim_centralized_examples_per_s': ours['centralized_examples_per_s'],
               'ceiling_ratio': ceilings, 'speedup_over_ceiling_ratio': speedup / ceilings,
               'order': 'fedjax first' if repeat % 2 == 0 else 'fathom_sim first',
               'fathom_sim': ours, 'fedjax': fedjax}
        results.append(row)
        print(f'repeat {repeat} cohort {cohort:4d}: FedJAX ({args.fedjax_backend}) '
              f'{fedjax["examples_per_s"]:8.1f} ex/s | fathom_sim '
              f'{ours["epoch_examples_per_s"]:8.1f} ex/s ({ours["local_loop"]} loop, '
              f'{ours["devices"]} devices) | x{speedup:.2f}; centralized '
              f'{fedjax["centralized"]["median"]:.1f} (jax {fedjax["jax"]}) vs '
              f'{ours["centralized_examples_per_s"]:.1f} (jax {ours["jax"]}) ex/s: '
              f'x{ceilings:.2f}, so x{speedup / ceilings:.2f} beyond it', flush=True)
        if args.json:
          with open(args.json, 'w') as f:
            json.dump(results, f, indent=2)
  for cohort in sorted({r['cohort_size'] for r in results}):
    s = [r['speedup'] for r in results if r['cohort_size'] == cohort]
    n = [r['speedup_over_ceiling_ratio'] for r in results if r['cohort_size'] == cohort]
    print(f'cohort {cohort}: speedup median {statistics.median(s):.2f} over {len(s)} repeats; '
          f'beyond the two stacks\' centralized ratio, median {statistics.median(n):.2f}')


if __name__ == '__main__':
  main()

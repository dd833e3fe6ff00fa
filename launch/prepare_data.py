r"""Converts public federated dataset files into the prepared layout the simulator reads.

  python launch/prepare_data.py --format=fedjax_sqlite --task=emnist --source=DIR --out=data/femnist
  python launch/prepare_data.py --format=stackexchange_xml --task=stackoverflow \
      --source=beer.stackexchange.Posts.xml --out=data/beer

Prints a summary (clients, examples, client-size quantiles per split). Bad files, flags or
--out end the conversion with one line naming the file and what is accepted, exit status 2
(before the input is read where they can be known then), and nothing is left at --out; a
full disk ends it with one line naming the file, exit status 1.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402

from fathom_sim.data.prepare import SEQUENCE_LENGTH, TEST_FRACTION, VOCAB_SIZE  # noqa: E402
from launch import cli  # noqa: E402

_SOURCE = flags.DEFINE_string('source', None, 'Input: a file, a directory, or (FedJAX) a '
                              'comma-separated list of .sqlite files.')
_OUT = flags.DEFINE_string('out', None, 'Output directory (must not exist, or be empty).')
_FORMAT = flags.DEFINE_enum('format', None, ['fedjax_sqlite', 'tff_sqlite', 'leaf_json',
                                             'stackexchange_xml'], 'Format of --source.')
_TASK = flags.DEFINE_enum('task', None, ['emnist', 'stackoverflow'], 'What the files hold.')
_VOCAB = flags.DEFINE_string('vocab', '', 'Stack Overflow: word-count file (most frequent first);'
                             ' empty = the most frequent words of the train split.')
_VOCAB_SIZE = flags.DEFINE_integer('vocab_size', VOCAB_SIZE,
                                   'Stack Overflow: words in the vocabulary.')
_LENGTH = flags.DEFINE_integer('sequence_length', SEQUENCE_LENGTH,
                               'Stack Overflow: tokens per example.')
_SPLIT_DATE = flags.DEFINE_string('split_date', '', 'Posts.xml: posts from this date (YYYY-MM-DD) '
                                  'on are the test split; empty = the last test_fraction.')
_TEST_FRACTION = flags.DEFINE_float('test_fraction', TEST_FRACTION, 'Posts.xml: share of posts '
                                    '(latest first) in the test split when --split_date is '
                                    'empty.')


def summary_lines(meta: dict, out: str) -> list[str]:
  import numpy as np
  lines = [f'prepared {meta["task"]} from {meta["format"]} {meta["source"]} -> {out}']
  for split in meta['splits']:
    with np.load(os.path.join(out, f'clients-{split}.npz')) as f:
      n = f['num_examples']
    q = np.percentile(n, [0, 10, 50, 90, 100]) if len(n) else [0] * 5
    lines.append(f'  {split}: {len(n)} clients, {int(n.sum())} examples; examples per client '
                 f'min {q[0]:.0f}, p10 {q[1]:.0f}, median {q[2]:.0f}, p90 {q[3]:.0f}, '
                 f'max {q[4]:.0f}')
  size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(out) for f in fs)
  extra = (f'; vocabulary {meta["vocab_size"]} words ({meta["num_classes"]} ids, from '
           f'{meta["vocab_source"]})' if 'vocab_size' in meta else '')
  lines.append(f'  {meta["num_classes"]} classes{extra}; {size / 2**20:.1f} MiB on disk')
  return lines


def _left_at_out() -> str:
  done = os.path.exists(os.path.join(_OUT.value, 'meta.json'))  # renamed in already
  return f'{"the dataset was written to" if done else "nothing was left at"} --out {_OUT.value!r}'


def main(argv):
  cli.no_arguments(argv)
  from fathom_sim.errors import exit_status

  def job():
    try:  # (prepare refuses a bad --out before it reads the input, which may take hours)
      # Inside the try: a SIGTERM during the import (a second) is said as one during the work.
      cli.terminate_as_interrupt()
      from fathom_sim.data.prepare import prepare
      # A flag given at its default is given all the same: refused where it does not apply.
      given = {flag.name: flag.value for flag in (_VOCAB_SIZE, _LENGTH, _TEST_FRACTION)
               if flag.present}
      meta = prepare(_SOURCE.value, _OUT.value, fmt=_FORMAT.value, task=_TASK.value,
                     vocab_path=_VOCAB.value, vocab_size=given.get('vocab_size'),
                     sequence_length=given.get('sequence_length'), split_date=_SPLIT_DATE.value,
                     test_fraction=given.get('test_fraction'))
      print('\n'.join(summary_lines(meta, _OUT.value)))
    except KeyboardInterrupt as e:  # Ctrl-C or SIGTERM (run_or_exit's words are a training run's)
      cli.fail(f'interrupted; {_left_at_out()}', exit_status(e))
    except MemoryError as e:  # (run_or_exit's words are a training run's config's)
      said = f' ({e})' if str(e) else ''
      cli.fail(f'the host ran out of memory preparing --source {_SOURCE.value!r}{said}: e.g. a '
               'client or file larger than this machine holds, or a damaged file that claims '
               f'one; {_left_at_out()}', exit_status(e))

  cli.run_or_exit(job)


if __name__ == '__main__':
  flags.mark_flags_as_required(['source', 'out', 'format', 'task'])
  app.run(main, flags_parser=cli.parse_flags_or_exit)

"""Tasks read from prepared datasets (see tfds_store): FEMNIST and Stack Overflow."""

from __future__ import annotations

import os

import numpy as np

from fathom_sim.data.byo import DataError
from fathom_sim.data.federated import Task
from fathom_sim.errors import tilde_left

# data.name -> (prepared task kind, how to get it)
HOW_TO_GET = {
    'femnist': ('emnist',
                'curl -LO https://storage.googleapis.com/gresearch/fedjax/emnist/'
                'federated_emnist_train.sqlite (and ..._test.sqlite) into DIR, then '
                'python launch/prepare_data.py --format=fedjax_sqlite --task=emnist '
                '--source=DIR --out={path}'),
    'stackoverflow': ('stackoverflow',
                      'curl -LO https://storage.googleapis.com/gresearch/fedjax/stackoverflow/'
                      'stackoverflow_{{train,held_out,test}}.sqlite and curl -LO '
                      'https://storage.googleapis.com/gresearch/fedjax/stackoverflow/'
                      'stackoverflow.word_count into DIR, then python launch/prepare_data.py '
                      '--format=fedjax_sqlite --task=stackoverflow --source=DIR '
                      '--vocab=DIR/stackoverflow.word_count --out={path}'),
}


def _prepare_flags(folder: str, kind: str) -> tuple[str, str] | None:
  """(format, prepare_data.py's flags but --out) for a public copy of task `kind` downloaded
  into `folder`, if it holds one."""
  names = set(os.listdir(folder))
  tff = {'emnist': 'emnist_all.sqlite', 'stackoverflow': 'stackoverflow.sqlite'}[kind]
  fedjax = {'emnist': 'federated_emnist_', 'stackoverflow': 'stackoverflow_'}[kind]
  posts = sorted(n for n in names if n.endswith('Posts.xml'))
  if tff in names:
    fmt, source = 'tff_sqlite', os.path.join(folder, tff)
  elif any(n.startswith(fedjax) and n.endswith('.sqlite') for n in names):
    fmt, source = 'fedjax_sqlite', folder
  elif kind == 'emnist' and ({'train.json', 'test.json'} <= names or {'train', 'test'} <= names):
    fmt, source = 'leaf_json', folder
  elif kind == 'stackoverflow' and posts:
    fmt, source = 'stackexchange_xml', os.path.join(folder, posts[0])
  else:
    return None
  flags = f'--format={fmt} --task={kind} --source={source}'
  # The published vocabulary, where it was downloaded too (else one is built from train).
  if kind == 'stackoverflow' and fmt != 'stackexchange_xml' and (
      'stackoverflow.word_count' in names):
    flags += f' --vocab={os.path.join(folder, "stackoverflow.word_count")}'
  return fmt, flags


def load_prepared(name: str, data_dir: str) -> Task:
  """The `name` task ('femnist' | 'stackoverflow') from the prepared dataset at `data_dir`."""
  # TFDS is imported here, not with the package: runs on generated data need none of it.
  from fathom_sim.data.tfds_store import PreparedClientDataset, read_meta
  kind, how = HOW_TO_GET[name]
  if os.path.isfile(data_dir):
    raise DataError(f'data.data_dir {data_dir!r} is a file; give the folder that '
                    f'launch/prepare_data.py wrote (README: Real datasets)')
  tilde = None if os.path.exists(data_dir) else tilde_left(data_dir, '--config.data.data_dir',
                                                          made=False)
  if tilde:  # (the way to make it named next would be refused: a --out of ~/...)
    raise DataError(f'data.data_dir {data_dir!r}: no such folder{tilde}')
  if not os.path.lexists(os.path.join(data_dir, 'meta.json')):  # (one that is there but
    # unreadable, a folder say, is read_meta's to say)
    # prepare_data.py writes into a new or empty folder only: not beside downloads
    taken = os.path.isdir(data_dir) and bool(os.listdir(data_dir))
    out = os.path.normpath(data_dir) + '_prepared' if taken else data_dir
    then = f', and give data.data_dir={out}' if taken else ''
    found = _prepare_flags(data_dir, kind) if taken else None
    # (`out` is never parsed as a template: a folder may hold braces.)
    how = (f'from the {found[0]} files there, python launch/prepare_data.py {found[1]} '
           f'--out={out}' if found else how.format(path=out))
    raise DataError(f'data.data_dir {data_dir!r}: no prepared {name} dataset there (no '
                    f'meta.json); to make it: {how}{then} (README: Real datasets, for the '
                    'other formats prepare_data.py reads)')
  meta = read_meta(data_dir)
  if meta.get('task') != kind:
    raise DataError(f'data.data_dir {data_dir!r} holds a prepared {meta.get("task")} dataset; '
                    f'data.name={name} needs a {kind} one')
  train, test = PreparedClientDataset(data_dir, 'train'), PreparedClientDataset(data_dir, 'test')
  # What the task's model reads, per example: a dataset written otherwise (14x14 images, say)
  # trained without a word, or failed in the first round's program.
  length = meta.get('sequence_length')
  want = ({'x': ((28, 28), 'f'), 'y': ((), 'iu')} if kind == 'emnist' else
          {'x': ((length,), 'iu'), 'y': ((length,), 'iu')})
  found = {k: (shape, dtype.name) for k, (shape, dtype) in sorted(train.feature_specs.items())}
  if set(found) != set(want) or any(
      found[k][0] != shape or np.dtype(found[k][1]).kind not in kinds
      for k, (shape, kinds) in want.items()):
    need = ', '.join(f'{k} {shape} of {"float" if kinds == "f" else "integer"}s'
                     for k, (shape, kinds) in want.items())
    raise DataError(f'data.data_dir {data_dir!r}: its examples are {found}; the {name} task '
                    f'reads {need} per example; prepare it again with launch/prepare_data.py')
  return Task(name, train, test, int(meta['num_classes']))

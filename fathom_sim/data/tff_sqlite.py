"""TensorFlow Federated's SQLite files (emnist_all.sqlite, stackoverflow.sqlite, after lzma -d).

Tables `examples(split_name, client_id, serialized_example_proto)` and
`client_metadata(client_id, split_name, num_examples)`; every example is a serialized
tf.train.Example (EMNIST: `pixels` 784 floats and `label` int64; Stack Overflow: `tokens`,
`title`, `tags`, `type`, `creation_date` bytes and `score` int64).
"""

from __future__ import annotations

import os
import sqlite3
from typing import Iterator

from fathom_sim.data import sniff
from fathom_sim.data.byo import DataError
from fathom_sim.data.fedjax_sqlite import TABLE as FEDJAX_TABLE
from fathom_sim.data.fedjax_sqlite import read_only_uri, read_rows, table_names
from fathom_sim.data.tf_example import parse_example

REQUIRED = {'examples': ('split_name', 'client_id', 'serialized_example_proto'),
            'client_metadata': ('client_id', 'split_name', 'num_examples')}


class TffSqlite:
  """Clients of one split of a TFF SQLite file, in client_id order, examples in rowid order."""

  def __init__(self, path: str):
    self.path = path
    if not os.path.isfile(path):
      raise sniff.not_a_file(path, 'a TFF .sqlite file, after lzma -d')
    try:
      self._db = sqlite3.connect(read_only_uri(path), uri=True)
      for table, columns in REQUIRED.items():
        found = {row[1] for row in self._db.execute(f'PRAGMA table_info({table})')}
        if not set(columns) <= found:
          other = ('; it is a FedJAX .sqlite file: give --format=fedjax_sqlite' if
                   table_names(self._db) >= {FEDJAX_TABLE} else '')
          raise DataError(f'{path}: table {table} with columns {columns} not found; expected a '
                          f'TFF .sqlite file{other}')
    except sqlite3.DatabaseError as e:
      raise sniff.unreadable_sqlite(path, e, 'a TFF file ending in .lzma must be decompressed '
                                    'with lzma -d first') from None

  def splits(self) -> list[str]:
    return [r[0] for r in read_rows(
        self.path, self._db, 'SELECT DISTINCT split_name FROM client_metadata ORDER BY split_name')]

  def clients(self, split: str) -> Iterator[tuple[str, list[dict]]]:
    """(client id, parsed examples) per client of `split`."""
    expected = dict(read_rows(
        self.path, self._db,
        'SELECT client_id, num_examples FROM client_metadata WHERE split_name = ?', (split,)))
    # One sorted pass (SQLite sorts on disk when it must) instead of one scan per client.
    rows = read_rows(self.path, self._db, 'SELECT client_id, serialized_example_proto FROM '
                     'examples WHERE split_name = ? ORDER BY client_id, rowid', (split,))
    current, examples, seen = None, [], set()
    for client_id, blob in rows:
      if client_id != current:
        if current is not None:
          yield self._checked(current, examples, expected, split)
        current, examples = client_id, []
        seen.add(client_id)
      try:
        examples.append(parse_example(bytes(blob)))
      except (ValueError, TypeError, UnicodeDecodeError) as e:
        raise DataError(f'{self.path}: client {client_id} ({split}): corrupt example proto '
                        f'({e}); expected a serialized tf.train.Example') from None
    if current is not None:
      yield self._checked(current, examples, expected, split)
    # A client of client_metadata with no examples would otherwise vanish without a word. (Found
    # once the split is read: a query first would read the whole file once more. One listed
    # with 0 examples agrees with the file, and is never sampled: it is left out.)
    absent = sorted((c for c, n in expected.items() if c not in seen and n), key=str)
    if absent:
      raise DataError(f'{self.path}: client_metadata lists {len(absent)} client(s) of split '
                      f'{split!r} with no rows in examples (first: client {absent[0]}, '
                      f'{expected[absent[0]]} examples listed)')

  def _checked(self, client_id, examples, expected, split) -> tuple[str, list[dict]]:
    if client_id not in expected:
      raise DataError(f'{self.path}: client {client_id} has {len(examples)} example(s) in split '
                      f'{split!r} but client_metadata does not list it')
    if expected[client_id] != len(examples):
      raise DataError(f'{self.path}: client {client_id} has {len(examples)} examples but '
                      f'client_metadata says {expected[client_id]}')
    return str(client_id), examples

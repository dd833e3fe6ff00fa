"""FedJAX's SQLite files of per-client examples (federated_emnist_*.sqlite, stackoverflow_*.sqlite).

One table `federated_data(client_id BLOB PRIMARY KEY, data BLOB, num_examples INTEGER)`, clients
in rowid order. `client_id` is 16 hex characters, ':' and the original id; `data` is
zlib(msgpack({feature: array})) where arrays travel as msgpack extension types: code 1 a numpy
array [shape, dtype name, C-order bytes], code 2 a complex number [real, imag], code 3 a numpy
scalar packed as a 0-d array [(), dtype name, bytes], code 4 an object array of bytes
[shape, [bytes, ...]].
"""

from __future__ import annotations

import os
import pathlib
import sqlite3
import zlib
from typing import Iterator

import msgpack
import numpy as np

from fathom_sim.data import sniff
from fathom_sim.data.byo import DataError

TABLE = 'federated_data'
COLUMNS = ('client_id', 'data', 'num_examples')


def _ext_hook(code: int, payload: bytes):
  if code == 1:
    shape, dtype, buffer = msgpack.unpackb(payload)
    return np.frombuffer(buffer, dtype=np.dtype(dtype)).reshape(shape)
  if code == 2:
    real, imag = msgpack.unpackb(payload)
    return complex(real, imag)
  if code == 3:
    shape, dtype, buffer = msgpack.unpackb(payload)
    return np.frombuffer(buffer, dtype=np.dtype(dtype)).reshape(shape)[()]
  if code == 4:
    shape, items = msgpack.unpackb(payload)
    array = np.empty(len(items), dtype=object)
    array[:] = items
    return array.reshape(shape)
  raise ValueError(f'unknown msgpack extension type {code}')


def decode(blob: bytes) -> dict:
  """One client's features: zlib-compressed msgpack with numpy extension types."""
  value = msgpack.unpackb(zlib.decompress(blob), ext_hook=_ext_hook, raw=False)
  if not isinstance(value, dict):
    raise ValueError(f'expected a dict of features, got {type(value).__name__}')
  return value


def original_id(client_id: bytes | str) -> str:
  """'0123456789abcdef:f0123_45' -> 'f0123_45' (the prefix only spreads ids over shards)."""
  text = client_id.decode('utf-8', errors='replace') if isinstance(client_id, bytes) else client_id
  head, sep, tail = text.partition(':')
  return tail if sep and len(head) == 16 else text


def read_only_uri(path: str) -> str:
  """An SQLite URI that opens `path` read-only: percent-escaped, since a '#', '?' or '%' in a
  folder's name would otherwise cut the path (and open, even create, another file)."""
  return pathlib.Path(path).resolve().as_uri() + '?mode=ro'


def table_names(db: sqlite3.Connection) -> set[str]:
  """The tables of an open SQLite database."""
  return {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}


def read_rows(path: str, db: sqlite3.Connection, query: str, args: tuple = ()) -> Iterator[tuple]:
  """The rows of `query`, as a stream. A damaged page met on the way (the file's start read
  well, so the header checks passed) raises DataError naming the file, not sqlite3's
  traceback, however far into the conversion it comes."""
  try:
    yield from db.execute(query, args)
  except sqlite3.DatabaseError as e:
    raise DataError(f'{path}: damaged past its start ({e}); download the file again') from None


class FedjaxSqlite:
  """Clients of one FedJAX SQLite file, streamed in rowid order."""

  def __init__(self, path: str):
    self.path = path
    if not os.path.isfile(path):
      raise sniff.not_a_file(path, 'a FedJAX .sqlite file')
    try:
      self._db = sqlite3.connect(read_only_uri(path), uri=True)
      columns = [row[1] for row in self._db.execute(f'PRAGMA table_info({TABLE})')]
    except sqlite3.DatabaseError as e:
      raise sniff.unreadable_sqlite(path, e) from None
    if tuple(columns[:3]) != COLUMNS:
      tables = table_names(self._db)
      other = ('; it is a TFF .sqlite file: give --format=tff_sqlite'
               if tables >= {'examples', 'client_metadata'} else '')
      raise DataError(f'{path}: no table {TABLE}{COLUMNS} (found tables {sorted(tables)}); '
                      f'expected a FedJAX .sqlite file{other}')

  def clients(self) -> Iterator[tuple[str, dict]]:
    """(original client id, features) per client, in rowid order."""
    rows = read_rows(self.path, self._db,
                     f'SELECT client_id, data, num_examples FROM {TABLE} ORDER BY rowid')
    for client_id, blob, count in rows:
      cid = original_id(client_id)
      try:
        features = decode(blob)
      except Exception as e:  # zlib.error, msgpack errors, bad shapes: all mean a corrupt blob
        raise DataError(f'{self.path}: client {cid}: corrupt data blob ({type(e).__name__}: '
                        f'{e}); expected zlib-compressed msgpack of numpy arrays') from None
      sizes = {k: len(v) for k, v in features.items() if isinstance(v, np.ndarray) and v.ndim}
      if any(n != count for n in sizes.values()):
        raise DataError(f'{self.path}: client {cid}: num_examples is {count} but its features '
                        f'have {sizes} rows')
      yield cid, features

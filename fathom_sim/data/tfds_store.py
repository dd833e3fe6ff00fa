"""The one on-disk layout of prepared federated datasets, built and read through TFDS.

A prepared dataset is a directory:

  meta.json               task, source, format, num_classes, vocabulary size, splits (written last:
                          its presence means the directory is complete)
  clients-<split>.npz     client_ids [C] and num_examples [C] int64, in record order
  vocab.txt               (Stack Overflow) the vocabulary, one word per line
  tfds/federated_clients/1.0.0/   a TFDS dataset in array_record files: ONE RECORD PER CLIENT
                          (client_id, x [n_i, ...], y [n_i, ...]), in client order

One record per client makes "read a client" a single random access by index: reading a cohort
touches only its clients' records, and nothing else of the dataset is held in memory. TFDS
would shuffle on write; the builder disables that and keys records by client index.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Iterable, Iterator

import numpy as np
import tensorflow_datasets as tfds

from fathom_sim.data.byo import DataError

LAYOUT_VERSION = 1
BUILDER_DIR = os.path.join('tfds', 'federated_clients', '1.0.0')
_KEY_SPACE = 2**128  # TFDS sorts records by key and spreads them over buckets by key / 2**128


class FederatedClients(tfds.core.GeneratorBasedBuilder):
  """Clients as records: feature shapes and the split generators are given at construction."""

  VERSION = tfds.core.Version('1.0.0')
  code_path = None  # skips a package-resource lookup that needs the optional importlib_resources

  def __init__(self, *, feature_specs: dict | None = None, generators: dict | None = None,
               **kwargs):
    self._feature_specs = feature_specs or {}
    self._generators = generators or {}
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    features = {'client_id': tfds.features.Text()}
    for name, (shape, dtype) in self._feature_specs.items():
      # Raw bytes: decoding a client is one frombuffer, not a per-value proto list.
      features[name] = tfds.features.Tensor(shape=(None,) + tuple(shape), dtype=np.dtype(dtype),
                                            encoding=tfds.features.Encoding.BYTES)
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(features),
                                 disable_shuffling=True)

  def _split_generators(self, dl_manager):
    del dl_manager
    return dict(self._generators)

  def _generate_examples(self):
    raise NotImplementedError  # the generators are passed in


def write(out: str, splits: dict[str, tuple[int, Iterable[tuple[str, dict]]]],
          feature_specs: dict[str, tuple[tuple, str]], meta: dict,
          extra_files: dict[str, str] | None = None) -> dict:
  """Builds a prepared dataset at `out` (which must not exist) from per-split client streams.

  splits: name -> (number of clients, iterator of (client id, {feature: [n_i, ...]})).
  extra_files: name -> text, written beside meta.json (e.g. the vocabulary).
  Returns meta, completed with the per-split counts. Nothing is left at `out` on failure.
  """
  if os.path.exists(os.path.join(out, 'meta.json')) or (
      os.path.isdir(out) and os.listdir(out)):
    raise DataError(f'--out {out!r} already exists and is not empty; choose a new directory '
                    '(nothing was overwritten)')
  partial = out.rstrip('/') + '.partial'
  shutil.rmtree(partial, ignore_errors=True)
  os.makedirs(partial)
  try:
    index: dict[str, tuple[list, list]] = {}

    def keyed(split: str, expected: int, clients: Iterable[tuple[str, dict]]) -> Iterator:
      ids, counts = index.setdefault(split, ([], []))
      stride = _KEY_SPACE // max(expected, 1)
      for i, (cid, features) in enumerate(clients):
        if i >= expected:
          raise DataError(f'{meta.get("source")}: more clients in split {split} than the '
                          f'{expected} counted')
        ids.append(cid)
        counts.append(len(features['y']))
        yield i * stride, {'client_id': cid, **features}

    generators = {s: keyed(s, n, it) for s, (n, it) in splits.items()}
    tfds.disable_progress_bar()
    builder = FederatedClients(data_dir=os.path.join(partial, 'tfds'), file_format='array_record',
                               feature_specs=feature_specs, generators=generators)
    builder.download_and_prepare(file_format='array_record')
    shutil.rmtree(os.path.join(partial, 'tfds', 'downloads'), ignore_errors=True)
    meta = dict(meta, layout_version=LAYOUT_VERSION, splits={})
    for split, (ids, counts) in index.items():
      np.savez(os.path.join(partial, f'clients-{split}.npz'), client_ids=np.array(ids, dtype=str),
               num_examples=np.array(counts, np.int64))
      meta['splits'][split] = {'clients': len(ids), 'examples': int(np.sum(counts))}
    for name, text in (extra_files or {}).items():
      with open(os.path.join(partial, name), 'w', encoding='utf-8') as f:
        f.write(text)
    with open(os.path.join(partial, 'meta.json'), 'w', encoding='utf-8') as f:
      json.dump(meta, f, indent=2)
    if os.path.isdir(out):
      os.rmdir(out)
    os.rename(partial, out)
  except BaseException:
    shutil.rmtree(partial, ignore_errors=True)
    raise
  return meta


def read_meta(data_dir: str) -> dict:
  path = os.path.join(data_dir, 'meta.json')
  try:
    with open(path, encoding='utf-8') as f:
      meta = json.load(f)
  except (OSError, json.JSONDecodeError) as e:
    raise DataError(f'{data_dir}: not a prepared dataset ({e}); run launch/prepare_data.py '
                    'to make one') from None
  if meta.get('layout_version') != LAYOUT_VERSION:
    raise DataError(f'{data_dir}: prepared with layout version {meta.get("layout_version")}, '
                    f'this code reads version {LAYOUT_VERSION}; prepare it again')
  return meta


class PreparedClientDataset:
  """A split of a prepared dataset, read lazily: `client(i)` reads record i and nothing else."""

  def __init__(self, data_dir: str, split: str):
    self.data_dir, self.split = data_dir, split
    try:
      with np.load(os.path.join(data_dir, f'clients-{split}.npz')) as f:
        self._ids, self._counts = f['client_ids'], f['num_examples']
      builder = tfds.builder_from_directory(os.path.join(data_dir, BUILDER_DIR))
      self._source = builder.as_data_source(split)
    except (OSError, ValueError, KeyError) as e:
      raise DataError(f'{data_dir}: split {split!r} of the prepared dataset cannot be read '
                      f'({e}); prepare it again with launch/prepare_data.py') from None
    if len(self._source) != len(self._ids):
      raise DataError(f'{data_dir}: split {split} has {len(self._source)} records but '
                      f'clients-{split}.npz lists {len(self._ids)} clients; prepare it again')

  @property
  def client_ids(self) -> np.ndarray:
    return self._ids

  @property
  def num_examples(self) -> np.ndarray:
    return self._counts

  def client(self, index: int) -> dict:
    record = self._source[int(index)]
    cid = record['client_id']
    cid = cid.decode('utf-8') if isinstance(cid, bytes) else str(cid)
    if cid != self._ids[index]:
      raise DataError(f'{self.data_dir}: record {index} of split {self.split} is client {cid}, '
                      f'the index says {self._ids[index]}; prepare the dataset again')
    out = {}
    for name in ('x', 'y'):
      a = np.asarray(record[name])
      out[name] = a.astype(np.int32) if np.issubdtype(a.dtype, np.integer) else a
    return out

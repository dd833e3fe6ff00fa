"""The one on-disk layout of prepared federated datasets, built and read through TFDS.

A prepared dataset is a directory:

  meta.json               task, source, format, num_classes, vocabulary size, splits (written last:
                          its presence means the directory is complete)
  clients-<split>.npz     client_ids [C] and num_examples [C] int64, in record order
  vocab.txt               (Stack Overflow) the vocabulary, one word per line
  tfds/federated_clients/1.0.0/   a TFDS dataset in array_record files: ONE RECORD PER CLIENT
                          (client_id, x [n_i, ...], y [n_i, ...]), in client order

One record per client makes "read a client" a single random access by index: reading a cohort
touches only its clients' records, and nothing else of the dataset is held in memory.

The records are serialized by TFDS feature connectors and described by TFDS metadata
(`tfds.folder_dataset.write_metadata`), so `tfds.builder_from_directory(...).as_data_source`
reads them, without TensorFlow. They are written here in client order rather than by a
`GeneratorBasedBuilder`: that writer shuffles (or, with shuffling disabled, sorts by key) and,
past 1 GB per split, spills through `tf.io.gfile`, which needs TensorFlow.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from typing import Iterable

import numpy as np
import tensorflow_datasets as tfds
from array_record.python import array_record_module

from fathom_sim.data.byo import DataError
from fathom_sim.data.vocab import TEXT_VERSION
from fathom_sim.errors import MOUNT_HINT, first_line, is_url

LAYOUT_VERSION = 1
DATASET = 'federated_clients'
BUILDER_DIR = os.path.join('tfds', DATASET, '1.0.0')
PARTIAL_MARK = '.fathom_sim_partial'  # marks <out>.partial as a conversion's own scratch folder
SHARD_BYTES = 256 << 20  # new array_record file past this many bytes of records


def features_dict(feature_specs: dict[str, tuple[tuple, str]]) -> tfds.features.FeaturesDict:
  """client_id plus per-client tensors [n_i, *shape] of each feature (raw bytes on disk)."""
  features = {'client_id': tfds.features.Text()}
  for name, (shape, dtype) in feature_specs.items():
    # Raw bytes: decoding a client is one frombuffer, not a per-value proto list.
    features[name] = tfds.features.Tensor(shape=(None,) + tuple(shape), dtype=np.dtype(dtype),
                                          encoding=tfds.features.Encoding.BYTES)
  return tfds.features.FeaturesDict(features)


def _write_split(folder: str, split: str, features, clients: Iterable[tuple[str, dict]]):
  """Writes one split's shards; returns (SplitInfo, client ids, example counts)."""
  ids, counts, lengths, shards = [], [], [], []
  total = shard_bytes = 0
  writer = None
  for cid, example in clients:
    if writer is None:
      shards.append(os.path.join(folder, f'{split}.shard{len(shards)}.tmp'))
      writer = array_record_module.ArrayRecordWriter(shards[-1], 'group_size:1')
      lengths.append(0)
      shard_bytes = 0
    record = features.serialize_example({'client_id': cid, **example})
    writer.write(record)
    ids.append(cid)
    counts.append(len(example['y']))
    lengths[-1] += 1
    shard_bytes += len(record)
    total += len(record)
    if shard_bytes >= SHARD_BYTES:
      writer.close()
      writer = None
  if writer is not None:
    writer.close()
  for i, path in enumerate(shards):
    os.rename(path, os.path.join(folder, f'{DATASET}-{split}.array_record-'
                                         f'{i:05d}-of-{len(shards):05d}'))
  info = tfds.core.SplitInfo(name=split, shard_lengths=lengths, num_bytes=total)
  return info, ids, counts


def check_out(out: str) -> None:
  """Raises DataError unless `out` can take a new prepared dataset: missing, or an empty
  directory. Called by write(), and by the command line before a long conversion starts."""
  if is_url(out):
    raise DataError(f'--out {out!r} is a URL, and datasets are written through the filesystem; '
                    f'{MOUNT_HINT}')
  if os.path.exists(out) and not os.path.isdir(out):
    raise DataError(f'--out {out!r} is a file, not a directory; choose a new directory '
                    '(nothing was overwritten)')
  if os.path.exists(os.path.join(out, 'meta.json')) or (
      os.path.isdir(out) and os.listdir(out)):
    raise DataError(f'--out {out!r} already exists and is not empty; choose a new directory '
                    '(nothing was overwritten)')


def write(out: str, splits: dict[str, Iterable[tuple[str, dict]]],
          feature_specs: dict[str, tuple[tuple, str]], meta: dict,
          extra_files: dict[str, str] | None = None) -> dict:
  """Builds a prepared dataset at `out` (which must not exist) from per-split client streams.

  splits: name -> iterator of (client id, {feature: [n_i, ...]}), in the order to keep.
  extra_files: name -> text, written beside meta.json (e.g. the vocabulary).
  Returns meta, completed with the per-split counts. Nothing is left at `out` on failure.
  """
  check_out(out)
  partial = out.rstrip('/') + '.partial'
  if os.path.exists(partial):
    # A conversion killed before it could clean up leaves its scratch folder, marked as ours;
    # a folder of that name without the mark is someone's, and stays.
    if not os.path.exists(os.path.join(partial, PARTIAL_MARK)):
      raise DataError(f'--out {out!r}: {partial!r} exists and was not made by a conversion; '
                      'move it away (the conversion writes there first)')
    shutil.rmtree(partial)
  folder = os.path.join(partial, BUILDER_DIR)
  try:
    os.makedirs(folder)
    open(os.path.join(partial, PARTIAL_MARK), 'w').close()
  except OSError as e:
    raise DataError(f'--out {out!r}: cannot write {partial!r} there ({e.strerror or e}); '
                    'choose a directory that can be made or written') from None
  try:
    features = features_dict(feature_specs)
    meta = dict(meta, layout_version=LAYOUT_VERSION, splits={})
    infos = []
    for split, clients in splits.items():
      info, ids, counts = _write_split(folder, split, features, clients)
      if not ids:  # TFDS's metadata writer refused it with a traceback naming no file
        raise DataError(f'{meta.get("source", "the source")}: its {split} split holds no '
                        'clients; a prepared dataset needs clients in each split it has '
                        f'(nothing was written to --out {out!r})')
      infos.append(info)
      np.savez(os.path.join(partial, f'clients-{split}.npz'), client_ids=np.array(ids, dtype=str),
               num_examples=np.array(counts, np.int64))
      meta['splits'][split] = {'clients': len(ids), 'examples': int(np.sum(counts))}
    tfds.folder_dataset.write_metadata(data_dir=folder, features=features, split_infos=infos,
                                       check_data=False)
    for name, text in (extra_files or {}).items():
      with open(os.path.join(partial, name), 'w', encoding='utf-8') as f:
        f.write(text)
    with open(os.path.join(partial, 'meta.json'), 'w', encoding='utf-8') as f:
      json.dump(meta, f, indent=2)
    os.remove(os.path.join(partial, PARTIAL_MARK))
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
  if not isinstance(meta, dict):
    raise DataError(f'{path}: not the meta.json prepare_data.py writes (a JSON object); '
                    'prepare the dataset again')
  if meta.get('layout_version') != LAYOUT_VERSION:
    raise DataError(f'{data_dir}: prepared with layout version {meta.get("layout_version")}, '
                    f'this code reads version {LAYOUT_VERSION}; prepare it again')
  if meta.get('format') == 'stackexchange_xml' and meta.get('text_version') != TEXT_VERSION:
    raise DataError(f'{data_dir}: its Posts.xml was split into sentences and words by an older '
                    f'reader (text version {meta.get("text_version")}; this code reads posts as '
                    f'version {TEXT_VERSION}, which gives other examples); prepare it again from '
                    f'{meta.get("source")} into a new or empty folder with launch/prepare_data.py '
                    '--format=stackexchange_xml')
  num_classes = meta.get('num_classes')
  if not (isinstance(num_classes, int) and not isinstance(num_classes, bool)
          and num_classes > 0):
    raise DataError(f'{path}: not the meta.json prepare_data.py writes (a JSON object with a '
                    'positive integer "num_classes", "task" and "layout_version"); prepare the '
                    'dataset again')
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
  def identity(self) -> dict:
    """What decides the examples beyond the clients' ids and sizes (federated.fingerprint):
    meta.json's fields but the paths it was prepared from, and the vocabulary's digest."""
    meta = read_meta(self.data_dir)
    identity = {k: v for k, v in meta.items() if k not in ('source', 'vocab_source')}
    vocab = os.path.join(self.data_dir, 'vocab.txt')
    if os.path.exists(vocab):
      with open(vocab, 'rb') as f:
        identity['vocab_sha256'] = hashlib.sha256(f.read()).hexdigest()
    return identity

  @property
  def num_examples(self) -> np.ndarray:
    return self._counts

  def client(self, index: int) -> dict:
    try:
      record = self._source[int(index)]
    except (RuntimeError, OSError, ValueError) as e:  # array_record's errors for a bad shard
      whose = (f' (client {self._ids[int(index)]})' if 0 <= int(index) < len(self._ids)
               else '')
      raise DataError(f'{self.data_dir}: record {index} of split {self.split}{whose} cannot be '
                      f'read ({first_line(e)}); the files under {BUILDER_DIR} are damaged or '
                      'missing, prepare the dataset again') from None
    cid = record['client_id']
    cid = cid.decode('utf-8') if isinstance(cid, bytes) else str(cid)
    if cid != self._ids[index]:
      raise DataError(f'{self.data_dir}: record {index} of split {self.split} is client {cid}, '
                      f'the index says {self._ids[index]}; prepare the dataset again')
    out = {}
    for name in ('x', 'y'):
      a = np.asarray(record[name])
      out[name] = a.astype(np.int32) if np.issubdtype(a.dtype, np.integer) else a
    # Rounds are planned from the index's counts: a record that disagrees would otherwise
    # fail later as a shape error deep in planning.
    if not len(out['x']) == len(out['y']) == self._counts[index]:
      raise DataError(f'{self.data_dir}: record {index} of split {self.split} (client {cid}) '
                      f'holds {len(out["x"])} inputs and {len(out["y"])} targets, the index '
                      f'says {int(self._counts[index])} examples; prepare the dataset again')
    return out

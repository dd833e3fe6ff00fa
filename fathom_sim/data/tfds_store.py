"""The one on-disk layout of prepared federated datasets, built and read through TFDS.

A prepared dataset is a directory:

  meta.json               task, source, format, num_classes, vocabulary size, splits (each
                          one's clients, examples and the sha256 of its records; written last:
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

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import zipfile
import zlib
from typing import Callable, Iterable, Iterator

import numpy as np
import tensorflow_datasets as tfds
from array_record.python import array_record_module
from google.protobuf import json_format
from tensorflow_datasets.core.example_serializer import ExampleSerializer

from fathom_sim.data.byo import DataError
from fathom_sim.data.vocab import TEXT_VERSION
from fathom_sim.errors import (LOCK_HELD_ELSEWHERE, MOUNT_HINT, OutputError, file_for_folder,
                               first_line, is_url, tilde_left)

LAYOUT_VERSION = 1
DATASET = 'federated_clients'
BUILDER_DIR = os.path.join('tfds', DATASET, '1.0.0')
PARTIAL_MARK = '.fathom_sim_partial'  # marks <out>.partial as a conversion's own scratch folder
SCRATCH_DIR = 'scratch'  # a conversion's working files in <out>.partial, dropped before the rename
SHARD_BYTES = 256 << 20  # new array_record file past this many bytes of records


def features_dict(feature_specs: dict[str, tuple[tuple, str]]) -> tfds.features.FeaturesDict:
  """client_id plus per-client tensors [n_i, *shape] of each feature (raw bytes on disk)."""
  features = {'client_id': tfds.features.Text()}
  for name, (shape, dtype) in feature_specs.items():
    # Raw bytes: decoding a client is one frombuffer, not a per-value proto list.
    features[name] = tfds.features.Tensor(shape=(None,) + tuple(shape), dtype=np.dtype(dtype),
                                          encoding=tfds.features.Encoding.BYTES)
  return tfds.features.FeaturesDict(features)


def _check_client_id(source: str, split: str, cid: str, seen: set) -> None:
  """An id the index and the record both keep as given, once per split: one ending in NUL
  was cut in the index (numpy's str arrays drop trailing NULs), so every run then found
  record and index disagreeing; a lone surrogate was a TFDS traceback."""
  try:
    cid.encode('utf-8')
  except UnicodeEncodeError:
    problem = 'is not valid Unicode (a lone surrogate)'
  else:
    problem = ('holds a NUL character' if '\0' in cid else
               'names two clients' if cid in seen else None)
  if problem:
    raise DataError(f'{source}: client id {cid!r} of its {split} split {problem}; client ids '
                    'must be distinct text without NUL characters')
  seen.add(cid)


def _write_split(folder: str, split: str, features, clients: Iterable[tuple[str, dict]],
                 writing: Callable, source: str) -> tuple:
  """Writes one split's shards; returns (SplitInfo, client ids, example counts, the sha256 of
  its records in order). `writing` wraps each write: a full disk is the output's fault, not
  the input's."""
  ids, counts, lengths, shards = [], [], [], []
  seen: set[str] = set()
  digest = hashlib.sha256()
  total = shard_bytes = 0
  writer = None
  serializer = ExampleSerializer(features.get_serialized_info())
  for cid, example in clients:
    _check_client_id(source, split, cid, seen)
    if writer is None:
      shards.append(os.path.join(folder, f'{split}.shard{len(shards)}.tmp'))
      with writing(shards[-1]):
        writer = array_record_module.ArrayRecordWriter(shards[-1], 'group_size:1')
      lengths.append(0)
      shard_bytes = 0
    # Deterministic: a proto's map is otherwise serialized in an order that varies from one
    # process to the next, and the same input prepared twice gave other bytes.
    record = serializer.get_tf_example(
        features.encode_example({'client_id': cid, **example})).SerializeToString(
            deterministic=True)
    with writing(shards[-1]):
      writer.write(record)
    digest.update(len(record).to_bytes(8, 'little'))
    digest.update(record)
    ids.append(cid)
    counts.append(len(example['y']))
    lengths[-1] += 1
    shard_bytes += len(record)
    total += len(record)
    if shard_bytes >= SHARD_BYTES:
      with writing(shards[-1]):
        writer.close()
      writer = None
  if writer is not None:
    with writing(shards[-1]):
      writer.close()
  for i, path in enumerate(shards):
    with writing(path):
      os.rename(path, os.path.join(folder, f'{DATASET}-{split}.array_record-'
                                           f'{i:05d}-of-{len(shards):05d}'))
  info = tfds.core.SplitInfo(name=split, shard_lengths=lengths, num_bytes=total)
  return info, ids, counts, digest.hexdigest()


def _save_npz(path: str, **arrays: np.ndarray) -> None:
  """np.savez's file (np.load reads it), with a fixed date on its entries: np.savez stamps
  each with the time it was written."""
  with zipfile.ZipFile(path, 'w') as z:
    for name, array in arrays.items():
      entry = zipfile.ZipInfo(f'{name}.npy', date_time=(1980, 1, 1, 0, 0, 0))
      with z.open(entry, 'w', force_zip64=True) as f:
        np.lib.format.write_array(f, np.asanyarray(array), allow_pickle=False)


def _partial(out: str) -> str:
  """The scratch folder a conversion builds `out` in, beside it (then renamed at once)."""
  return os.path.abspath(out) + '.partial'


def _held_elsewhere(mark: str) -> bool:
  """Whether a live conversion holds `mark` locked (flock; the system drops it when the
  process ends, however it ends)."""
  try:
    fd = os.open(mark, os.O_RDONLY)
  except OSError:
    return False
  try:
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    return False
  except OSError as e:
    return e.errno in LOCK_HELD_ELSEWHERE
  finally:
    os.close(fd)


def check_out(out: str) -> None:
  """Raises DataError unless `out` can take a new prepared dataset: missing, or an empty
  directory that can be replaced by the one built beside it, with no other conversion writing
  it. Called again when the conversion claims `out` (claimed)."""
  if is_url(out):
    raise DataError(f'--out {out!r} is a URL, and datasets are written through the filesystem; '
                    f'{MOUNT_HINT}')
  tilde = tilde_left(out, '--out', made=True)
  if tilde:
    raise DataError(tilde)
  target = os.path.abspath(out)
  # The dataset is built beside `out` and renamed into place (so a half-written one is never
  # at `out`): a link, a mount point or the current directory cannot be replaced so. They
  # were found after the whole conversion, in a traceback.
  odd = ('a symbolic link' if os.path.islink(target) else
         'a mount point' if os.path.ismount(target) else
         'the current directory' if target == os.getcwd() else None)
  if odd:
    raise DataError(f'--out {out!r} is {odd}, which the conversion cannot replace with the '
                    'folder it builds beside it; give a new folder inside it, e.g. '
                    f'--out={os.path.join(out, "prepared")}')
  if os.path.exists(target) and not os.path.isdir(target):
    raise DataError(f'--out {out!r} is a file, not a directory; choose a new directory '
                    '(nothing was overwritten)')
  refusal = file_for_folder(out, '--out', 'the prepared dataset')
  if refusal:  # (a file above it)
    raise DataError(refusal)
  if os.path.isdir(target) and os.listdir(target):
    raise DataError(f'--out {out!r} already exists and is not empty; choose a new directory '
                    '(nothing was overwritten)')
  partial = _partial(out)
  mark = os.path.join(partial, PARTIAL_MARK)
  if os.path.exists(partial):
    # A conversion killed before it could clean up leaves its scratch folder, marked as ours;
    # a folder of that name without the mark is someone's, and stays.
    if not os.path.exists(mark):
      raise DataError(f'--out {out!r}: {partial!r} exists and was not made by a conversion; '
                      'move it away (the conversion writes there first)')
    if _held_elsewhere(mark):
      raise DataError(f'--out {out!r}: another conversion is writing it now (in {partial!r}); '
                      'wait for it to finish, or choose another --out')


@contextlib.contextmanager
def _parent_locked(path: str) -> Iterator[None]:
  """Holds a flock on the folder that holds `path` while the body runs (milliseconds): the
  conversions that write beside each other check, clear and claim scratch folders one at a
  time. A filesystem without locks runs it unguarded."""
  try:
    fd = os.open(os.path.dirname(path), os.O_RDONLY)
  except OSError:
    fd = None
  try:
    if fd is not None:
      try:
        fcntl.flock(fd, fcntl.LOCK_EX)
      except OSError:
        pass
    yield
  finally:
    if fd is not None:
      os.close(fd)


@contextlib.contextmanager
def claimed(out: str) -> Iterator[str]:
  """Makes <out>.partial, this conversion's scratch folder, marked and locked as its own, and
  yields it; removes it if the body raises. What check_out refuses, and a place where the
  folder cannot be made, raise DataError here: before a conversion reads its input, which may
  take hours. A scratch folder a killed conversion left is replaced."""
  check_out(out)
  partial = _partial(out)

  def cannot(e: OSError) -> DataError:
    return DataError(f'--out {out!r}: cannot write {partial!r} there ({e.strerror or e}); '
                     'choose a directory that can be made or written')

  try:
    os.makedirs(os.path.dirname(partial), exist_ok=True)
  except OSError as e:
    raise cannot(e) from None
  # Checked again and claimed under the parent's lock: another conversion's folder could
  # otherwise be seen unlocked in the moment between its making and its locking, and cleared.
  stale = None
  with _parent_locked(partial):
    check_out(out)
    if os.path.exists(partial):  # check_out: a killed conversion's; deleted after the lock
      stale = f'{partial}.stale-{os.getpid()}'
      try:
        os.rename(partial, stale)
      except OSError as e:
        raise cannot(e) from None
    try:
      os.mkdir(partial)
    except FileExistsError:  # another conversion, where the filesystem has no locks
      raise DataError(f'--out {out!r}: another conversion started writing it just now (in '
                      f'{partial!r}); wait for it to finish, or choose another --out') from None
    except OSError as e:
      raise cannot(e) from None
    try:
      fd = os.open(os.path.join(partial, PARTIAL_MARK), os.O_CREAT | os.O_WRONLY, 0o644)
    except OSError as e:
      os.rmdir(partial)  # this process's, empty: unmarked, it would refuse every later run
      raise cannot(e) from None
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
      pass  # a filesystem without locks: unguarded, as a run's workdir is
  if stale is not None:
    shutil.rmtree(stale, ignore_errors=True)
  try:
    yield partial
  except BaseException:
    shutil.rmtree(partial, ignore_errors=True)
    raise
  finally:
    os.close(fd)


def write(out: str, splits: dict[str, Iterable[tuple[str, dict]]],
          feature_specs: dict[str, tuple[tuple, str]], meta: dict,
          extra_files: dict[str, str] | None = None, partial: str | None = None,
          before_rename: Callable[[], None] | None = None) -> dict:
  """Builds a prepared dataset at `out` (which must not exist) from per-split client streams.

  splits: name -> iterator of (client id, {feature: [n_i, ...]}), in the order to keep.
  extra_files: name -> text, written beside meta.json (e.g. the vocabulary).
  partial: the scratch folder claimed(out) yielded (claimed here if not given).
  before_rename: called once every split is written, before SCRATCH_DIR is removed (to close
  the files the conversion holds there).
  Returns meta, completed with the per-split counts. Nothing is left at `out` on failure; a
  write that fails (a full disk) raises OutputError naming the file.
  """
  if partial is None:
    with claimed(out) as partial:
      return write(out, splits, feature_specs, meta, extra_files, partial, before_rename)

  @contextlib.contextmanager
  def writing(path: str) -> Iterator[None]:
    try:
      yield
    except (OSError, RuntimeError) as e:  # array_record's writer raises RuntimeError
      raise OutputError(f'--out {out!r}: {path} cannot be written ({first_line(e)}); nothing '
                        'is left at --out') from None

  folder = os.path.join(partial, BUILDER_DIR)
  with writing(folder):
    os.makedirs(folder)
  features = features_dict(feature_specs)
  meta = dict(meta, layout_version=LAYOUT_VERSION, splits={})
  infos = []
  for split, clients in splits.items():
    info, ids, counts, records_sha256 = _write_split(folder, split, features, clients, writing,
                                                     meta.get('source', 'the source'))
    if not ids:  # TFDS's metadata writer refused it with a traceback naming no file
      raise DataError(f'{meta.get("source", "the source")}: its {split} split holds no '
                      'clients; a prepared dataset needs clients in each split it has '
                      f'(nothing was written to --out {out!r})')
    if not sum(counts):  # (prepared, then refused by the run: cohort_size at most 0)
      raise DataError(f'{meta.get("source", "the source")}: the {len(ids)} client(s) of its '
                      f'{split} split hold no examples; a prepared dataset needs examples in '
                      f'each split it has (nothing was written to --out {out!r})')
    infos.append(info)
    index = os.path.join(partial, f'clients-{split}.npz')
    with writing(index):
      _save_npz(index, client_ids=np.array(ids, dtype=str),
                num_examples=np.array(counts, np.int64))
    meta['splits'][split] = {'clients': len(ids), 'examples': int(np.sum(counts)),
                             'records_sha256': records_sha256}
  with writing(folder):
    tfds.folder_dataset.write_metadata(data_dir=folder, features=features, split_infos=infos,
                                       check_data=False)
  for name, text in {**(extra_files or {}), 'meta.json': json.dumps(meta, indent=2)}.items():
    with writing(os.path.join(partial, name)), open(os.path.join(partial, name), 'w',
                                                    encoding='utf-8') as f:
      f.write(text)  # meta.json last: its presence means the folder is complete
  if before_rename is not None:
    before_rename()
  target = os.path.abspath(out)
  with writing(target):
    shutil.rmtree(os.path.join(partial, SCRATCH_DIR), ignore_errors=True)
    if os.path.isdir(target):
      os.rmdir(target)
    os.rename(partial, target)
    # The mark goes after the rename: a conversion killed between the two left a complete
    # folder beside `out`, unmarked, which the next one refused as someone else's.
    os.remove(os.path.join(target, PARTIAL_MARK))
  return meta


def read_meta(data_dir: str) -> dict:
  path = os.path.join(data_dir, 'meta.json')
  try:
    with open(path, encoding='utf-8') as f:
      meta = json.load(f)
  except (OSError, ValueError) as e:  # (ValueError: not JSON, or not UTF-8)
    raise DataError(f'{data_dir}: not a prepared dataset ({first_line(e)}); run '
                    'launch/prepare_data.py to make one') from None
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
  splits = meta.get('splits', {})  # (its counts are checked against each split's index)
  if not (isinstance(splits, dict) and all(isinstance(v, dict) for v in splits.values())):
    raise DataError(f'{path}: not the meta.json prepare_data.py writes (its "splits" gives '
                    f'{json.dumps(splits)[:60]}, not each split\'s counts); prepare the dataset '
                    'again')
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
    self._meta = read_meta(data_dir)
    self._num_classes = self._meta['num_classes']
    index = os.path.join(data_dir, f'clients-{split}.npz')
    try:
      with np.load(index) as f:
        self._ids, self._counts = f['client_ids'], f['num_examples']
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile, zlib.error) as e:
      # (A cut or empty file: zipfile's or numpy's own errors, not OSError.)
      raise DataError(f'{index} cannot be read ({type(e).__name__}: {first_line(e)}); prepare '
                      'the dataset again with launch/prepare_data.py') from None
    self._check_index(index)
    try:
      builder = tfds.builder_from_directory(os.path.join(data_dir, BUILDER_DIR))
      self._source = builder.as_data_source(split)
      info = builder.info.splits[split]
      shards = list(zip(info.filenames, info.shard_lengths))
      # Per example: shape and dtype (the leading axis is the client's examples).
      self.feature_specs = {name: (tuple(f.shape[1:]), np.dtype(f.np_dtype))
                            for name, f in builder.info.features.items() if name != 'client_id'}
    except (OSError, ValueError, KeyError, json_format.ParseError) as e:  # (a cut JSON file
      # of TFDS's is protobuf's ParseError)
      raise DataError(f'{data_dir}: split {split!r} of the prepared dataset cannot be read '
                      f'({first_line(e)}); prepare it again with launch/prepare_data.py'
                      ) from None
    # Every shard is opened now (its footer: ms each): a missing or cut one was met only by
    # the round that first drew one of its clients, hours into a run.
    for name, expected in shards:
      path = os.path.join(data_dir, BUILDER_DIR, name)
      try:
        reader = array_record_module.ArrayRecordReader(path)
        try:
          found = reader.num_records()
        finally:
          reader.close()
      except (RuntimeError, OSError, ValueError) as e:
        found = f'unreadable: {first_line(e)}'
      if found != expected:
        raise DataError(f'{data_dir}: {name} of split {split} is damaged or missing (its '
                        f'records: {found}; the dataset lists {expected}); prepare the dataset '
                        'again with launch/prepare_data.py')
    if len(self._source) != len(self._ids):
      raise DataError(f'{data_dir}: split {split} has {len(self._source)} records but '
                      f'clients-{split}.npz lists {len(self._ids)} clients; prepare it again')

  def _check_index(self, index: str) -> None:
    """The clients' counts: one per client id, whole numbers >= 0, summing to the examples
    meta.json gives. Counts past the ids made sampling draw a client that is not there, hours
    into a run; fewer left the last clients never drawn."""
    ids, counts = self._ids, self._counts
    fine = (ids.ndim == 1 and counts.ndim == 1 and len(ids) == len(counts)
            and np.issubdtype(counts.dtype, np.integer) and not (counts < 0).any())
    # (A string array's `< 0` raises: the integer check comes first.)
    listed = self._meta.get('splits', {}).get(self.split) or {}  # (read_meta checked its kind)
    if fine and isinstance(listed.get('examples'), int):
      fine = int(counts.sum()) == listed['examples']
    if not fine:
      total = (f', summing to {counts.sum()}' if np.issubdtype(counts.dtype, np.number)
               else '')
      raise DataError(f'{index}: num_examples ({counts.dtype} {counts.shape}{total}) must be '
                      f'one count >= 0 per client id ({len(ids)}), summing to the '
                      f'{listed.get("examples", "?")} examples meta.json gives; prepare the '
                      'dataset again')

  @property
  def client_ids(self) -> np.ndarray:
    return self._ids

  @property
  def identity(self) -> dict:
    """What decides the examples beyond the clients' ids and sizes (federated.fingerprint):
    meta.json's fields but the paths it was prepared from and the records' digests (which are
    `examples_sha256`), and the vocabulary's digest."""
    identity = {k: v for k, v in self._meta.items() if k not in ('source', 'vocab_source')}
    if 'splits' in identity:
      identity['splits'] = {name: {k: v for k, v in split.items() if k != 'records_sha256'}
                            for name, split in identity['splits'].items()}
    vocab = os.path.join(self.data_dir, 'vocab.txt')
    if os.path.exists(vocab):
      with open(vocab, 'rb') as f:
        identity['vocab_sha256'] = hashlib.sha256(f.read()).hexdigest()
    return identity

  @property
  def examples_sha256(self) -> str | None:
    """The digest of this split's records as prepare_data.py wrote them (None: a dataset
    prepared before it was kept)."""
    return (self._meta.get('splits', {}).get(self.split) or {}).get('records_sha256')

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
      # prepare_data.py checks labels; a dataset written otherwise trained on with a label
      # past the classes gave a null loss every round, and exit status 0. Checked before the
      # cast to int32, which wraps one past it (2**32 + 3 read as 3). Integer inputs are token
      # ids (prepared images are float32), in range as the labels are.
      if (name == 'y' or np.issubdtype(a.dtype, np.integer)) and a.size and (
          a.min() < 0 or a.max() >= self._num_classes):
        bad = int(a.min()) if a.min() < 0 else int(a.max())
        what = 'target' if name == 'y' else 'input token id'
        raise DataError(f'{self.data_dir}: record {index} of split {self.split} (client {cid}) '
                        f'holds {what} {bad}, outside the {self._num_classes} classes its '
                        'meta.json gives; prepare the dataset again')
      out[name] = a.astype(np.int32) if np.issubdtype(a.dtype, np.integer) else a
    # Rounds are planned from the index's counts: a record that disagrees would otherwise
    # fail later as a shape error deep in planning.
    if not len(out['x']) == len(out['y']) == self._counts[index]:
      raise DataError(f'{self.data_dir}: record {index} of split {self.split} (client {cid}) '
                      f'holds {len(out["x"])} inputs and {len(out["y"])} targets, the index '
                      f'says {int(self._counts[index])} examples; prepare the dataset again')
    return out

"""Converting public dataset files into the prepared layout of `tfds_store` (see
launch/prepare_data.py for the command line).

Formats: FedJAX SQLite, TFF SQLite, LEAF JSON (FEMNIST) and Stack Exchange Posts.xml (Stack
Overflow-style next-word prediction from any site's dump). Every client is checked on the way:
bad files stop the conversion with one DataError naming the file, the client and what is
accepted, and nothing is left at the output path.
"""

from __future__ import annotations

import glob
import os
from typing import Callable, Iterable, Iterator

import numpy as np

from fathom_sim.data import sniff, tfds_store
from fathom_sim.data.byo import DataError
from fathom_sim.data.fedjax_sqlite import FedjaxSqlite
from fathom_sim.data.leaf import LeafJson, split_files
from fathom_sim.data.stackexchange import StackExchangeXml
from fathom_sim.data.tff_sqlite import TffSqlite
from fathom_sim.data.vocab import TEXT_VERSION, ids_dtype, read_word_counts, vocabulary_from
from fathom_sim.errors import MOUNT_HINT, is_url, tilde_left

TASKS = ('emnist', 'stackoverflow')
FORMATS = ('fedjax_sqlite', 'tff_sqlite', 'leaf_json', 'stackexchange_xml')
EMNIST_CLASSES = 62
SPLIT_NAMES = {'train': 'train', 'test': 'test', 'held_out': 'held_out', 'heldout': 'held_out'}
# TFF's emnist_all.sqlite holds all_train / all_test (the 62 classes, FEMNIST) and
# digits_only_train / digits_only_test (10 classes, another task: not read).
TFF_SPLIT_NAMES = {'emnist': {'all_train': 'train', 'all_test': 'test', 'train': 'train',
                              'test': 'test'},
                   'stackoverflow': SPLIT_NAMES}


def emnist_client(where: str, cid: str, pixels, labels) -> dict:
  """x float32 [n, 28, 28] and y int32 [n] of one writer, or a DataError saying what is wrong."""
  x = np.asarray(pixels)
  y = np.asarray(labels)
  if not np.issubdtype(x.dtype, np.floating) and not np.issubdtype(x.dtype, np.integer):
    raise DataError(f'{where}: client {cid}: pixels are {x.dtype}; EMNIST pixels are numbers')
  if (x.ndim == 2 and x.shape[1] == 784) or x.shape == (0,):  # (0,): a writer with no images
    x = x.reshape(-1, 28, 28)
  if x.ndim != 3 or x.shape[1:] != (28, 28):
    raise DataError(f'{where}: client {cid}: pixels have shape {x.shape}; EMNIST clients need '
                    '[N, 28, 28] (or 784 values per example)')
  if y.ndim != 1 or len(y) != len(x):
    raise DataError(f'{where}: client {cid}: {len(x)} images but labels of shape {y.shape}')
  # Every public copy (FedJAX, TFF, LEAF) holds floats in [0, 1]; 0..255 values would train
  # a model built for those at 255x the input scale, silently.
  if x.size and not np.isfinite(x).all():  # (it was said as values to divide by 255)
    raise DataError(f'{where}: client {cid}: a pixel is NaN or infinite (a null in the file, '
                    'or a damaged value); EMNIST pixels are numbers in [0, 1]')
  if x.size and not (np.min(x) >= 0 and np.max(x) <= 1):
    raise DataError(f'{where}: client {cid}: pixel values span [{np.min(x):g}, {np.max(x):g}]; '
                    'EMNIST pixels are in [0, 1] in the public files (divide 0..255 values '
                    'by 255)')
  if len(y) and not (np.issubdtype(y.dtype, np.integer) or np.issubdtype(y.dtype, np.floating)):
    raise DataError(f'{where}: client {cid}: labels are {y.dtype} (e.g. {y[0]!r}); EMNIST-62 '
                    f'labels are integers 0..{EMNIST_CLASSES - 1}')
  if len(y) and (not np.issubdtype(y.dtype, np.integer) or y.min() < 0
                 or y.max() >= EMNIST_CLASSES):
    bad = y[(y < 0) | (y >= EMNIST_CLASSES) | (y != np.round(y))][:1]
    raise DataError(f'{where}: client {cid}: label {bad[0] if len(bad) else y.dtype} out of '
                    f'range; EMNIST-62 labels are integers 0..{EMNIST_CLASSES - 1}')
  return {'x': x.astype(np.float32), 'y': y.astype(np.int32)}


class _Splits:
  """A source as {split: () -> iterator of (client id, raw client)}.

  A raw client is {'x', 'y'} for EMNIST and a list of sentences for Stack Overflow.
  """

  def __init__(self, expected: str):
    self.splits: dict[str, object] = {}
    self.close: Callable[[], None] = lambda: None  # once every split is read
    self.expected = expected  # how the format names its splits, for a source that lacks one
    self._named: dict[str, str] = {}
    self.passed_over: list[str] = []  # what the source holds that is not this task's split

  def add(self, split: str, clients, name: str) -> None:
    """Split `split` read from the source's `name` (a file, a table's split name)."""
    if split in self._named:
      raise DataError(f'both {self._named[split]} and {name} hold the {split} split; give a '
                      '--source with one of them')
    self._named[split] = name
    self.splits[split] = clients


def _fedjax(source: str, task: str) -> _Splits:
  # glob.escape: a '[' in the folder's name is a character, not a pattern.
  in_folder = sorted(glob.glob(os.path.join(glob.escape(source), '*.sqlite')))
  files = ([source] if os.path.isfile(source) else
           in_folder if os.path.isdir(source) else source.split(','))
  if os.path.isdir(source):
    # One download folder may hold both tasks' files (federated_emnist_*, stackoverflow_*).
    own = [f for f in files if task in os.path.basename(f).lower()]
    files = own or files
  out = _Splits(f'FedJAX files must end in _train.sqlite and _test.sqlite (and name the task, '
                f'{task}, when a folder holds both tasks\' files)')
  digits_only = []
  for path in files:
    stem = os.path.basename(path).rsplit('.', 1)[0]
    split = next((SPLIT_NAMES[s] for s in SPLIT_NAMES if stem.endswith('_' + s)), None)
    if split is None:
      out.passed_over.append(os.path.basename(path))
      continue
    if 'digitsonly' in stem.lower().replace('_', ''):
      digits_only.append(path)  # FedJAX's 10-class EMNIST: another task (as TFF's digits_only)
      continue
    reader = FedjaxSqlite(path)

    def clients(reader=reader):
      for cid, f in reader.clients():
        if task == 'emnist':
          missing = {'pixels', 'label'} - set(f)
          if missing:
            raise DataError(f'{reader.path}: client {cid} lacks {sorted(missing)}; FedJAX '
                            f'EMNIST clients have pixels and label (found {sorted(f)})')
          yield cid, emnist_client(reader.path, cid, f['pixels'], f['label'])
        else:
          if 'tokens' not in f:
            raise DataError(f'{reader.path}: client {cid} lacks tokens; FedJAX Stack '
                            f'Overflow clients have tokens, title, tags, ... (found {sorted(f)})')
          sentences = list(np.asarray(f['tokens']).reshape(-1))
          odd = next((s for s in sentences if not isinstance(s, (bytes, str))), None)
          if odd is not None:  # (words are split out of each sentence next)
            raise DataError(f'{reader.path}: client {cid}: tokens must hold sentences as '
                            f'bytes or strings, found {type(odd).__name__} {odd!r}')
          yield cid, sentences

    out.add(split, clients, path)
  if digits_only and not out.splits:
    raise DataError(f'{", ".join(digits_only)}: FedJAX\'s digits-only EMNIST (10 classes) is '
                    'not the FEMNIST task (62 classes); give federated_emnist_train.sqlite and '
                    'federated_emnist_test.sqlite')
  return out


def _tff(source: str, task: str) -> _Splits:
  reader = TffSqlite(source)
  names = TFF_SPLIT_NAMES[task]
  out = _Splits('TFF names its splits all_train and all_test in emnist_all.sqlite, train, '
                'heldout and test in stackoverflow.sqlite')
  for name in reader.splits():
    if name not in names:
      out.passed_over.append(f'split {name!r}')
      continue

    def clients(name=name):
      for cid, examples in reader.clients(name):
        if task == 'emnist':
          try:
            x = np.stack([np.asarray(e['pixels'], np.float32) for e in examples])
            y = np.concatenate([np.asarray(e['label']).reshape(-1) for e in examples])
          except (KeyError, ValueError) as err:
            raise DataError(f'{source}: client {cid}: EMNIST examples need pixels (784 floats) '
                            f'and label (one int64) ({type(err).__name__}: {err})') from None
          yield cid, emnist_client(source, cid, x, y)
        else:
          try:
            tokens = [e['tokens'] for e in examples]
          except KeyError as err:
            raise DataError(f'{source}: client {cid}: Stack Overflow examples need a tokens '
                            f'bytes feature ({err})') from None
          # TFF parses tokens as one string an example (FixedLenFeature((), tf.string)):
          # none was an empty sentence here, and several were joined without a word.
          odd = next((t for t in tokens if len(t) != 1 or not isinstance(t[0], bytes)), None)
          if odd is not None:
            held = f'{len(odd)} values' if len(odd) != 1 else f'a {type(odd[0]).__name__}'
            raise DataError(f'{source}: client {cid}: an example\'s tokens holds {held}; '
                            'TFF\'s Stack Overflow examples hold one string of space-separated '
                            'words')
          yield cid, [t[0] for t in tokens]

    out.add(names[name], clients, f'split {name!r}')
  return out


def _leaf(source: str, task: str) -> _Splits:
  if task != 'emnist':
    raise DataError(f'{source}: LEAF JSON is read for --task=emnist (FEMNIST) only')
  out = _Splits('LEAF keeps train and test in train/ and test/ folders, or train.json and '
                'test.json')
  for split, files in split_files(source).items():
    reader = LeafJson(files)

    def clients(reader=reader):
      for path, cid, f in reader.clients():
        yield cid, emnist_client(path, cid, f['x'], f['y'])

    out.splits[split] = clients
  return out


def _stackexchange(source: str, task: str, split_date: str, test_fraction: float,
                   partial: str) -> _Splits:
  if task != 'stackoverflow':
    raise DataError(f'{source}: a Posts.xml gives a --task=stackoverflow dataset only')
  # Its grouping table (about the dump's size) in the conversion's own scratch folder, not in
  # the system's temporary one: there a killed conversion left it for good (and it could fill
  # a small /tmp); here the next conversion clears it, and tfds_store.write drops it.
  scratch = os.path.join(partial, tfds_store.SCRATCH_DIR)
  os.mkdir(scratch)
  reader = StackExchangeXml(source, scratch, split_date, test_fraction)
  out = _Splits('a Posts.xml gives both splits')
  out.close = reader.close
  out.split_date = reader.split_date
  out.train_sentences = lambda: reader.sentences('train')
  for split in ('train', 'test'):
    out.splits[split] = lambda split=split: reader.clients(split)
  return out


def _sentences(clients: Iterable[tuple[str, list]]) -> Iterator:
  for _, sentences in clients:
    yield from sentences


# Stack Overflow's and Posts.xml's settings when not given (launch/prepare_data.py's defaults).
VOCAB_SIZE, SEQUENCE_LENGTH, TEST_FRACTION = 10000, 20, 0.2
# The paper cuts sentences at 20 tokens; 1024 leaves room to study longer ones, while 1e8 was
# taken and the process killed for memory.
MAX_SEQUENCE_LENGTH = 1024


def prepare(source: str, out: str, *, fmt: str, task: str, vocab_path: str = '',
            vocab_size: int | None = None, sequence_length: int | None = None,
            split_date: str = '', test_fraction: float | None = None) -> dict:
  """Converts `source` (format `fmt`) into a prepared `task` dataset at `out`; returns its meta.

  A setting left None is not given: VOCAB_SIZE, SEQUENCE_LENGTH or TEST_FRACTION where it
  applies. Settings given that do not apply to the format or task (their defaults included),
  and an `out` the dataset cannot be written to, raise DataError before the input is read."""
  if fmt not in FORMATS:
    raise DataError(f'--format must be one of {FORMATS}, got {fmt!r}')
  # Here, not in the command only: read_word_counts took a size of 0 as the whole file.
  if vocab_size is not None and vocab_size < 1:
    raise DataError(f'--vocab_size must be >= 1, got {vocab_size}')
  if sequence_length is not None and not 2 <= sequence_length <= MAX_SEQUENCE_LENGTH:
    raise DataError(f'--sequence_length must be in [2, {MAX_SEQUENCE_LENGTH}] (20 in the paper), '
                    f'got {sequence_length}')
  if test_fraction is not None and not 0 < test_fraction < 1:
    raise DataError(f'--test_fraction must be in (0, 1), got {test_fraction}')
  if task not in TASKS:
    raise DataError(f'--task must be one of {TASKS}, got {task!r}')
  # FedJAX's files may be listed with commas; a path that exists is taken whole, commas and all.
  parts = source.split(',') if fmt == 'fedjax_sqlite' and not os.path.exists(source) else [source]
  absent = [p for p in parts if not os.path.exists(p)]
  if absent == [source]:
    hint = (f'; for a URL, {MOUNT_HINT}' if is_url(source) else
            tilde_left(source, '--source', made=False) or '')
    raise DataError(f'--source {source!r}: no such file or directory{hint}')
  if absent:
    raise DataError(f'--source {source!r}: no such file: {", ".join(absent)}')
  if (split_date or test_fraction is not None) and fmt != 'stackexchange_xml':
    # the other formats ship their own splits
    given = '--split_date' if split_date else '--test_fraction'
    raise DataError(f'{given} applies to --format=stackexchange_xml only; {fmt} files '
                    'hold their own train and test splits')
  if split_date and test_fraction is not None:
    raise DataError(f'--split_date ({split_date}) and --test_fraction ({test_fraction:g}) each '
                    'choose the test split: give one of them')
  if task == 'emnist':
    given = [flag for flag, value in (('--vocab', vocab_path or None), ('--vocab_size', vocab_size),
                                      ('--sequence_length', sequence_length))
             if value is not None]
    if given:  # a mixed-up command was converted without a word, the flags unread
      raise DataError(f'{", ".join(given)} appl{"ies" if len(given) == 1 else "y"} to '
                      '--task=stackoverflow only; EMNIST images have no vocabulary or length')
  vocab_size = VOCAB_SIZE if vocab_size is None else vocab_size
  sequence_length = SEQUENCE_LENGTH if sequence_length is None else sequence_length
  test_fraction = TEST_FRACTION if test_fraction is None else test_fraction
  if vocab_path and not os.path.isfile(vocab_path):
    raise DataError(f'--vocab {vocab_path!r}: {sniff.not_file(vocab_path)} (expected a '
                    'word-count file, most frequent word first)'
                    + (tilde_left(vocab_path, '--vocab', made=False) or ''))
  with tfds_store.claimed(out) as partial:
    return _convert(source, out, partial, fmt=fmt, task=task, vocab_path=vocab_path,
                    vocab_size=vocab_size, sequence_length=sequence_length,
                    split_date=split_date, test_fraction=test_fraction)


def _convert(source: str, out: str, partial: str, *, fmt: str, task: str, vocab_path: str,
             vocab_size: int, sequence_length: int, split_date: str,
             test_fraction: float) -> dict:
  """prepare's conversion, once its arguments are checked and `partial` claimed."""
  # A word-count file is read before the input (a bad one was found after all of it).
  given_vocab = read_word_counts(vocab_path, vocab_size) if vocab_path else None
  if fmt == 'fedjax_sqlite':
    src = _fedjax(source, task)
  elif fmt == 'tff_sqlite':
    src = _tff(source, task)
  elif fmt == 'leaf_json':
    src = _leaf(source, task)
  else:
    src = _stackexchange(source, task, split_date, test_fraction, partial)
  order = ('train', 'held_out', 'test')
  src.splits = {s: src.splits[s] for s in sorted(src.splits, key=order.index)}
  missing = [s for s in ('train', 'test') if s not in src.splits]
  if missing:
    passed = f'; passed over: {", ".join(src.passed_over)}' if src.passed_over else ''
    raise DataError(f'{source}: no {" or ".join(missing)} split found for --task={task} (found '
                    f'{sorted(src.splits)}{passed}); {src.expected}')
  meta = {'task': task, 'format': fmt, 'source': os.path.abspath(source)}
  if fmt == 'stackexchange_xml':
    meta['text_version'] = TEXT_VERSION
  if task == 'emnist':
    specs = {'x': ((28, 28), 'float32'), 'y': ((), 'int32')}
    streams = {s: make() for s, make in src.splits.items()}
    meta['num_classes'] = EMNIST_CLASSES
  else:
    if given_vocab is not None:
      vocab = given_vocab
    else:
      train = src.train_sentences() if hasattr(src, 'train_sentences') else _sentences(
          src.splits['train']())
      vocab = vocabulary_from(train, vocab_size)
    dtype = ids_dtype(len(vocab.words)).name
    specs = {'x': ((sequence_length,), dtype), 'y': ((sequence_length,), dtype)}

    def encoded(clients, vocab=vocab):
      for cid, sentences in clients:
        x, y = vocab.encode(sentences, sequence_length)
        yield cid, {'x': x, 'y': y}

    streams = {s: encoded(make()) for s, make in src.splits.items()}
    meta.update(num_classes=vocab.num_ids, vocab_size=len(vocab.words),
                vocab_source=os.path.abspath(vocab_path) if vocab_path else 'train split',
                sequence_length=sequence_length)
    if hasattr(src, 'split_date'):
      meta['split_date'] = src.split_date
  extra = {'vocab.txt': '\n'.join(vocab.words) + '\n'} if task == 'stackoverflow' else {}
  return tfds_store.write(out, streams, specs, meta, extra, partial=partial,
                          before_rename=src.close)


"""Bring your own data: per-client arrays in `.npz` files (the format is in the README).

A file holds `x` [N, ...] (inputs), `y` [N] (integer labels 0..num_classes-1) and
`num_examples` [C] (how many consecutive rows each client owns, in order; they add up to N),
optionally `client_ids` [C] (strings). Either one `.npz` with train clients only (each client's
test examples are then held out from its own, `test_fraction` of them), or a directory with
`train.npz` and `test.npz` in that layout.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import zipfile
import zlib

import numpy as np
from absl import logging

from fathom_sim import metrics
from fathom_sim.data.federated import ArrayClientDataset, Task
from fathom_sim.errors import InputError, tilde_left


class DataError(InputError):
  """Unusable data; the message names the file and what is accepted."""


class DatasetError(DataError):
  """A dataset unusable as a whole (missing, unreadable when opened, or not fitting the
  model), found before any round: every run on the same data and model fails alike."""


def _read(path: str) -> dict:
  try:
    with open(path, 'rb') as f:
      head = f.read(6)
  except OSError as e:
    raise DataError(f'{path}: not a readable .npz file ({e.strerror or e})') from None
  # np.load takes any file that is neither zip nor .npy for a pickle, and says so.
  if head == b'\x93NUMPY':
    raise DataError(f'{path}: a single .npy array, not an .npz; save the arrays x, y and '
                    'num_examples together with np.savez')
  if not head.startswith(b'PK'):
    raise DataError(f'{path}: not an .npz file (it starts with {head!r}); an .npz is the zip '
                    'of arrays that np.savez writes')
  try:
    with np.load(path, allow_pickle=False) as f:
      return {k: f[k] for k in f.files}
  except (OSError, ValueError, zipfile.BadZipFile, EOFError, zlib.error) as e:  # (zlib: a
    # np.savez_compressed member whose deflated bytes are damaged)
    raise DataError(f'{path}: not a readable .npz file ({e})') from None
  except MemoryError as e:  # (also a damaged header claiming a shape past the file's bytes:
    # it was said as a config asking for too much memory, the file unnamed)
    raise DataError(f'{path}: its arrays do not fit in the host\'s memory ({e}); the file is '
                    'read whole: check its shapes, or split it into smaller files') from None


def _dataset(path: str, arrays: dict) -> ArrayClientDataset:
  missing = [k for k in ('x', 'y', 'num_examples') if k not in arrays]
  if missing:
    raise DataError(f'{path}: missing array(s) {missing}; a client file needs x [N, ...], '
                    f'y [N] and num_examples [C] (client_ids [C] optional)')
  x, y, counts = arrays['x'], arrays['y'], arrays['num_examples']
  if (not (np.issubdtype(x.dtype, np.number) or x.dtype == np.bool_)
      or np.issubdtype(x.dtype, np.complexfloating)):  # (the cast to float32 drops i silently)
    raise DataError(f'{path}: x must hold real numbers (float inputs, or integer token ids), '
                    f'got {x.dtype}')
  if x.ndim == 0:
    raise DataError(f'{path}: x must be an array [N, ...] with a row per example, got a '
                    'single number')
  if counts.ndim != 1 or not np.issubdtype(counts.dtype, np.integer) or (counts < 0).any():
    raise DataError(f'{path}: num_examples must be a 1-D array of non-negative integers')
  if not np.issubdtype(y.dtype, np.integer) or y.ndim != 1:
    raise DataError(f'{path}: y must be a 1-D integer label array, got {y.dtype} {y.shape}')
  # (Each count at most N first: int64 counts summing past 2^63 wrapped round to N, and the
  # file's rows were given to clients it does not hold.)
  if len(x) != len(y) or (len(counts) and counts.max() > len(y)) or counts.sum() != len(y):
    total = sum(int(c) for c in counts)  # (exact: said, not computed with)
    raise DataError(f'{path}: x has {len(x)} rows, y {len(y)}, num_examples adds up to '
                    f'{total}; all three must agree')
  if len(y) and y.min() < 0:
    raise DataError(f'{path}: labels must be >= 0, found {y.min()}')
  if len(y) and y.max() >= 2**31 - 1:  # held as int32 from here on, and so are the classes
    # (the largest label + 1): it would wrap, silently
    raise DataError(f'{path}: labels must be below 2^31 - 1, found {y.max()}')
  ids = arrays.get('client_ids')
  if ids is None:
    ids = np.array([f'client_{i:06d}' for i in range(len(counts))])
  else:
    ids = _client_ids(path, ids, len(counts))
  if np.issubdtype(x.dtype, np.floating):
    _check_float32_range(path, x)
    x = x.astype(np.float32)
  offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
  _check_non_finite(path, x, offsets, ids)
  return ArrayClientDataset({'x': x, 'y': y.astype(np.int32)}, offsets, ids,
                            examples_sha256=_arrays_sha256(arrays))


def _arrays_sha256(arrays: dict) -> str:
  """The digest of the arrays a run reads from a file, as the file holds them (federated.
  fingerprint): a file written again with other examples is other data, whatever its sizes."""
  digest = hashlib.sha256()
  for name in ('x', 'y', 'num_examples', 'client_ids'):
    if name in arrays:
      digest.update(name.encode())
      metrics.update_digest(digest, arrays[name])
  return digest.hexdigest()


def _check_float32_range(path: str, x: np.ndarray) -> None:
  """Refuses finite inputs past float32's range, where the simulator computes: the cast made
  them inf, and the run then said the file held NaN or inf inputs, which it did not."""
  if x.dtype.itemsize <= 4 or not x.size:
    return
  flat = x.reshape(-1)
  step = max(1, (64 << 20) // x.dtype.itemsize)  # 64 MB of scratch at a time
  top = 0.0
  for i in range(0, flat.size, step):
    chunk = flat[i:i + step]
    top = max(top, float(np.max(np.abs(chunk), where=np.isfinite(chunk), initial=0.0)))
  if top > float(np.finfo(np.float32).max):  # (as a float32, top would overflow)
    raise DataError(f'{path}: x holds values up to {top:.3g}, past float32\'s range (3.4e+38) '
                    'in which the simulator computes; scale them down')


def _check_non_finite(path: str, x: np.ndarray, offsets: np.ndarray, ids: np.ndarray) -> None:
  """Says which clients hold NaN or inf inputs, in a warning. Not refused: a run drops a client whose
  update is not finite, and counts it (dropped_clients), which such data may be meant to show;
  but without a word, a run would only show it in those counts and a NaN test loss. A file
  of nothing else is refused: every round was rejected, eta halved each time, and the run's
  last line advised a smaller eta without naming the file."""
  if not np.issubdtype(x.dtype, np.floating) or not len(x):
    return
  rows = x.reshape(len(x), -1)
  bad = np.concatenate([~np.isfinite(rows[i:i + 65536]).all(axis=1)  # (bounded scratch)
                        for i in range(0, len(rows), 65536)])
  if bad.all():  # (with some finite, E < 1 may read around the rest: a run can go on)
    raise DataError(f'{path}: every example holds NaN or inf inputs: no client can return a '
                    'finite update, so no round could be accepted; mend the file')
  if bad.any():
    clients = np.unique(np.searchsorted(offsets, np.flatnonzero(bad), side='right') - 1)
    named = ', '.join(str(ids[k]) for k in clients[:5]) + (', ...' if len(clients) > 5 else '')
    logging.warning('%s: %d example(s) of %d client(s) (%s) hold NaN or inf inputs: a training '
                    "client's update is then not finite, and it is dropped from each round "
                    '(dropped_clients in metrics.jsonl); a test example makes the test loss '
                    'NaN', path, int(bad.sum()), len(clients), named)


def _client_ids(path: str, ids: np.ndarray, clients: int) -> np.ndarray:
  """A file's client_ids as distinct strings, one per client (bytes read as UTF-8)."""
  if ids.ndim != 1:
    raise DataError(f'{path}: client_ids must be a 1-D array of strings, one per client, got '
                    f'shape {ids.shape}')
  if len(ids) != clients:
    raise DataError(f'{path}: {len(ids)} client_ids for {clients} clients')
  if ids.dtype.kind == 'S':
    try:
      ids = np.char.decode(ids, 'utf-8')
    except UnicodeDecodeError as e:
      raise DataError(f'{path}: client_ids are bytes that are not UTF-8 ({e.reason} at byte '
                      f'{e.start} of {e.object!r}); save them as str') from None
  ids = ids.astype(str)
  names, seen = np.unique(ids, return_counts=True)
  if (seen > 1).any():
    raise DataError(f'{path}: client_ids must be distinct; {str(names[seen > 1][0])!r} names '
                    f'{seen[seen > 1][0]} clients')
  return ids


def _hold_out(data: ArrayClientDataset, test_fraction: float,
              seed: int) -> tuple[ArrayClientDataset, ArrayClientDataset]:
  train, test = [], []
  for i in range(len(data.client_ids)):
    examples = data.client(i)
    n = len(examples['y'])
    order = np.random.default_rng([seed, i]).permutation(n)
    n_test = int(np.floor(n * test_fraction))
    test.append({k: v[order[:n_test]] for k, v in examples.items()})
    train.append({k: v[order[n_test:]] for k, v in examples.items()})
  return (ArrayClientDataset.from_clients(data.client_ids, train),
          ArrayClientDataset.from_clients(data.client_ids, test))


def load_npz(path: str, *, num_classes: int = 0, test_fraction: float = 0.2,
             seed: int = 0) -> Task:
  """Reads a bring-your-own task; num_classes 0 infers it from the labels."""
  if os.path.isdir(path):
    files = [os.path.join(path, f) for f in ('train.npz', 'test.npz')]
    absent = [f for f in files if not os.path.isfile(f)]
    if absent:
      raise DataError(f'{path}: a data directory must hold train.npz and test.npz; '
                      f'missing {absent}')
    train, test = (_dataset(f, _read(f)) for f in files)
    if not train.offsets[-1]:  # (it was said as config.cohort_size past 0 clients with data)
      raise DataError(f'{files[0]}: holds no examples (num_examples is empty or all 0); the '
                      'training clients need examples')
  elif os.path.isfile(path):
    data = _dataset(path, _read(path))
    if not data.offsets[-1]:
      raise DataError(f'{path}: holds no examples (num_examples is empty or all 0); a client '
                      'file needs x [N, ...], y [N] and num_examples [C] with N > 0')
    train, test = (dataclasses.replace(d, examples_sha256=data.examples_sha256)
                   for d in _hold_out(data, test_fraction, seed))
  elif os.path.exists(path):  # (/dev/null, a pipe: it was said to be missing)
    raise DataError(f'data.path {path!r}: neither a file nor a directory (expected a .npz '
                    'file, or a directory with train.npz and test.npz)')
  else:
    raise DataError(f'data.path {path!r}: no such file or directory (expected a .npz file, '
                    f'or a directory with train.npz and test.npz)'
                    + (tilde_left(path, '--config.data.path', made=False) or ''))
  # Each file named on its own: a folder's train.npz or test.npz, or the one file.
  sources = ((files[0], train), (files[1], test)) if os.path.isdir(path) else (
      (path, train), (path, test))
  highest = [(int(d.features['y'].max()), source) for source, d in sources
             if len(d.features['y'])]
  labels_max = max([label for label, _ in highest] or [0])
  for label, source in highest:
    if num_classes and label >= num_classes:
      raise DataError(f'{source}: label {label} does not fit data.num_classes={num_classes} '
                      f'(labels must be in [0, {num_classes - 1}])')
  if train.features['x'].shape[1:] != test.features['x'].shape[1:]:
    raise DataError(f'{path}: train inputs are {train.features["x"].shape[1:]} but test inputs '
                    f'are {test.features["x"].shape[1:]}')
  return Task(os.path.basename(os.path.normpath(path)), train, test,
              num_classes or labels_max + 1)

"""What a source file is, from its first bytes: said when a reader is given another kind (a
download still compressed, TFF's older HDF5 release, a file of the other SQLite format)."""

from __future__ import annotations

import os

from fathom_sim.data.byo import DataError

# (first bytes, what the file is, and how to get at what it holds)
_MAGIC = (
    (b'\x89HDF\r\n\x1a\n', "an HDF5 file (TFF's older .h5 release, which is not read: give the "
                           '.sqlite files)'),
    (b'SQLite format 3\x00', 'a SQLite database'),  # (said of a file given as XML)
    (b'BZh', 'bzip2-compressed: extract it first (tar -xjf for a .tar.bz2, else bzip2 -d)'),
    (b'\x1f\x8b', 'gzip-compressed: extract it first (tar -xzf for a .tar.gz, else gunzip)'),
    (b'\xfd7zXZ\x00', 'xz-compressed: decompress it first (xz -d)'),
    (b']\x00\x00', 'lzma-compressed: decompress it first (lzma -d)'),
    (b'PK\x03\x04', 'a zip archive: extract it first (unzip)'),
)


def kind(path: str) -> str | None:
  """What `path` is where its first bytes say (None: unknown or unreadable)."""
  try:
    with open(path, 'rb') as f:
      head = f.read(16)
  except OSError:
    return None
  return next((what for magic, what in _MAGIC if head.startswith(magic)), None)


def not_file(path: str) -> str:
  """What `path`, which is no regular file, is instead (a FIFO was said to be missing)."""
  if os.path.isdir(path):
    return 'a folder, not a file'
  if os.path.exists(path):
    return 'not a regular file (a FIFO, a socket or a device)'
  return 'a link to nothing' if os.path.islink(path) else 'no such file'


def not_a_file(path: str, expected: str) -> DataError:
  """The error for a source `path` that is no regular file: missing, a folder, a FIFO."""
  return DataError(f'{path}: {not_file(path)} (expected {expected})')


def unreadable_sqlite(path: str, error: Exception, otherwise: str = '') -> DataError:
  """The error for a source SQLite cannot read: what its first bytes say it is; a file that
  starts as an SQLite file and that SQLite finds malformed is damaged or cut short (a cut
  download was said to need lzma -d); `otherwise` where they say nothing known. (A locked
  file or an I/O error is said as SQLite says it.)"""
  found = kind(path)
  if found and found.startswith('a SQLite'):
    damaged = any(s in str(error) for s in ('malformed', 'not a database'))
    hint = ('it starts as an SQLite file does, so it is damaged or cut short: download it again'
            if damaged else '')
  else:
    hint = f'it is {found}' if found else otherwise
  return DataError(f'{path}: not a readable SQLite database ({error})'
                   + (f'; {hint}' if hint else ''))

"""Stack Exchange data dumps (`Posts.xml`): one client per `OwnerUserId`, one example per
sentence of its questions and answers, grouped as TFF grouped Stack Overflow. The text is
tokenized here (vocab.tokenize), not by TFF's own preprocessing: hyphenated words, URLs and
non-ASCII text split differently, so a vocabulary from these sentences is this module's own.

Posts are streamed (iterparse) into a temporary SQLite table so a dump far larger than memory
can be grouped by user; posts from `split_date` on form the test split.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import re
import sqlite3
import xml.etree.ElementTree as ET
from typing import Iterator

from fathom_sim.data import sniff
from fathom_sim.data.byo import DataError
from fathom_sim.data.vocab import html_sentences

POST_TYPES = {'1': 'question', '2': 'answer'}


def _is_date(text: str) -> bool:
  """YYYY-MM-DD of a real day: dates are compared as text with the posts' CreationDate."""
  try:
    return datetime.date.fromisoformat(text).isoformat() == text
  except ValueError:
    return False


_TIMESTAMP = re.compile(r'\d{4}-\d\d-\d\d(T\d\d:\d\d(:\d\d(\.\d{1,6})?)?)?')


def _is_timestamp(text: str) -> bool:
  """A CreationDate as the dumps write it (a day, then an optional time, no zone): compared as
  text with the split date, any other form would fall on the wrong side of it."""
  if not _TIMESTAMP.fullmatch(text):
    return False
  try:
    datetime.datetime.fromisoformat(text)  # (a real day and time: not 2015-02-30)
  except ValueError:
    return False
  return True


# Users in the order of their numeric ids (OwnerUserId is kept as given, as text), each one's
# posts by date; the `by_user` index is on this very expression, so that no query sorts.
_CLIENT_ORDER = 'CAST(user AS INTEGER), user, date, id'
# The date of the posts' n-th post by date (the split date of a test fraction).
_NTH_DATE = 'SELECT date FROM posts INDEXED BY by_date ORDER BY date LIMIT 1 OFFSET ?'


@contextlib.contextmanager
def _temp_files_in(db: sqlite3.Connection, folder: str) -> Iterator[None]:
  """SQLite's temporary files (an index build's sorted runs) in `folder` for the block.

  The setting is the process's, hence the block; a build of SQLite without it (deprecated,
  not removed, in 3.x) ignores the pragma and uses the system's folder."""
  old = db.execute('PRAGMA temp_store_directory').fetchone()
  quote = lambda path: "'" + path.replace("'", "''") + "'"  # (a pragma takes no parameters)
  db.execute(f'PRAGMA temp_store_directory = {quote(folder)}')
  try:
    yield
  finally:
    db.execute(f'PRAGMA temp_store_directory = {quote(old[0] if old else "")}')


class StackExchangeXml:
  """Posts of a dump grouped by user; `scratch` is a directory for the grouping table."""

  def __init__(self, path: str, scratch: str, split_date: str = '', test_fraction: float = 0.2):
    self.path = path
    if not os.path.isfile(path):
      raise sniff.not_a_file(path, 'a Stack Exchange Posts.xml')
    if split_date and not _is_date(split_date):  # before reading a dump that may be large
      raise DataError(f'--split_date {split_date!r} is not a date; expected YYYY-MM-DD (posts '
                      'from that day on form the test split)')
    self._db = sqlite3.connect(os.path.join(scratch, 'posts.sqlite'))
    self._db.execute('CREATE TABLE posts (user TEXT, id INTEGER, date TEXT, sentences TEXT)')
    self.skipped = 0  # posts without an owner (deleted users) or of other types
    self._ingest(scratch)
    given = bool(split_date)
    if not split_date:
      # The date before which (1 - test_fraction) of the posts were written.
      total = self._db.execute('SELECT COUNT(*) FROM posts').fetchone()[0]
      row = self._db.execute(_NTH_DATE, (min(total - 1, int(total * (1 - test_fraction))),)
                             ).fetchone()
      split_date = row[0][:10]
    self.split_date = split_date
    self._check_splits(given, test_fraction)

  def close(self) -> None:
    """Lets go of the grouping table's file (an open file deleted on NFS stays behind as a
    .nfs file, and with it its folder)."""
    self._db.close()

  def _ingest(self, scratch: str) -> None:
    rows, seen_root, root = [], False, None
    try:
      for event, element in ET.iterparse(self.path, events=('start', 'end')):
        if root is None:
          root = element
        if element.tag == 'posts':
          seen_root = True
        if event != 'end' or element.tag != 'row':
          continue
        a = element.attrib
        owner = a.get('OwnerUserId')
        if a.get('PostTypeId') in POST_TYPES and owner and 'CreationDate' in a:
          sentences = html_sentences(a.get('Body', ''))
          try:
            post_id = int(a.get('Id', 0))
            if not -2**63 <= post_id < 2**63:  # (SQLite's INTEGER: it overflowed inserting)
              raise ValueError
          except ValueError:
            raise DataError(f'{self.path}: a row\'s Id is {a["Id"][:40]!r}; Posts.xml Ids are '
                            'whole numbers (of at most 64 bits)') from None
          if not _is_timestamp(a['CreationDate']):
            raise DataError(f'{self.path}: the row of Id {post_id} has CreationDate '
                            f'{a["CreationDate"][:40]!r}; Posts.xml dates are '
                            'YYYY-MM-DDThh:mm:ss[.fff] (posts are split by them, as text)')
          rows.append((owner, post_id, a['CreationDate'], '\n'.join(sentences)))
        else:
          self.skipped += 1
        root.clear()  # drop finished rows: a dump can be far larger than memory
        if len(rows) >= 10000:
          self._db.executemany('INSERT INTO posts VALUES (?, ?, ?, ?)', rows)
          rows = []
    except ET.ParseError as e:
      found = sniff.kind(self.path)  # (a .7z dump is not known by its bytes: 7z x first)
      raise DataError(f'{self.path}: not well-formed XML ({e}); expected a Stack Exchange '
                      'Posts.xml' + (f'; it is {found}' if found else '')) from None
    self._db.executemany('INSERT INTO posts VALUES (?, ?, ?, ?)', rows)
    count = self._db.execute('SELECT COUNT(*) FROM posts').fetchone()[0]
    if not seen_root or not count:
      raise DataError(f'{self.path}: no <posts> of <row PostTypeId="1|2" OwnerUserId=... '
                      'CreationDate=... Body=...> found; expected a Stack Exchange Posts.xml')
    # The queries walk these indexes, in the scratch folder, where an ORDER BY without one
    # sorted the split's whole text into the system's temporary folder (a Stack Overflow dump
    # is tens of GB); building them sorts their keys, there too, unless SQLite is told.
    with _temp_files_in(self._db, scratch):
      self._db.execute(f'CREATE INDEX by_user ON posts ({_CLIENT_ORDER})')
      self._db.execute('CREATE INDEX by_date ON posts (date)')

  def _check_splits(self, given: bool, test_fraction: float) -> None:
    """A split without examples would fail late, inside TFDS: say which and why now."""
    count = {split: self._db.execute(
        # One example per sentence; a post's sentences are joined by newlines.
        "SELECT COALESCE(SUM(LENGTH(sentences) - LENGTH(REPLACE(sentences, char(10), '')) + 1),"
        f" 0) FROM posts WHERE {self._where(split)} AND sentences != ''",
        (self.split_date,)).fetchone()[0] for split in ('train', 'test')}
    empty = [split for split in ('train', 'test') if not count[split]]
    if not empty:
      return
    first, last = self._db.execute('SELECT MIN(date), MAX(date) FROM posts').fetchone()
    how = (f'--split_date {self.split_date}' if given else
           f'--test_fraction {test_fraction} (split date {self.split_date})')
    raise DataError(f'{self.path}: {how} leaves the {" and ".join(empty)} split empty: '
                    f'{count["train"]} examples (sentences) fall before it, {count["test"]} on '
                    f'or after it; give a --split_date between {first[:10]} and {last[:10]}, '
                    'the dates of the first and last posts')

  def _where(self, split: str) -> str:
    return 'date < ?' if split == 'train' else 'date >= ?'

  def sentences(self, split: str) -> Iterator[str]:
    for (text,) in self._db.execute(f'SELECT sentences FROM posts WHERE {self._where(split)}',
                                    (self.split_date,)):
      yield from (s for s in text.split('\n') if s)

  def clients(self, split: str) -> Iterator[tuple[str, list[str]]]:
    """(user id, sentences in post order) per user with any sentence in `split`."""
    rows = self._db.execute(f'SELECT user, sentences FROM posts INDEXED BY by_user WHERE '
                            f"{self._where(split)} AND sentences != '' ORDER BY {_CLIENT_ORDER}",
                            (self.split_date,))
    current, sentences = None, []
    for user, text in rows:
      if user != current:
        if current is not None:
          yield current, sentences
        current, sentences = user, []
      sentences.extend(s for s in text.split('\n') if s)
    if current is not None:
      yield current, sentences

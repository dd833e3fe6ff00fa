"""LEAF's JSON files (FEMNIST): {"users": [...], "num_samples": [...],
"user_data": {user: {"x": [[784 floats], ...], "y": [labels]}}}.

A source is a train.json / test.json pair, or LEAF's own layout: train/ and test/ folders of
such files (users spread over many files).
"""

from __future__ import annotations

import glob
import json
import os
from typing import Iterator

import numpy as np

from fathom_sim.data.byo import DataError


def split_files(source: str) -> dict[str, list[str]]:
  """{'train': [files], 'test': [files]} under a LEAF data directory."""
  found = {}
  for split in ('train', 'test'):
    single = os.path.join(source, f'{split}.json')
    many = sorted(glob.glob(os.path.join(glob.escape(source), split, '*.json')))
    found[split] = [single] if os.path.isfile(single) else many
  if not os.path.isdir(source) or not all(found.values()):
    raise DataError(f'{source}: expected a LEAF directory with train.json and test.json, or '
                    'train/*.json and test/*.json')
  return found


def _load(path: str) -> dict:
  try:
    with open(path, encoding='utf-8') as f:
      data = json.load(f)
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
    raise DataError(f'{path}: not a readable LEAF JSON file ({e})') from None
  if not isinstance(data, dict) or not {'users', 'user_data'} <= set(data):
    raise DataError(f'{path}: a LEAF file is a JSON object with "users", "num_samples" and '
                    '"user_data"')
  return data


def _shown(value) -> str:
  """A JSON value, said in at most 40 characters."""
  text = json.dumps(value)
  return text if len(text) <= 40 else text[:37] + '...'


class LeafJson:
  """Users of one split, file by file (one file's JSON in memory at a time)."""

  def __init__(self, files: list[str]):
    self.files = files

  def clients(self) -> Iterator[tuple[str, str, dict]]:
    """(file, user, {'x', 'y'}) per user, in the files' order."""
    first_file: dict[str, str] = {}  # user -> the file that held it
    for path in self.files:
      data = _load(path)
      users = data['users']
      if not (isinstance(users, list) and all(isinstance(u, str) for u in users)
              and isinstance(data['user_data'], dict)):
        raise DataError(f'{path}: "users" must be a list of user ids (strings) and "user_data" '
                        'an object keyed by them')
      # Read by "users": unlisted users holding examples were dropped without a word. (LEAF's
      # split_data.py leaves an empty entry for each user it drops: those are not data.)
      unlisted = sorted(u for u in set(data['user_data']) - set(users)
                        if not isinstance(data['user_data'][u], dict)
                        or data['user_data'][u].get('y'))
      if unlisted:
        raise DataError(f'{path}: "user_data" holds {len(unlisted)} user(s) with examples that '
                        f'"users" does not list (first: {unlisted[0]}); a LEAF file lists each '
                        'of its users')
      counts = data.get('num_samples', [None] * len(users))
      if not isinstance(counts, list) or len(counts) != len(users):
        # zip() would drop the users past the shorter list without a word.
        given = (f'{len(counts)} count(s)' if isinstance(counts, list) else
                 f'num_samples {repr(counts)[:40]}')
        raise DataError(f'{path}: "num_samples" must list one count per user: {len(users)} '
                        f'user(s), {given}')
      for user, count in zip(users, counts):
        if user in first_file:
          where = 'listed twice' if first_file[user] == path else f'also in {first_file[user]}'
          raise DataError(f'{path}: user {user} is {where}; a writer is one client, listed '
                          'once in one file of a split')
        first_file[user] = path
        entry = data['user_data'].get(user)
        if not isinstance(entry, dict) or 'x' not in entry or 'y' not in entry:
          raise DataError(f'{path}: user {user} has no "x" and "y" in user_data')
        labels = entry['y']
        if not (isinstance(labels, list) and all(
            isinstance(v, int) and not isinstance(v, bool) and abs(v) < 2**62 for v in labels)):
          raise DataError(f'{path}: user {user}: "y" must be a list of whole-number labels, '
                          f'got {_shown(labels)}')
        try:
          # Unconverted first: np.asarray(..., float32) parsed strings of digits as pixels.
          x = np.asarray(entry['x'])
          if x.dtype.kind in 'USb':  # ('O', numbers past float64 among them: converted below)
            raise TypeError('they are ' + ('true/false' if x.dtype.kind == 'b' else 'strings'))
          x, y = x.astype(np.float32), np.asarray(labels, np.int64)
        except (ValueError, TypeError, OverflowError) as e:  # (a JSON integer past float64)
          raise DataError(f'{path}: user {user}: "x" must be lists of numbers ({e})') from None
        if count is not None and (not isinstance(count, int) or isinstance(count, bool)):
          raise DataError(f'{path}: user {user}: num_samples gives {_shown(count)}; it lists '
                          'whole numbers, one count per user')
        if count is not None and count != len(y):
          raise DataError(f'{path}: user {user}: num_samples says {count} but "y" has {len(y)} '
                          'labels')
        yield path, user, {'x': x, 'y': y}
      del data

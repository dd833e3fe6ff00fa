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
    many = sorted(glob.glob(os.path.join(source, split, '*.json')))
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


class LeafJson:
  """Users of one split, file by file (one file's JSON in memory at a time)."""

  def __init__(self, files: list[str]):
    self.files = files

  def clients(self) -> Iterator[tuple[str, dict]]:
    for path in self.files:
      data = _load(path)
      counts = data.get('num_samples', [None] * len(data['users']))
      for user, count in zip(data['users'], counts):
        entry = data['user_data'].get(user)
        if not isinstance(entry, dict) or 'x' not in entry or 'y' not in entry:
          raise DataError(f'{path}: user {user} has no "x" and "y" in user_data')
        try:
          x = np.asarray(entry['x'], np.float32)
          y = np.asarray(entry['y'])
        except (ValueError, TypeError) as e:
          raise DataError(f'{path}: user {user}: x must be lists of numbers ({e})') from None
        if count is not None and count != len(y):
          raise DataError(f'{path}: user {user}: num_samples says {count} but y has {len(y)}')
        yield user, {'x': x, 'y': y}
      del data

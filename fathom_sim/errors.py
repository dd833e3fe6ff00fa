"""Shared wording of errors: other code's errors in one line of ours, and paths we refuse."""

from __future__ import annotations

import os
import re


def first_line(error: BaseException, limit: int = 200) -> str:
  """The first line of `error`'s message (at most `limit` characters), or its type's name when
  it has no message: a library's multi-line error, named inside one line of ours."""
  text = str(error).strip()
  return text.splitlines()[0][:limit] if text else type(error).__name__


def is_url(path: str) -> bool:
  """True for gs://bucket/run and the like. The simulator reads and writes through the local
  filesystem (os, open, flock); given such a path, os.makedirs made a local folder named 'gs:'
  and the first checkpoint failed in orbax with a traceback."""
  return re.match(r'[A-Za-z][A-Za-z0-9+.-]*://', path) is not None


# What to do instead, said wherever a URL is refused.
MOUNT_HINT = ('mount the bucket as a folder (gcsfuse; launch/tpu_pod.sh install does) and give '
              'the folder')


def file_for_folder(path: str, flag: str, holds: str) -> str | None:
  """The refusal of a folder flag (`flag`, e.g. '--out') given an existing file, saying what
  the folder `holds`; None where `path` is a folder or does not exist yet."""
  if os.path.exists(path) and not os.path.isdir(path):
    return f'{flag} {path!r} is a file, not a folder; give a folder for {holds}'
  return None

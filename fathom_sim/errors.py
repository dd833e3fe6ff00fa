"""Shared wording of errors: other code's errors in one line of ours, paths we refuse, and the
exit status each kind of error ends a command with."""

from __future__ import annotations

import errno
import os
import re
import signal

EXIT_FAILED = 1  # anything else: a checkpoint that cannot be written, a library's error, a bug
EXIT_BAD_INPUT = 2  # the config, data or workdir given, or more memory than the host holds
EXIT_DIVERGED = 3  # the run stopped itself: config.max_rejected_rounds rejected in a row


# flock's answers that another process holds a lock (some filesystems say EACCES); any other
# error means the filesystem has no locks.
LOCK_HELD_ELSEWHERE = (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES)


class InputError(ValueError):
  """The input is at fault (a config, data, a workdir): the command ends with one line naming
  it and EXIT_BAD_INPUT; a sweep marks the run failed and goes on."""


class OutputError(RuntimeError):
  """What a command writes could not be written (a full disk, a lost mount): it ends with one
  line naming the file and EXIT_FAILED (to retry once there is room); what it wrote before,
  a run's newest checkpoint included, stays."""


# train.py raises these two; here so that a command names them without importing train (JAX).
class Preempted(Exception):
  """The run received SIGTERM or SIGINT and stopped after checkpointing its last round."""

  def __init__(self, signum: int, round_index: int):
    super().__init__(f'stopped by signal {signum} after round {round_index} (checkpointed)')
    self.signum = signum
    self.exit_status = 128 + signum  # the shell's convention for "ended by this signal"


class Diverged(Exception):
  """config.max_rejected_rounds rounds in a row were rejected: the run stopped after
  checkpointing the last. `workdirs`: the runs that stopped (of vectorised seeds, those whose
  count it reached; the others finished or stopped otherwise)."""

  exit_status = EXIT_DIVERGED

  def __init__(self, workdirs: list[str], message: str):
    super().__init__(message)
    self.workdirs = list(workdirs)


def exit_status(error: BaseException) -> int:
  """The status a command ends with for `error`, in one place for launch/cli.py and for the
  peers of a multi-host run (which exit with the failing process's status): an error's own
  `exit_status` where it has one (a diverged run, a run stopped by a signal), EXIT_BAD_INPUT
  for bad input and a host out of memory, 128 + SIGINT for a second Ctrl-C (the shell's
  convention), EXIT_FAILED otherwise."""
  own = getattr(error, 'exit_status', None)
  if isinstance(own, int):
    return own
  if isinstance(error, (InputError, MemoryError)):
    return EXIT_BAD_INPUT
  if isinstance(error, KeyboardInterrupt):
    return 128 + signal.SIGINT
  return EXIT_FAILED


def one_line(error: BaseException) -> str:
  """An error said in one line: ours (InputError, OutputError) as they are worded, another as
  its type and first line (its type alone without a message), e.g. 'ZeroDivisionError:
  division by zero'."""
  if isinstance(error, (InputError, OutputError)):
    return first_line(error, limit=None)  # (ours may run past 200 characters)
  return f'{type(error).__name__}: {first_line(error)}' if str(error).strip() else (
      type(error).__name__)


def first_line(error: BaseException, limit: int | None = 200) -> str:
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


def tilde_left(path: str, flag: str, *, made: bool) -> str | None:
  """What to say of a `path` that starts with ~ (the shell expands ~ at a word's start only,
  so `--out=~/runs` arrives as written); None for any other path. `made`: the command would
  make the path (a folder named ~ in the current directory): the whole refusal; else the
  clause a 'no such file' error ends with."""
  if path != '~' and not path.startswith('~/'):
    return None
  instead = f"give {flag} {path} (a space, not =) or $HOME/{path[2:]}"
  if made:
    return (f"{flag} {path!r} starts with ~, which the shell leaves as it is after '=': it "
            f'would be a folder named ~ in {os.getcwd()!r}; {instead}')
  return f"; the shell leaves a ~ after '=' as it is: {instead}"


def file_for_folder(path: str, flag: str, holds: str) -> str | None:
  """The refusal of a folder flag (`flag`, e.g. '--out') given an existing file, saying what
  the folder `holds`; None where `path` is a folder or does not exist yet."""
  if os.path.exists(path) and not os.path.isdir(path):
    return f'{flag} {path!r} is a file, not a folder; give a folder for {holds}'
  # A file on the way (--out=notes.txt/run): the folder could not be made, and a dry run had
  # listed the runs it would make there.
  above = os.path.dirname(os.path.abspath(path))
  while not os.path.lexists(above):
    above = os.path.dirname(above)
  if not os.path.isdir(above):
    what = 'a file' if os.path.exists(above) else 'a broken link'
    return (f'{flag} {path!r}: {above!r} on its path is {what}, not a folder; give a folder '
            f'for {holds}')
  return None

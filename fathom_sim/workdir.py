"""A run's workdir: its config.json, which fields a resumed run may change, and the checks made
before a run writes anything there.
"""

from __future__ import annotations

import contextlib
import contextvars
import datetime
import errno
import functools
import fcntl
import hashlib
import json
import os
import re
import socket
from typing import Iterable, Iterator

import ml_collections
from absl import logging

from fathom_sim import metrics
from fathom_sim.config import base_config, check_config, unread_paths
from fathom_sim.errors import (LOCK_HELD_ELSEWHERE, MOUNT_HINT, InputError, file_for_folder,
                               is_url, tilde_left)

SWEEP_INDEX = 'sweep.json'  # a sweep's index of its runs (sweep.py): its folder is a sweep's


def sweep_index_problem(index) -> str | None:
  """Why a sweep.json's value is not a sweep's index (None where it is): its runs are a list
  of entries, each an object with a string name. The sweep that runs again and the report read
  it by this one rule."""
  if not isinstance(index, dict):
    return 'not a JSON object'
  runs = index.get('runs')
  if not isinstance(runs, list):
    return '"runs" is not a list'
  bad = next((i for i, e in enumerate(runs)
              if not isinstance(e, dict) or not isinstance(e.get('name'), str)), None)
  return None if bad is None else f'runs[{bad}] is not an entry with a "name"'


CHECKPOINTS = 'checkpoints'  # checkpoint.py's saves, one folder a round
UNREADABLE = 'unreadable_checkpoints'  # where unreadable ones are moved, never deleted


def newest_step(workdir: str) -> int | None:
  """The newest round among a workdir's checkpoint folders, by their names alone (nothing is
  read or opened: for checks and messages before or after orbax has the folder)."""
  folder = os.path.join(workdir, CHECKPOINTS)
  try:
    names = os.listdir(folder)
  except OSError:
    return None
  return max((int(n) for n in names if n.isdigit() and os.path.isdir(os.path.join(folder, n))),
             default=None)


def _is_writer() -> bool:
  """distributed.is_writer(), imported here: reading a workdir (report.py) starts no JAX."""
  from fathom_sim import distributed
  return distributed.is_writer()


CONFIG_FILE = 'config.json'
# What launch/prepare_data.py's --out holds once made: no run's or sweep's folder.
DATASET_MARKER, DATASET = 'meta.json', "a prepared dataset (launch/prepare_data.py's --out)"
LOCK_FILE = '.lock'  # held by the process that writes the run's files, while it runs


class WorkdirError(InputError):
  """The workdir cannot be used; nothing in it was changed."""


# How a refusal names a run's folder, and the way out: launch/main.py's flag, or a sweep's terms
# (launch/sweep.py makes its runs' folders under --out: no --workdir to change there).
_NAMING = contextvars.ContextVar('naming', default=('--workdir', 'use another workdir'))


@contextlib.contextmanager
def named_as_sweep_runs() -> Iterator[None]:
  """Refusals of run folders made in the body say them as a sweep's runs."""
  token = _NAMING.set(("the sweep's run folder",
                       "give the sweep another --out, or move this run's folder away"))
  try:
    yield
  finally:
    _NAMING.reset(token)


def _flag() -> str:
  """What refusals call a run's folder: '--workdir', or in a sweep "the sweep's run folder"."""
  return _NAMING.get()[0]


def named(workdir: str) -> str:
  """A run's folder as refusals name it: "--workdir 'runs/a'", or in a sweep its run folder."""
  return f'{_flag()} {workdir!r}'


def another_folder() -> str:
  """The way out of a refusal of the folder itself: another workdir, or, in a sweep, another
  --out."""
  return _NAMING.get()[1]


# Fields that may differ between a run and its resumption: they change how a run is executed,
# logged or evaluated, never the model it trains, but for float rounding: device and lane
# counts, the conv form and matmul_precision change how products round (TF32 against float32
# is enough to send an unstable run another way; resuming at 'highest' is how to steady one).
# Every other field that the run reads is part of its identity.
RESUMABLE_FIELDS = frozenset({
    'num_rounds', 'log_every', 'checkpoint_every', 'keep_checkpoints', 'eval_every',
    'eval_clients', 'eval_batch_size', 'target_accuracy', 'max_rejected_rounds', 'num_devices',
    'lanes_per_device',
    'data_on_device', 'batch_pad_per_octave', 'local_loop', 'loop_chunk', 'model.conv',
    'compile_ahead', 'matmul_precision'})


def flatten(d: dict, prefix: str = '') -> dict:
  """{'model': {'name': 'mlp'}} -> {'model.name': 'mlp'}: a config's fields by dotted path."""
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(flatten(v, f'{prefix}{k}.'))
    else:
      out[f'{prefix}{k}'] = v
  return out


def config_dict(config: ml_collections.ConfigDict) -> dict:
  """The config as plain JSON values, as config.json holds it."""
  return json.loads(config.to_json_best_effort())


@functools.cache
def defaults() -> dict:
  """base_config's fields, flattened, as config.json would hold them (not to be changed)."""
  return flatten(config_dict(base_config()))


def with_defaults(saved: dict) -> dict:
  """A config as saved (config.json), flattened, a field added to the simulator after it was
  saved at its default there."""
  return {**defaults(), **flatten(saved)}


def read_saved(workdir: str) -> dict | None:
  """The config a run's config.json holds, flattened, a field added to the simulator after the
  run was saved at its default there; None without one. Raises WorkdirError if unreadable."""
  path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.exists(path):
    return None
  try:
    with open(path, encoding='utf-8') as f:
      saved = json.load(f)
    if not isinstance(saved, dict):
      raise ValueError(f'a JSON {type(saved).__name__}, where a config is an object')
  except (OSError, ValueError) as e:
    raise WorkdirError(f'{path} is unreadable ({e}); it describes the run this workdir '
                       'holds, so the run cannot be resumed safely') from None
  return with_defaults(saved)


# Fields that name a file or folder: two spellings of one place (a trailing '/', '..', a path
# relative to here) are one value. What is read there is checked apart (the data's fingerprint,
# in the checkpoints).
PATH_FIELDS = frozenset({'data.path', 'data.data_dir'})


def canonical(field: str, value):
  """A config field's value as compared: a PATH_FIELDS path as the place it names from this
  process's folder; any other value (and an empty path) as it is."""
  return os.path.realpath(value) if field in PATH_FIELDS and isinstance(value, str) and value \
      else value


def same_value(field: str, a, b) -> bool:
  """Whether a config's `field` holds the same value as a and b: equal, or two spellings of
  one place (PATH_FIELDS)."""
  return a == b or canonical(field, a) == canonical(field, b)


def differing(saved: dict, new: dict, allowed: Iterable[str]) -> list[str]:
  """The fields of two flattened configs whose values differ, but for `allowed` and the fields
  neither run reads (eta_h under FedAvg), save hyper_optimizer, whose state the checkpoint
  holds under FedAvg too. What a config reads follows from fields of its identity (algorithm,
  model.name, ...): where those differ, they are listed themselves. A path (PATH_FIELDS)
  differs where it names another place from this process's folder."""
  skip = set(allowed) | (unread_paths(new) - {'hyper_optimizer'})
  return sorted(k for k in set(saved) | set(new)
                if k not in skip and not same_value(k, saved.get(k), new.get(k)))


def config_fingerprint(config: ml_collections.ConfigDict) -> str:
  """sha256 of what a summary.json summarises: the config's fields that differ from
  base_config's, but those it does not read (as `differing` compares them). A field added to
  the simulator later, at its default, leaves it as it was."""
  return flat_fingerprint(flatten(config_dict(config)))


def flat_fingerprint(flat: dict) -> str:
  """config_fingerprint of a flattened config (a config.json as with_defaults reads it)."""
  default = defaults()
  skip = unread_paths(flat) - {'hyper_optimizer'}
  fields = {k: v for k, v in flat.items()
            if k not in skip and (k not in default or default[k] != v)}
  return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()


def _has_results(workdir: str) -> bool:
  """Whether a run here got as far as a row, a checkpoint or a summary. Its config.json alone
  (with an empty metrics.jsonl or checkpoints/, which a run makes before its first round) is
  of a command that stopped before (out of memory at the model's init, bad data): nothing
  computed is lost when another config replaces it, as the corrected command needs."""
  def nonempty(name: str) -> bool:
    path = os.path.join(workdir, name)
    try:
      return bool(os.listdir(path)) if os.path.isdir(path) else os.path.getsize(path) > 0
    except OSError:
      return False
  return (newest_step(workdir) is not None or nonempty(metrics.SUMMARY_FILE)
          or nonempty(metrics.METRICS_FILE) or nonempty(UNREADABLE))


def started(workdir: str) -> bool:
  """Whether `workdir` holds a run to resume: its config.json and some result (_has_results).
  A run's config is its identity only from then on."""
  return os.path.exists(os.path.join(workdir, CONFIG_FILE)) and _has_results(workdir)


def check_same_run(workdir: str, config: ml_collections.ConfigDict) -> None:
  """Raises WorkdirError when `workdir` holds a run of a config that differs from `config` in a
  field that changes the result (or whose config.json is unreadable). Else a path field of
  `config` that names the run's place otherwise (PATH_FIELDS) takes the run's spelling, so that
  its config.json, summary and report keep one value."""
  if not _has_results(workdir):
    return
  saved = read_saved(workdir)
  if saved is None:
    return
  new = flatten(config_dict(config))
  changed = differing(saved, new, RESUMABLE_FIELDS)
  if changed:
    # Under FedAvg hyper_optimizer changes no result, but the checkpoint holds its state (a
    # warning may have said it is not read).
    held = {'hyper_optimizer': ', whose state the checkpoint holds'} if (
        new.get('algorithm') == 'fedavg') else {}
    details = ', '.join(f'{k} ({saved.get(k)!r} -> {new.get(k)!r}{held.get(k, "")})'
                        for k in changed)
    raise WorkdirError(f'{named(workdir)} holds a run with a different config; fields that '
                       f'change the result differ: {details}; {another_folder()}')
  for field in PATH_FIELDS:
    group, name = field.split('.')
    if field in saved and new.get(field) != saved[field] and same_value(
        field, saved[field], new.get(field)):
      config[group][name] = saved[field]


def check_local(folder: str, flag: str) -> None:
  """Raises WorkdirError, before anything is made, for a URL in place of a folder, or a path
  whose checkpoints would not read back."""
  if is_url(folder):
    raise WorkdirError(f'{flag} {folder!r} is a URL, and runs write through the filesystem; '
                       f'{MOUNT_HINT}')
  tilde = tilde_left(folder, flag, made=True)
  if tilde:
    raise WorkdirError(tilde)
  # Orbax finds a save's per-process parts by a glob of the path, where [...] is a character
  # class: measured (orbax 0.12), the checkpoints of run[1] saved and never read back.
  path = os.path.abspath(folder)
  bracketed = re.search(r'\[!?(\][^/\]]*|[^/\]]+)\]', path)  # (glob's: a ] first is in it)
  if bracketed:
    raise WorkdirError(f'{flag} {folder!r}: {bracketed.group()!r} in its path {path!r}, which '
                       'orbax reads as a glob pattern: the checkpoints would save and never '
                       'read back; name the folders without [ and ]')


_held: dict[str, int] = {}  # the folders this process holds locked: how many times


@contextlib.contextmanager
def locked(folder: str, flag: str | None = None) -> Iterator[None]:
  """Holds <folder>/.lock (flock) while the body runs: a second command on a live run's
  workdir (a job relaunched while the first still runs), or a second sweep on a live sweep's
  --out, would write the same files; it is refused with WorkdirError naming the holder. The
  system releases the lock when the process ends, however it ends (no stale lock after kill
  -9). Held again by the same process (a vectorised group's seeds run one by one), it is
  shared. The holder writes its line into the file and puts the earlier bytes back on release,
  so a command leaves the file as it found it (a killed holder's line stays, and is harmless:
  it is read only while a live holder's line has replaced it). `flag` names the folder in
  messages (by default, as `named` names a run's). Only as strong as the filesystem's flock:
  one that keeps locks per host (gcsfuse, NFS with local_lock) guards each host alone."""
  flag = _flag() if flag is None else flag
  key = os.path.realpath(folder)
  if key in _held:
    _held[key] += 1
    try:
      yield
    finally:
      _held[key] -= 1
    return
  path = os.path.join(folder, LOCK_FILE)
  try:  # flock needs only a handle: read-only where the file is another user's
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
  except IsADirectoryError:
    raise WorkdirError(f'{flag} {folder!r}: {LOCK_FILE} is a folder, where a run keeps its '
                       'lock file; move it away') from None
  except OSError as made:
    try:
      fd = os.open(path, os.O_RDONLY)
    except OSError as e:
      # None to read: why it could not be made is the answer (a read-only mount, say).
      what, e = ('made', made) if e.errno == errno.ENOENT else ('opened', e)
      raise WorkdirError(f'{flag} {folder!r}: its {LOCK_FILE} cannot be {what} '
                         f'({e.strerror or e}); give a folder of your own') from None
  previous = times = None  # the file's bytes (and times) before this holder wrote its line
  try:
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
      if e.errno not in LOCK_HELD_ELSEWHERE:  # no locks here: unguarded, with a warning
        logging.warning('%s: cannot lock %s (%s); a second command on this folder would not be '
                        'refused', folder, LOCK_FILE, e.strerror or e)
      else:
        holder = os.pread(fd, 300, 0).decode('utf-8', 'replace').strip() or 'another process'
        raise WorkdirError(f'{flag} {folder!r} is in use by a running command ({holder}); '
                           'wait for it to end or stop it, or give another folder') from None
    else:
      try:  # who holds it, for the message of a second command; best effort
        stat = os.fstat(fd)
        previous, times = os.pread(fd, stat.st_size, 0), (stat.st_atime_ns, stat.st_mtime_ns)
        line = (f'process {os.getpid()} on {socket.gethostname()}, since '
                f'{datetime.datetime.now().isoformat(timespec="seconds")}\n').encode()
        os.ftruncate(fd, 0)
        os.pwrite(fd, line, 0)
      except OSError:
        pass
    try:
      _held[key] = 1
      yield
    finally:
      _held.pop(key, None)
      # The file's earlier bytes and times come back, so that a command that ends without
      # running (refused, or its run found finished) leaves the file as it was.
      if previous is not None:
        try:
          os.ftruncate(fd, 0)
          os.pwrite(fd, previous, 0)
          os.utime(fd, ns=times)
        except OSError:
          pass
  finally:
    os.close(fd)


def _check_folder(workdir: str) -> None:
  refusal = file_for_folder(workdir, _flag(), "the run's files")
  if refusal:
    raise WorkdirError(refusal)


def _is_run_folder(path: str) -> bool:
  """Whether `path` holds a run: its config.json and metrics.jsonl (either alone may be another
  tool's file)."""
  return all(os.path.isfile(os.path.join(path, n)) for n in (CONFIG_FILE, metrics.METRICS_FILE))


def run_folder_above(path: str) -> str | None:
  """The nearest folder above `path` that holds a run, if any."""
  path = os.path.abspath(path)
  parent = os.path.dirname(path)
  while parent != path:
    if _is_run_folder(parent):
      return parent
    path, parent = parent, os.path.dirname(parent)
  return None


_DEPTH_BELOW = 3  # how deep runs are looked for below a new run's folder (a sweep's are at 2)


def _run_folder_below(folder: str) -> str | None:
  """A folder below `folder` (at most _DEPTH_BELOW down) that holds a run, if any."""
  top = os.path.normpath(folder).count(os.sep)
  for dirpath, dirnames, _ in os.walk(folder):
    if dirpath != folder and _is_run_folder(dirpath):
      return dirpath
    if os.path.normpath(dirpath).count(os.sep) - top >= _DEPTH_BELOW:
      dirnames[:] = []
  return None


_warned_nested: set[str] = set()  # the nested runs of before the rule, said once a process


def _check_not_nested(workdir: str) -> None:
  """Refuses a new run folder inside another run's, or above one: report.py takes a folder
  that holds metrics.jsonl as one run (its subfolders as that run's own), and so would show one
  of the two runs alone, without a word. A run started so before this rule is resumed, with a
  warning: refused, it could only start again elsewhere."""
  above = run_folder_above(workdir)
  why = None
  if above is not None:
    why = (f'{named(workdir)} is inside the folder of another run ({above!r} holds its '
           'config.json and metrics.jsonl): report.py would show that run alone')
  # (A sweep's folder or a dataset is refused as such: _check_kinds.)
  elif os.path.isdir(workdir) and not _is_run_folder(workdir) and not any(
      os.path.exists(os.path.join(workdir, m)) for m in (SWEEP_INDEX, DATASET_MARKER)):
    below = _run_folder_below(workdir)
    if below is not None:
      why = (f'{named(workdir)} holds another run below it ({below!r}): report.py would show '
             'this run alone, not that one')
  if why is not None and started(workdir):
    if os.path.abspath(workdir) not in _warned_nested:  # (checked two or three times a command)
      _warned_nested.add(os.path.abspath(workdir))
      logging.warning('%s; move one of the two runs out, then give its new path', why)
  elif why is not None:
    raise WorkdirError(f'{why}; {another_folder()}')


def _check_kinds(workdir: str) -> None:
  """Raises WorkdirError where `workdir` is another command's folder, or holds one of a run's
  files as a folder or the reverse."""
  # Folders of the other commands: a run written into one would be hidden from report.py
  # (which takes a folder with metrics.jsonl as one run) or mixed with a dataset.
  for marker, what in ((SWEEP_INDEX, "a sweep's folder (launch/sweep.py's --out)"),
                       (DATASET_MARKER, DATASET)):
    if os.path.exists(os.path.join(workdir, marker)):
      # Beside it, not inside: report.py takes every run under a sweep's folder as its own.
      raise WorkdirError(f'{named(workdir)} is {what}; give a folder of its own, e.g. '
                         f'{os.path.normpath(workdir) + "_run"!r}')
  # A run's files of the wrong kind: a file named checkpoints made orbax's saves fail in a
  # background thread and the run hang, after it had restarted from round 0 and cut the rows.
  for name, folder in ((CHECKPOINTS, True), (UNREADABLE, True), (CONFIG_FILE, False),
                       (metrics.METRICS_FILE, False), (metrics.SUMMARY_FILE, False),
                       (LOCK_FILE, False)):
    path = os.path.join(workdir, name)
    if os.path.exists(path) and os.path.isdir(path) != folder:
      raise WorkdirError(f'{named(workdir)}: {name} is a {"file" if folder else "folder"}, '
                         f'where a run keeps its {name} {"folder" if folder else "file"}; '
                         f'move it away, or {another_folder()}')


def too_few_rounds(workdir: str, done: int, num_rounds: int) -> WorkdirError:
  """The refusal of a num_rounds below the round a run's checkpoint stands at."""
  return WorkdirError(f'{named(workdir)} holds a run already at round {done}; '
                      f'config.num_rounds must be at least that, got {num_rounds}')


def check_layout(workdir: str) -> None:
  """Raises WorkdirError where `workdir` cannot hold a run for what it is, whatever the
  config: a URL, a file, another command's folder, a run's file of the wrong kind."""
  check_local(workdir, _flag())
  _check_folder(workdir)
  _check_not_nested(workdir)
  if os.path.isfile(os.path.join(workdir, CONFIG_FILE)):
    _check_kinds(workdir)


def check_before_load(workdir: str, config: ml_collections.ConfigDict,
                      hold: contextlib.ExitStack) -> None:
  """The checks of prepare() that need no data, made before the data load (minutes for a
  large dataset): a URL refused; a run's workdir locked (with `hold`, on the process that
  writes its files), its config compared, and a num_rounds below its newest checkpoint's
  round refused. A refusal changes nothing."""
  check_layout(workdir)  # before the lock: a refusal leaves its holder line
  if os.path.isfile(os.path.join(workdir, CONFIG_FILE)):  # a run's: resumed or relaunched
    check_config(config)  # a bad value said as such, not as another run's config
    check_same_run(workdir, config)
    if _is_writer():
      hold.enter_context(locked(workdir))
    # By the folders' names: were the newest unreadable, the run would fall back to an older
    # one, but the run did reach that round, and asking for fewer is refused all the same.
    newest = newest_step(workdir)
    if newest is not None and newest > config.num_rounds:
      raise too_few_rounds(workdir, newest, config.num_rounds)


def prepare(workdir: str, config: ml_collections.ConfigDict,
            hold: contextlib.ExitStack | None = None) -> None:
  """Creates the workdir, checks that the run it holds is this config's run, and locks it for
  the run (with `hold`: on the process that writes its files, until `hold` closes; a refused
  command leaves even the lock file as it was). A new run's config.json is written here, once
  locked, before any checkpoint or metric, so that run files never exist without it; a resumed
  run's is rewritten by save_config once every check has passed."""
  check_local(workdir, _flag())
  _check_folder(workdir)
  _check_not_nested(workdir)
  try:
    os.makedirs(workdir, exist_ok=True)
  except OSError as e:
    raise WorkdirError(f'{named(workdir)} cannot be created: {e.strerror}') from None
  if not os.access(workdir, os.W_OK | os.X_OK):
    raise WorkdirError(f'{named(workdir)} is not writable')
  _check_kinds(workdir)
  resumed = started(workdir)
  if resumed:
    check_same_run(workdir, config)
  elif _has_results(workdir):
    raise WorkdirError(f'{named(workdir)} holds run files but no {CONFIG_FILE}; '
                       f'{another_folder()}')
  if hold is not None and _is_writer():
    hold.enter_context(locked(workdir))
    # A command that held the lock until just now may have got its run going meanwhile.
    if not resumed and started(workdir):
      resumed = True
      check_same_run(workdir, config)
  if not resumed:
    save_config(workdir, config)


def save_config(workdir: str, config: ml_collections.ConfigDict) -> None:
  """Writes config.json: the run's config as this command gave it (resumable fields, such as
  num_rounds, may differ from the run's first command)."""
  if _is_writer():  # atomically: the other hosts' processes read it meanwhile
    metrics.write_text(os.path.join(workdir, CONFIG_FILE),
                       config.to_json_best_effort(indent=2) + '\n')

"""Reading runs' outputs: a workdir's rows, config and summary, the runs under run and sweep
folders, and their grouping by setting over seeds.

A run is a workdir holding metrics.jsonl (config.json and summary.json when present). Runs in
a sweep live in <sweep>/<setting>/seed=<n>; they are grouped by <setting>, and the sweep's
sweep.json says which seeds a setting should have (those not started, those failed). A
setting's seeds are finished when summarised at the most rounds any of their configs names: a
seed not yet resumed after num_rounds was raised is unfinished, not a shorter finished run.
Imports no JAX: the report command starts without it.
"""

from __future__ import annotations

import array
import dataclasses
import json
import os
import re

import numpy as np

from fathom_sim import metrics
from fathom_sim.config import unread_paths
from fathom_sim import workdir as workdir_lib

_SEED_DIR = re.compile(r'^seed=\d+$')

# Fields a resumed run may change that still change what a table compares, so seeds that
# differ in them are named: rounds to a target are counted in steps of eval_every, a sampled
# evaluation (eval_clients) is not the whole test set's, and TF32 against float32 can send a
# run another way.
MEASURED_ALIKE = frozenset({'eval_every', 'eval_clients', 'matmul_precision'})
# The other fields a resumed run may change: a setting's seeds may differ in them unnamed.
NOT_COMPARED = workdir_lib.RESUMABLE_FIELDS - MEASURED_ALIKE

# The fields of a metrics row that the tables and plots read.
FIELDS = ('round', 'wall_s', 'examples', 'local_steps', 'test_accuracy', 'eta', 'epochs',
          'batch_size', 'h_glob', 'h_local', 'vectorized_seeds')


def _number(value) -> float:
  """A logged value as a float; NaN for null, a missing field or anything not a number."""
  if isinstance(value, (int, float)) and not isinstance(value, bool):
    return float(value)
  return np.nan


class Rows:
  """A run's metrics rows as columns: FIELDS as float64 arrays, NaN where a row has no number.

  Why not the rows' dicts: a week-long run logs millions of rows, ~1 KB each as a dict, and a
  report reads a sweep of such runs; as columns a row takes 80 bytes. float64 holds every
  logged value exactly (JSON numbers are read as float64, rounds and counts are below 2**53).
  """

  def __init__(self, columns: dict[str, np.ndarray], rejected_at_end: int = 0):
    self.columns = columns
    self.rejected_at_end = rejected_at_end  # the rounds rejected in a row at the end

  @classmethod
  def read(cls, path: str) -> 'Rows':
    """The rows of a metrics.jsonl, streamed (metrics.iter_rows: same torn-line rules)."""
    cols = {f: array.array('d') for f in FIELDS}
    rejected = 0
    for row in metrics.iter_rows(path):
      for f, col in cols.items():
        col.append(_number(row.get(f)))
      if 'accepted' in row:
        rejected = 0 if row['accepted'] else rejected + 1
    return cls({f: np.frombuffer(col, np.float64) for f, col in cols.items()}, rejected)

  def __len__(self) -> int:
    return len(self.columns['round'])

  def __getitem__(self, field: str) -> np.ndarray:
    return self.columns[field]

  def last(self, field: str) -> float | None:
    """The last row's value of `field`; None without rows or without a number there."""
    if not len(self):
      return None
    v = float(self.columns[field][-1])
    return None if np.isnan(v) else v

  def row(self, i: int) -> dict:
    """Row i's FIELDS that hold a number."""
    return {f: float(c[i]) for f, c in self.columns.items() if not np.isnan(c[i])}

  def evaluated(self) -> np.ndarray:
    """Indices of the rows holding a test accuracy, in order."""
    return np.flatnonzero(~np.isnan(self.columns['test_accuracy']))

  def by_round(self, field: str, x_field: str = 'round') -> tuple[np.ndarray, np.ndarray,
                                                                  np.ndarray]:
    """(rounds, x, y) of the rows holding both numbers, sorted by round, the last row of a
    round kept where one repeats (as a dict keyed by round would)."""
    r, x, y = self.columns['round'], self.columns[x_field], self.columns[field]
    keep = ~np.isnan(x) & ~np.isnan(y)
    r, x, y = r[keep], x[keep], y[keep]
    order = np.argsort(r, kind='stable')
    r, x, y = r[order], x[order], y[order]
    last = np.r_[r[1:] != r[:-1], True] if len(r) else np.zeros(0, bool)
    return r[last], x[last], y[last]


@dataclasses.dataclass
class RunData:
  """One run's outputs."""
  workdir: str
  setting: str
  config: dict
  rows: Rows
  summary: dict | None
  unreadable: tuple[str, ...] = ()  # its config.json / summary.json, there but not read

  @property
  def algorithm(self) -> str:
    return self.config.get('algorithm', '?')

  @property
  def diverged(self) -> bool:
    """Stopped for good, unfinished: its last config.max_rejected_rounds rounds rejected
    (no finite update), where the run stops (train.py); run again, it stops again."""
    limit = workdir_lib.with_defaults(self.config).get('max_rejected_rounds')
    return (self.summary is None and isinstance(limit, int) and limit > 0
            and self.rows.rejected_at_end >= limit)

  @property
  def total_examples(self) -> int:
    if self.summary and 'total_examples' in self.summary:
      return int(self.summary['total_examples'])
    return int(self.rows.last('examples') or 0)

  @property
  def total_local_steps(self) -> int:
    if self.summary and 'total_local_steps' in self.summary:
      return int(self.summary['total_local_steps'])
    return int(self.rows.last('local_steps') or 0)


@dataclasses.dataclass
class Group:
  """The runs of one setting, one per seed; `listed` the seeds its sweep.json names (0 where
  no sweep.json names the setting), `failed` those of its runs it marks failed, and
  `failed_unstarted` those it marks failed that have no run folder (stopped before a row),
  `gone` those it marks done that have none (moved or deleted since)."""
  setting: str
  runs: list[RunData]
  listed: int = 0
  failed: int = 0
  failed_unstarted: int = 0
  gone: int = 0

  @property
  def config(self) -> dict:
    """The setting's config as its first seed with a readable config.json holds it: a seed's
    torn one does not make the whole setting unknown ({} where none is readable)."""
    return next((r.config for r in self.runs if r.config), {})

  @property
  def algorithm(self) -> str:
    return self.config.get('algorithm', '?')

  @property
  def num_rounds(self) -> int:
    """The rounds the setting runs to: the most that any seed's config names (or logged)."""
    return max(int(r.config.get('num_rounds') or 0) or int(r.rows.last('round') or 0)
               for r in self.runs)

  @property
  def finished(self) -> list[RunData]:
    """The seeds summarised at the setting's num_rounds."""
    return [r for r in self.runs
            if r.summary is not None and r.summary.get('rounds') == self.num_rounds]

  @property
  def plotted(self) -> list[RunData]:
    """The seeds a curve averages: the finished ones, or every seed with rows while none is (a
    curve over the rounds every seed logged would stop where the least advanced seed is, and
    vanish with a seed that has logged none)."""
    return self.finished or [r for r in self.runs if len(r.rows)]

  def differing_fields(self) -> dict[str, list]:
    """Fields, other than the seed and those a resumed run may change, in which the seeds'
    configs differ, with their values: runs grouped by folder that are not one setting."""
    # A run without a config.json says nothing of its config. A field that older code did not
    # write is at its default, as a resume reads it (workdir.read_saved): the same as a newer
    # seed's default, and not the same as another value (model.init 'fedjax' against an older
    # seed, which started from flax's values).
    configs = [workdir_lib.with_defaults(r.config) for r in self.runs if r.config]
    if not configs:
      return {}
    # Fields no seed reads (FATHOM's under FedAvg, ...).
    unread = set.intersection(*(unread_paths(c) for c in configs))
    fields = sorted(set.intersection(*(set(c) for c in configs))
                    - NOT_COMPARED - {'seed'} - unread)
    out = {}
    for f in fields:
      values = [c.get(f) for c in configs]
      if any(v != values[0] for v in values):
        out[f] = sorted({json.dumps(v) for v in values})
    return out


def _kind(value) -> str:
  """A JSON value's kind, ints and floats alike (a float field may be saved as 1)."""
  if isinstance(value, bool) or value is None:
    return type(value).__name__
  return 'number' if isinstance(value, (int, float)) else type(value).__name__


def _config_mistyped(config: dict) -> bool:
  """Whether a config.json field the simulator defines holds another kind of value than its
  default (a string where a number is, a list where a section is): read on, the report
  ended in a traceback."""
  defaults = workdir_lib.defaults()
  sections = {k.rsplit('.', 1)[0] for k in defaults if '.' in k}
  for field, value in workdir_lib.flatten(config).items():
    if field in sections or '.' in field and field.rsplit('.', 1)[0] in defaults:
      return True  # a value in a section's place, or a section in a value's
    default = defaults.get(field)
    # (a path or folder field unset is saved as null: data.path, data.data_dir)
    if default is not None and _kind(value) != _kind(default) and not (
        value is None and isinstance(default, str)):
      return True
  return False


# The summary.json fields the report reads, and the kinds it reads them as.
_SUMMARY_KINDS = {'rounds': ('number',), 'total_examples': ('number',),
                  'total_local_steps': ('number',), 'final': ('dict',),
                  'vectorized_seeds': ('number', 'NoneType')}


def _summary_mistyped(summary: dict) -> bool:
  if any(k in summary and _kind(summary[k]) not in kinds for k, kinds in _SUMMARY_KINDS.items()):
    return True
  final = summary.get('final', {})
  return _kind(final.get('test_accuracy')) not in ('number', 'NoneType')


def _read_json(path: str, mistyped=None) -> tuple[dict | None, bool]:
  """The JSON object in `path` (None where it is missing, torn, not an object or `mistyped`),
  and whether the file is there but could not be read as one."""
  try:
    with open(path, encoding='utf-8') as f:
      value = json.load(f)
  except FileNotFoundError:
    return None, False
  except (OSError, ValueError):
    return None, True
  if not isinstance(value, dict) or mistyped is not None and mistyped(value):
    return None, True
  return value, False


def read_run(workdir: str, setting: str) -> RunData:
  """A run's files. Its summary counts only when it is the summary of the run's rounds: one
  left by a run since extended (num_rounds raised, then stopped) describes fewer rounds."""
  from fathom_sim.data import DataError
  path = os.path.join(workdir, metrics.METRICS_FILE)
  try:
    rows = Rows.read(path)
  except OSError as e:
    raise DataError(f'{path}: cannot read it ({e.strerror or e})') from None
  config, bad_config = _read_json(os.path.join(workdir, workdir_lib.CONFIG_FILE),
                                  _config_mistyped)
  if config is None and not len(rows):
    # Every run writes its config.json before any row: this is some other file, and listing
    # it as a run of algorithm '?' would put an empty setting in every table.
    raise DataError(f'{os.path.join(workdir, metrics.METRICS_FILE)}: no rows of a run, and no '
                    f'readable {workdir_lib.CONFIG_FILE} beside it: not a run\'s workdir. Move '
                    'it out of the folders given, or name the run folders one by one')
  config = config or {}
  summary, bad_summary = _read_json(os.path.join(workdir, metrics.SUMMARY_FILE),
                                    _summary_mistyped)
  if summary is not None:
    rounds = summary.get('rounds')
    if rounds != config.get('num_rounds', rounds) or (len(rows) and rows.last('round') != rounds):
      summary = None
  unreadable = tuple(name for name, bad in ((workdir_lib.CONFIG_FILE, bad_config),
                                            (metrics.SUMMARY_FILE, bad_summary)) if bad)
  return RunData(workdir, setting, config, rows, summary, unreadable)


def find_runs(paths: list[str]) -> list[RunData]:
  """Every run under the given run or sweep folders, in sorted order.

  A run's setting is its folder path below the given one, less a final seed=<n>; a run given
  directly is its own setting. With several folders given, settings are prefixed by the
  folder's name (its path as given when two share a name), and a run or setting folder given
  directly is named by its path as given, less a final seed=<n>: two sweeps' settings of the
  same name stay apart, and the seed folders of one setting given one by one group together.
  """
  from fathom_sim.data import DataError
  runs, seen = [], {}  # a run's real path -> (the folder given that reached it, the path)
  for root, setting_of, dirpath, filenames in _walk(paths):
    if metrics.METRICS_FILE not in filenames:
      continue
    real = os.path.realpath(dirpath)
    if real in seen:  # its seeds would count twice in every mean
      raise DataError(f'{dirpath} is a run under both {seen[real][0]!r} and {root!r}: give '
                      'each run or sweep folder once (a sweep and a folder inside it overlap)')
    seen[real] = (root, dirpath)
    runs.append(read_run(dirpath, setting_of(dirpath)))
  return runs


def _walk(paths: list[str]):
  """(root, setting_of, folder, its file names) for every folder under the folders given, a
  run's own subfolders (checkpoints) left out; a folder that cannot be listed is an error
  (its runs were left out of every mean without a word)."""
  from fathom_sim.data import DataError

  def unlisted(e: OSError):
    raise DataError(f'{e.filename}: cannot list its runs ({e.strerror or e}); make it '
                    'readable, or give the folders beside it one by one')

  for root, setting_of in _roots(paths):
    # Links to folders outside the root are followed: a seed moved to another disk and linked
    # back was left out without a word (its setting '1 of 2 (1 not started)'), and a folder of
    # links to runs had none. Not followed: a link to a folder inside the root (an alias, such
    # as best -> eta=0.1: that folder is walked as itself) and one back to a folder the walk
    # is in (it would never end). A folder reached twice through links is refused: its runs
    # would count twice (and a diamond of links grew the walk exponentially).
    top = os.path.realpath(root)
    inside = {root: frozenset({top})}  # the real folders a path is inside
    walked: dict[str, str] = {}  # real folder -> the path that reached it
    for dirpath, dirnames, filenames in os.walk(root, onerror=unlisted, followlinks=True):
      dirnames.sort(key=natural_key)
      real = os.path.realpath(dirpath)
      if real in walked:
        raise DataError(f'{dirpath} is {walked[real]} again, reached through a link: its runs '
                        'would count twice; remove one of the two links')
      walked[real] = dirpath
      yield root, setting_of, dirpath, filenames
      if metrics.METRICS_FILE in filenames:
        dirnames[:] = []  # a run's own subfolders (checkpoints) hold no runs
        continue
      here = inside.pop(dirpath)
      below = []
      for d in dirnames:
        path = os.path.join(dirpath, d)
        target = os.path.realpath(path)
        alias = os.path.islink(path) and (target == top or target.startswith(top + os.sep))
        if not alias and target not in here:
          below.append(d)
          inside[path] = here | {target}
      dirnames[:] = below


def _roots(paths: list[str]):
  """(root, setting_of) per folder given: setting_of(dirpath) names the setting of a run
  folder under root (find_runs' rules)."""
  roots = [os.path.normpath(p) for p in paths]
  names = [os.path.basename(r) for r in roots]
  if len(set(names)) < len(names):
    names = roots
  for root, name in zip(roots, names):
    prefix = name + '/' if len(paths) > 1 else ''

    def setting_of(dirpath: str, root=root, prefix=prefix) -> str:
      parts = os.path.relpath(dirpath, root).split(os.sep)
      parts = [] if parts == ['.'] else parts
      if parts and _SEED_DIR.match(parts[-1]):
        parts = parts[:-1]
      if parts:
        return prefix + '/'.join(parts)
      # A run or a setting's folder given directly.
      own = os.path.dirname(root) if _SEED_DIR.match(os.path.basename(root)) else root
      return own if len(paths) > 1 else os.path.basename(own)

    yield root, setting_of


def natural_key(name: str) -> list:
  """A sort key that orders the numbers in names by value: cohort_size=20 before =100, and
  eta=1e-05 (a sweep names values with :g) before eta=0.0001."""
  parts = re.split(r'(\d+(?:\.\d+)?(?:e[+-]?\d+)?)', name)
  return [float(p) if i % 2 else p for i, p in enumerate(parts)]


def find_listed(paths: list[str]) -> dict[str, dict[str, int]]:
  """{setting: {'seeds': n, 'failed': k, 'failed_unstarted': j, 'gone': d}} from the
  sweep.json of each sweep under (or around) the folders given: the seeds a sweep runs,
  started or not, those of its run folders it marked failed, those it marked failed that have
  no run folder, and those it marked done that have none (its folder moved or deleted since).
  A setting's seed folders alone cannot tell a seed not started (or whose folder is gone) from
  one never asked for."""
  listed: dict[str, dict[str, int]] = {}
  for index_path, runs in _indexes(paths):
    index = _read_json(index_path)[0]
    if index is None or workdir_lib.sweep_index_problem(index):  # (unreadable_indexes)
      continue
    for e in index['runs']:
      workdir = runs(e.get('workdir'))
      if workdir is None:  # not a run of the folders given
        continue
      counts = listed.setdefault(workdir[0],
                                 {'seeds': 0, 'failed': 0, 'failed_unstarted': 0, 'gone': 0})
      counts['seeds'] += 1
      # (a run is a folder with metrics.jsonl: find_runs)
      ran = os.path.isfile(os.path.join(workdir[1], metrics.METRICS_FILE))
      if e.get('status') == 'failed':
        counts['failed' if ran else 'failed_unstarted'] += 1
      elif e.get('status') == 'done' and not ran:  # it was said 'not started'
        counts['gone'] += 1
  return listed


def unreadable_indexes(paths: list[str]) -> list[str]:
  """The sweep.json files find_listed reads that are there but not readable as a sweep's
  index (it then counts nothing of them)."""
  unread = []
  for index_path, _ in _indexes(paths):
    index, bad = _read_json(index_path)
    if bad or (index is not None and workdir_lib.sweep_index_problem(index)):
      unread.append(index_path)
  return unread


def _indexes(paths: list[str]):
  """(sweep.json path, runs) for the sweeps under the folders given, and the one a folder
  given lies in (a setting of a sweep given alone); runs(entry's workdir) is (its setting, its
  path) for a run of the folders given, else None. (Only the folder given's own sweep.json was
  read: in a folder of sweeps, or given a setting, a sweep's failed and gone seeds vanished.)"""
  found, walked = [], set()
  for root, setting_of, dirpath, filenames in _walk(paths):
    if workdir_lib.SWEEP_INDEX in filenames and metrics.METRICS_FILE not in filenames:
      found.append((os.path.join(dirpath, workdir_lib.SWEEP_INDEX),
                    _sweep_runs(dirpath, setting_of)))
      walked.add(os.path.realpath(dirpath))
  for root, setting_of in _roots(paths):
    top = os.path.realpath(root)
    sweep = _sweep_around(top)
    if sweep is not None and sweep not in walked:  # (a sweep given too: read once)
      found.append((os.path.join(sweep, workdir_lib.SWEEP_INDEX),
                    _sweep_runs(sweep, setting_of, root, top)))
  return found


def _sweep_around(folder: str) -> str | None:
  """The nearest folder above `folder` (a real path) that holds a sweep.json, if any."""
  while os.path.dirname(folder) != folder:
    folder = os.path.dirname(folder)
    if os.path.isfile(os.path.join(folder, workdir_lib.SWEEP_INDEX)):
      return folder
  return None


def _sweep_runs(sweep: str, setting_of, root: str | None = None, top: str | None = None):
  """runs() of _indexes for a sweep's folder: under the folder given (root, at real path top)
  where the sweep holds it, else every run of the sweep."""
  def runs(workdir) -> tuple[str, str] | None:
    if not isinstance(workdir, str):
      return None
    path = os.path.join(sweep, workdir)
    if top is not None:
      # Compared as written below the sweep's real path, not resolved: a seed folder linked
      # to another disk (or a link left dangling) is still one of the folder given.
      path = os.path.normpath(path)
      if path != top and not path.startswith(top + os.sep):
        return None
      path = os.path.normpath(os.path.join(root, os.path.relpath(path, top)))
    return setting_of(path), path
  return runs


def group_runs(runs: list[RunData],
               listed: dict[str, dict[str, int]] | None = None) -> list[Group]:
  """Groups by setting, in first-seen order, with what `listed` (find_listed) says of each."""
  groups: dict[str, Group] = {}
  for run in runs:
    groups.setdefault(run.setting, Group(run.setting, [])).runs.append(run)
  for g in groups.values():
    counts = (listed or {}).get(g.setting, {})
    g.listed, g.failed = counts.get('seeds', 0), counts.get('failed', 0)
    g.failed_unstarted, g.gone = counts.get('failed_unstarted', 0), counts.get('gone', 0)
  return list(groups.values())


def not_started(groups: list[Group],
                listed: dict[str, dict[str, int]]) -> dict[str, dict[str, int]]:
  """find_listed's counts of the settings a sweep.json lists that have no run folder yet."""
  have = {g.setting for g in groups}
  return {s: c for s, c in listed.items() if s not in have}

"""Running a sweep: every (setting, seed) of a sweep file (sweep_def.py), one workdir each,
in this process, with its index `sweep.json` (each run's status, result and seconds) kept as it
goes, and resumed where a command run again finds it.
"""

from __future__ import annotations

import collections
import json
import math
import numbers
import os
import time
from typing import Callable

import ml_collections
from absl import logging

from fathom_sim import metrics
from fathom_sim import workdir as workdir_lib
from fathom_sim.errors import Diverged, InputError, Preempted, file_for_folder, one_line
from fathom_sim.config import ConfigError, unread_fields
from fathom_sim.sweep_def import RunSpec, SweepDef, plan_runs


def _sweep_file(sweep: SweepDef) -> str:
  """The sweep file as sweep.json records it: its name, so that the same sweep run from
  another clone or a moved checkout is still the same; '<inline>' for one built in Python."""
  return os.path.basename(sweep.path) if os.path.isfile(sweep.path) else sweep.path


def run_status(run: RunSpec) -> tuple[str, str | None]:
  """('done' | 'pending' | 'failed', why it failed) of a run before the sweep trains: a run
  already there under another config is reported, never skipped or redone."""
  with workdir_lib.named_as_sweep_runs():
    try:
      # (what training it would refuse, said before: --dry_run lists such a run as failing)
      workdir_lib.check_layout(run.workdir)
      workdir_lib.check_same_run(run.workdir, run.config)
      asked = run.config.num_rounds
      done = metrics.finished_rounds(run.workdir) or 0
      # A run taken further since its summary (num_rounds raised, then stopped) stands at its
      # newest checkpoint: its old summary.json of `asked` rounds is not its state.
      at = max(done, workdir_lib.newest_step(run.workdir) or 0)
      if at > asked:
        # Refused as launch/main.py refuses it: skipped as done, the run's results would be
        # of more rounds than sweep.json says.
        raise workdir_lib.too_few_rounds(run.workdir, at, asked)
      # Taken further and stopped before its next checkpoint: run on, train puts its rows and
      # summary back (summary.of_finished). (Read only here: a run without results
      # and a torn config.json is training's to start afresh, check_same_run's rule.)
      if done == asked and (workdir_lib.read_saved(run.workdir) or {}).get(
          'num_rounds') != asked:
        done = 0
    except workdir_lib.WorkdirError as e:  # (also said where a sweep is stopped: never raised)
      return 'failed', str(e)
  return ('done' if done == asked else 'pending'), None


def is_finished(run: RunSpec) -> bool:
  """True when the run's workdir holds it finished, as run_status judges it."""
  return run_status(run)[0] == 'done'


def _final_accuracy(summary: dict) -> float:
  """The summary's final test accuracy; NaN for a run without test data (JSON's null) and
  for a summary.json damaged by hand (`final` not an object, the accuracy not a number: every
  later sweep command ended in a traceback, or wrote a string into sweep.json)."""
  final = summary.get('final')
  acc = final.get('test_accuracy') if isinstance(final, dict) else None
  return float(acc) if isinstance(acc, numbers.Real) and not isinstance(acc, bool) else math.nan


def read_index(out: str) -> dict | None:
  """The sweep.json of the sweep's folder `out` (None where it has none). One that is not a
  sweep's index (torn, or workdir.sweep_index_problem) is refused: a sweep run again reads its
  entries, and such a one ended in a traceback or was taken for none."""
  path = os.path.join(out, workdir_lib.SWEEP_INDEX)
  try:
    with open(path, encoding='utf-8') as f:
      index = json.load(f)
  except FileNotFoundError:
    return None
  except (OSError, ValueError) as e:
    index, why = None, 'not JSON' if isinstance(e, ValueError) else e.strerror or str(e)
  else:
    why = workdir_lib.sweep_index_problem(index)
  if why is not None:
    raise workdir_lib.WorkdirError(
        f'--out {out!r}: its {workdir_lib.SWEEP_INDEX} cannot be read as a sweep\'s index '
        f'({why}); repair it, or move it aside to start the index afresh (finished runs are '
        'found in their folders; the seconds it recorded are lost), or give another folder')
  return index


def _earlier_entries(out: str) -> dict[str, dict]:
  """The entries of the sweep.json a sweep run again replaces, by run name ({} if none)."""
  return {e['name']: e for e in (read_index(out) or {}).get('runs', ())}


def _result(run: RunSpec) -> dict:
  """A finished run's field in sweep.json: its final accuracy, from its summary."""
  return {'final_test_accuracy': _final_accuracy(metrics.read_summary(run.workdir) or {})}


def _spent_before(run: RunSpec, earlier: dict | None) -> float | None:
  """The seconds earlier sweep commands spent on a run, as its last entry recorded them,
  while its folder holds what they did (a run started afresh owes them nothing); None where
  none is recorded."""
  seconds = (earlier or {}).get('sweep_wall_s')
  if (isinstance(seconds, (int, float)) and not isinstance(seconds, bool)
      and math.isfinite(seconds) and seconds >= 0 and os.path.isdir(run.workdir)):
    return float(seconds)
  return None


def _entry(run: RunSpec, out: str, status: str, spent: float | None = None, **extra) -> dict:
  """A run's entry in sweep.json; `spent`: the seconds sweeps spent on it so far (None: none
  recorded), kept so that a command that goes on with the run adds to them."""
  return {'name': run.name, 'setting': run.setting, 'overrides': run.overrides,
          'seed': run.seed, 'workdir': os.path.relpath(run.workdir, out), 'status': status,
          **extra, **({} if spent is None else {'sweep_wall_s': spent})}


def check_out(sweep: SweepDef, out: str, extra: dict | None = None) -> str:
  """Raises WorkdirError where `out` cannot hold this sweep's runs (a URL, a file, a run's
  workdir, another sweep's folder, this sweep run with other --config overrides `extra`);
  returns the sweep file's name, as sweep.json records it. Changes nothing: run_sweep and
  --dry_run make the same checks."""
  if not out:  # (os.makedirs('') fails, after --dry_run had listed every run to run)
    raise workdir_lib.WorkdirError("--out '' names no folder; give one for the runs and "
                                   'sweep.json')
  workdir_lib.check_local(out, '--out')
  refusal = file_for_folder(out, '--out', 'the runs and sweep.json')
  if refusal:
    raise workdir_lib.WorkdirError(refusal)
  above = workdir_lib.run_folder_above(out)
  if above is not None:
    why = (f'--out {out!r} is inside the folder of a run ({above!r} holds its config.json and '
           'metrics.jsonl): report.py would show that run alone, not the sweep\'s')
    # (A sweep put there before this rule.)
    if os.path.exists(os.path.join(out, workdir_lib.SWEEP_INDEX)):
      logging.warning('%s; move the sweep\'s folder out, then give its new path', why)
    else:
      raise workdir_lib.WorkdirError(f'{why}. Give a folder outside it')
  for name in (workdir_lib.CONFIG_FILE, metrics.METRICS_FILE):
    if os.path.exists(os.path.join(out, name)):
      raise workdir_lib.WorkdirError(
          f'--out {out!r} is a run\'s workdir (it holds {name}); a sweep\'s runs would nest '
          'in it and report.py would show that run alone. Give a folder of its own')
  if os.path.exists(os.path.join(out, workdir_lib.DATASET_MARKER)):  # (as for a --workdir)
    raise workdir_lib.WorkdirError(
        f'--out {out!r} is {workdir_lib.DATASET}: the runs would be mixed with its files. '
        'Give a folder of its own')
  sweep_file = _sweep_file(sweep)
  index_path = os.path.join(out, workdir_lib.SWEEP_INDEX)
  index = read_index(out)
  if index is not None:
    earlier = index.get('sweep')
    if earlier is not None and os.path.basename(str(earlier)) != sweep_file:
      raise workdir_lib.WorkdirError(
          f'--out {out!r} holds the runs of another sweep ({earlier}); its '
          f'{workdir_lib.SWEEP_INDEX} would be replaced and the two sweeps\' runs mixed. Give a '
          f'folder of its own (or, if {sweep_file} is {earlier} renamed, set "sweep" in '
          f'{index_path} to its new name)')
    # The same command again resumes the sweep. Without its --config overrides, each finished
    # run was refused by its workdir, marked failed, and sweep.json forgot the overrides.
    # (Where no run got as far as a result, nothing holds the old ones: workdir.started.)
    recorded = index.get('extra')
    started = isinstance(recorded, dict) and any(
        workdir_lib.started(os.path.join(out, str(e.get('workdir', ''))))
        for e in index['runs'])
    given = json.loads(json.dumps(dict(extra or {}), default=str))  # as sweep.json holds them
    changed = _changed_fields(sweep, out, recorded, dict(extra or {})) if started else []
    if changed:
      def said(overrides: dict) -> str:
        return ' '.join(f'--config.{k}=' + (','.join(map(str, v)) if isinstance(v, list) else
                                             str(v))
                        for k, v in sorted(overrides.items())) or 'none'
      raise workdir_lib.WorkdirError(
          f'--out {out!r} holds this sweep run with the overrides {said(recorded)}, and this '
          f'command gives {said(given)}: {", ".join(changed)} would change its runs\' results '
          '(their workdirs would refuse them). Give the same overrides (those a resumed run may '
          'change, such as num_rounds, excepted), or another --out')
  return sweep_file


def _changed_fields(sweep: SweepDef, out: str, recorded: dict, given: dict) -> list[str]:
  """The fields that change some run's result between the sweep's runs under the --config
  overrides `recorded` (in sweep.json) and `given`: not those a resumed run may change, nor
  those set to the value the runs had anyway (a default), nor those a run does not read."""

  def fields(runs: list[RunSpec]) -> list[dict]:
    return [workdir_lib.flatten(workdir_lib.config_dict(r.config)) for r in runs]
  try:
    before, after = fields(plan_runs(sweep, out, recorded)), fields(plan_runs(sweep, out, given))
  except ConfigError:  # (overrides this simulator no longer takes: compared as written)
    given = json.loads(json.dumps(given, default=str))  # as sweep.json holds them
    return sorted(k for k in set(recorded) | set(given)
                  if k not in workdir_lib.RESUMABLE_FIELDS and recorded.get(k) != given.get(k))
  return sorted({k for b, a in zip(before, after, strict=True)
                 for k in workdir_lib.differing(b, a, workdir_lib.RESUMABLE_FIELDS)})


def run_sweep(sweep: SweepDef, out: str, *, extra: dict | None = None,
              train: Callable[[ml_collections.ConfigDict, str], dict] | None = None,
              train_group: Callable[[list, list], list[dict]] | None = None,
              vmap_seeds: bool = False, log: Callable[[str], None] = print) -> list[dict]:
  """Runs every unfinished run in order, in this process; returns the index entries.

  Finished runs are skipped; an unfinished one resumes through train_and_evaluate's own
  resume. With `vmap_seeds`, a setting's unfinished seeds run together as one vectorised
  program (train.train_seeds). A run failing on bad input is marked 'failed' and the sweep
  goes on; a preemption (SIGTERM) stops the sweep after its runs checkpointed.
  """
  from fathom_sim import train as train_lib
  train = train or train_lib.train_and_evaluate
  train_group = train_group or train_lib.train_seeds
  runs = plan_runs(sweep, out, extra)
  sweep_file = check_out(sweep, out, extra)
  try:
    os.makedirs(out, exist_ok=True)
  except OSError as e:
    raise workdir_lib.WorkdirError(f'--out {out!r}: the sweep\'s folder cannot be made there '
                                 f'({e.strerror or e}); give a writable place') from None
  # A second sweep on this --out while this one runs would rewrite sweep.json and take runs
  # it has not reached: refused, as a second command on a live run's workdir is.
  with workdir_lib.locked(out, '--out'), workdir_lib.named_as_sweep_runs():
    return _run_all(sweep, out, runs, sweep_file, extra=extra, train=train,
                    train_group=train_group, vmap_seeds=vmap_seeds, log=log)


def _run_all(sweep: SweepDef, out: str, runs: list[RunSpec], sweep_file: str, *,
             extra: dict | None, train: Callable, train_group: Callable, vmap_seeds: bool,
             log: Callable[[str], None]) -> list[dict]:
  """run_sweep's body, once its folder is made and locked."""
  index = _Index(sweep, out, runs, sweep_file, extra)
  pending = collections.deque(_batches(index, vmap_seeds, log))
  index.save()
  # A dataset error (files missing or unreadable when opened, examples that do not fit the
  # model) of one run is every run's with the same data and model: those are marked failed
  # with it, not tried again. An error in a round (a damaged record) may be one seed's alone.
  data_errors: dict[str, str] = {}
  told: set[str] = set()  # the settings whose unread fields were said
  while pending:
    batch = pending.popleft()
    first = runs[batch[0]]
    where = (f'[{batch[0] + 1}/{len(runs)}]' if len(batch) == 1
             else f'[{batch[0] + 1}-{batch[-1] + 1}/{len(runs)}]')
    if len(batch) == 1 and is_finished(first):
      # A seed of a vectorised group that failed: the group finished it before failing. Its
      # entry says what a run finished here says (its seconds charged with the group's).
      index.set(batch[0], 'done', **_result(first))
      log(f'{where} {first.name}: finished already')
      index.save()
      continue
    names = ', '.join(runs[i].name for i in batch)
    known = data_errors.get(_data_key(first))
    if known is not None:
      for i in batch:
        index.set(i, 'failed', error=known)
      log(f'{where} {names}: failed, not tried: the same data as a run that failed')
      index.save()
      continue
    log(f'{where} {names}: running' + (f' ({len(batch)} seeds vectorised)'
                                      if len(batch) > 1 else ''))
    if first.setting not in told:  # once per setting: its seeds set the same fields
      told.add(first.setting)
      unread = unread_fields(first.config, [*sweep.fixed, *first.overrides, *(extra or {})])
      if unread:
        log(f'{where} {first.setting}: set by the sweep but not read by its runs: '
            + '; '.join(unread))
    again = _run_batch(batch, index, where, train=train, train_group=train_group,
                       data_errors=data_errors, log=log)
    pending.extendleft(reversed(again))
  return index.entries


class _Index:
  """sweep.json as this command keeps it: an entry per run it plans (its status, error or
  result, and the seconds sweeps spent on it) and the entries of the runs it does not plan,
  kept as they were; saved whole at each change."""

  def __init__(self, sweep: SweepDef, out: str, runs: list[RunSpec], sweep_file: str,
               extra: dict | None):
    self.out, self.runs = out, runs
    earlier = _earlier_entries(out)
    # The seconds sweeps spent on each run: those of earlier commands, and this one's added as
    # each batch ends (a vectorised group's split among its seeds). A run stopped and resumed,
    # or extended, had the last command's seconds alone; a group's seeds each had the group's.
    self.spent = [_spent_before(r, earlier.get(r.name)) for r in runs]
    self.entries = []
    for i, r in enumerate(runs):
      status, error = run_status(r)
      if status == 'done':  # its result kept: a sweep run again rewrites sweep.json
        self.entries.append(_entry(r, out, status, self.spent[i], **_result(r)))
      else:
        self.entries.append(_entry(r, out, status, self.spent[i],
                                   **({} if error is None else {'error': error})))
    # Runs of this folder that this command does not plan (settings since taken out of the
    # sweep file, fewer --seeds) stay listed while they are runs (their metrics.jsonl, as
    # report.py finds them): report.py counts their seeds all the same, and sweep.json keeps
    # what it knew of them. One a killed sweep left 'running' is no longer run by any.
    planned = {r.name for r in runs}
    self.kept = [{**e, 'status': 'pending'} if e.get('status') == 'running' else e
                 for name, e in earlier.items() if name not in planned
                 and isinstance(e.get('workdir'), str)
                 and os.path.isfile(os.path.join(out, e['workdir'], metrics.METRICS_FILE))]
    self.header = {'sweep': sweep_file, 'config': sweep.config_source, 'fixed': sweep.fixed,
                   'extra': dict(extra or {}), 'seeds': sweep.seeds}

  def status(self, i: int) -> str:
    return self.entries[i]['status']

  def set(self, i: int, status: str, **extra) -> None:
    """Run i's entry, with the seconds spent on it so far."""
    self.entries[i] = _entry(self.runs[i], self.out, status, self.spent[i], **extra)

  def charge(self, batch: list[int], seconds: float) -> None:
    """Adds a batch's seconds to its runs, split evenly among them."""
    for i in batch:
      self.spent[i] = (self.spent[i] or 0.0) + seconds / len(batch)

  def save(self) -> None:
    metrics.write_json(os.path.join(self.out, workdir_lib.SWEEP_INDEX),
                       {**self.header, 'runs': self.entries + self.kept})


def _batches(index: _Index, vmap_seeds: bool, log: Callable[[str], None]) -> list[list[int]]:
  """The runs to train, by index, in batches trained together: one run each, or with
  `vmap_seeds` a setting's pending seeds. Says those not trained (done, or failed already)."""
  runs, batches = index.runs, []
  for i, run in enumerate(runs):
    if index.status(i) == 'done':
      log(f'[{i + 1}/{len(runs)}] {run.name}: finished already, skipped')
    elif index.status(i) == 'failed':
      log(f'[{i + 1}/{len(runs)}] {run.name}: failed: {index.entries[i]["error"]}')
    elif vmap_seeds and batches and runs[batches[-1][0]].setting == run.setting:
      batches[-1].append(i)
    else:
      batches.append([i])
  return batches


def _data_key(run: RunSpec) -> str:
  """What runs of the same data and model share (one folder, however each run's config.json
  spells it)."""
  data = {k: workdir_lib.canonical(f'data.{k}', v) for k, v in run.config.data.items()}
  return json.dumps([data, run.config.model.to_dict()], sort_keys=True, default=str)


def _run_batch(batch: list[int], index: _Index, where: str, *, train: Callable,
               train_group: Callable, data_errors: dict[str, str],
               log: Callable[[str], None]) -> list[list[int]]:
  """Trains a batch (a run, or a setting's seeds as one program) and records how each of its
  runs ended; returns the batches to run next (the seeds of a group, one by one). A signal,
  or an error that is no run's own, is raised on once sweep.json says it."""
  runs, start, charged = index.runs, time.time(), False
  try:
    try:
      # (Inside: a SIGTERM just after this save leaves the runs 'interrupted', not 'running'.)
      for i in batch:
        index.set(i, 'running')
      index.save()
      try:
        if len(batch) == 1:
          summaries = [train(runs[batch[0]].config, runs[batch[0]].workdir)]
        else:
          summaries = train_group([runs[i].config for i in batch],
                                  [runs[i].workdir for i in batch])
      finally:
        charged = True
        index.charge(batch, time.time() - start)
      for i, summary in zip(batch, summaries):
        _done(index, i, summary, log)
      index.save()  # (inside too: a SIGTERM before this save left the runs 'running')
      return []
    except Diverged as e:
      return _after_divergence(batch, index, e, where, log)
    except InputError as e:  # a config's, the data's or a workdir's
      return _after_bad_input(batch, index, e, where, data_errors, log)
  except BaseException as e:  # (a signal in a handler above too: none left 'running')
    if not charged:
      index.charge(batch, time.time() - start)
    _after_stop(batch, index, e, log)
    raise


def _done(index: _Index, i: int, summary: dict, log: Callable[[str], None]) -> None:
  acc = _final_accuracy(summary)
  index.set(i, 'done', final_test_accuracy=acc)
  log(f'[{i + 1}/{len(index.runs)}] {index.runs[i].name}: done, final test accuracy {acc:.4f}')


def _after_divergence(batch: list[int], index: _Index, e: Diverged, where: str,
                      log: Callable[[str], None]) -> list[list[int]]:
  """The runs that diverged fail; of a group run one by one (its seeds' checkpoints stood at
  different rounds), the seeds finished stay done and those not reached run again, alone."""
  again = []
  for i in batch:
    run = index.runs[i]
    if run.workdir in e.workdirs:
      index.set(i, 'failed', error=str(e))
      log(f'{where} {run.name}: failed: {e}')
    elif is_finished(run):  # its seeds went on
      _done(index, i, metrics.read_summary(run.workdir) or {}, log)
    else:
      index.set(i, 'pending')
      again.append([i])
  index.save()
  return again


def _after_bad_input(batch: list[int], index: _Index, e: InputError, where: str,
                     data_errors: dict[str, str], log: Callable[[str], None]) -> list[list[int]]:
  """The batch's runs fail with the error; but a group's seeds run again one by one where the
  error may be one seed's alone."""
  from fathom_sim import failures
  from fathom_sim.data import DataError, DatasetError
  names = ', '.join(index.runs[i].name for i in batch)
  seeds_own = isinstance(e, (failures.OutOfMemory, workdir_lib.WorkdirError)) or (
      isinstance(e, DataError) and not isinstance(e, DatasetError))
  if len(batch) > 1 and seeds_own:
    # One seed's bad input (a damaged metrics.jsonl, a workdir of another run), or a group
    # too big for the devices, is no reason to fail its siblings: each seed runs alone and
    # fails or finishes by itself. (A config error is every seed's alike.)
    log(f'{where} {names}: failed vectorised ({e}); running these seeds one by one')
    for i in batch:
      index.set(i, 'pending')
    index.save()
    return [[i] for i in batch]
  for i in batch:
    index.set(i, 'failed', error=str(e))
  log(f'{where} {names}: failed: {e}')
  if isinstance(e, DatasetError):
    data_errors[_data_key(index.runs[batch[0]])] = str(e)
  index.save()
  return []


def _after_stop(batch: list[int], index: _Index, e: BaseException,
                log: Callable[[str], None]) -> None:
  """The runs of a batch stopped by a signal are 'interrupted', by anything else (a full
  disk, an error of the simulator's own) 'failed' with it; a seed the group (or its
  one-by-one fallback) finished stays done, with its result (a SIGTERM in its last round lost
  both). Those a handler already said are left as it said them."""
  stopped = isinstance(e, (KeyboardInterrupt, Preempted))
  for i in batch:
    run = index.runs[i]
    if index.status(i) != 'running':
      continue
    if is_finished(run):
      _done(index, i, metrics.read_summary(run.workdir) or {}, log)
    elif stopped:
      index.set(i, 'interrupted')
    else:
      index.set(i, 'failed', error=one_line(e))
  index.save()

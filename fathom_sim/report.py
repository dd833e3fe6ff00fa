"""The report's statistics and tables: cost to each target per setting, mean ± std over seeds,
and each FedAvg grid's best setting against the FATHOM settings run alike.

The runs come from results.py (find_runs, group_runs). Means are over the seeds that reached a
target; std is the sample std (n - 1), absent for one value.
"""

from __future__ import annotations

import json
import os
import statistics

import numpy as np

from fathom_sim import metrics
from fathom_sim.config import unread_paths
from fathom_sim.results import NOT_COMPARED, Group, Rows, RunData
from fathom_sim import workdir as workdir_lib


def first_reaching(rows: Rows, target: float) -> dict | None:
  """The first row whose test accuracy is at least `target` (its FIELDS); None when none is."""
  return next((row for row in map(rows.row, rows.evaluated()) if metrics.reaches(row, target)),
              None)


def mean_std(values: list[float]) -> tuple[float | None, float | None]:
  """(mean, sample std); (None, None) for no values, std None for one value."""
  if not values:
    return None, None
  return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def to_target(group: Group, target: float) -> dict:
  """Rounds, examples and local steps to first reach `target`, mean and std over seeds."""
  hits = [first_reaching(r.rows, target) for r in group.runs]
  reached = [h for h in hits if h is not None]
  # A seed its sweep lists but not started has not reached it either.
  out = {'reached': len(reached), 'seeds': max(len(hits), group.listed)}
  for key, field in (('rounds', 'round'), ('examples', 'examples'),
                     ('local_steps', 'local_steps')):
    # A row without the field (hand-made, older) leaves the mean unknown, not of fewer seeds.
    values = [h[field] for h in reached if field in h]
    out[key] = mean_std(values) if len(values) == len(reached) else (None, None)
  return out


def final_accuracy(group: Group) -> tuple[float | None, float | None]:
  """Mean and std over the finished seeds of the final test accuracy (their summaries': the
  whole test set at the last round). While no seed has finished, over every seed's last
  evaluation row instead (see last_evaluated); the two are never mixed."""
  if not group.finished:
    return last_evaluated(group)
  finals = [(r.summary.get('final') or {}).get('test_accuracy') for r in group.finished]
  return mean_std([v for v in finals if v is not None])  # None: no test examples


def last_evaluated(group: Group) -> tuple[float | None, float | None]:
  """Mean and std over seeds of the test accuracy of each one's last evaluation row (sampled
  test clients, when eval_clients is set, at whatever round it stands)."""
  values = []
  for run in group.runs:
    evals = run.rows.evaluated()
    if len(evals):
      values.append(float(run.rows['test_accuracy'][evals[-1]]))
  return mean_std(values)


def seconds_per_round(group: Group) -> dict[int, float]:
  """Median wall-clock seconds between consecutive rows, over all seeds (compiles excluded
  by the median, evaluation rounds included), by how many seeds the program that wrote a row
  ran at once (1 alone): a vectorised group's rows keep its clock, a round of all its seeds.
  A seed run partly in a group and partly alone has both."""
  gaps: dict[int, list] = {}
  for run in group.runs:
    rounds, wall = run.rows['round'], run.rows['wall_s']
    shared = run.rows['vectorized_seeds']
    if np.isnan(shared).all():  # (rows from before the field: the summary says, where there)
      shared = np.full(len(shared), (run.summary or {}).get('vectorized_seeds') or 1, float)
    shared = np.where(np.isfinite(shared) & (shared >= 1), shared, 1)[1:]  # (a hand-edited
    # inf or 0 counts as alone)
    step = np.diff(wall)
    keep = (np.diff(rounds) == 1) & ~np.isnan(step)
    for k in np.unique(shared[keep]):
      gaps.setdefault(max(int(k), 1), []).append(step[keep & (shared == k)])
  return {k: float(np.median(np.concatenate(v))) for k, v in sorted(gaps.items())}


def best_fedavg(groups: list[Group], target: float) -> Group | None:
  """The FedAvg setting reaching `target` on the largest share of its seeds, then in the fewest
  mean rounds, then with the fewest mean examples (rounds tie often: evaluations come every
  eval_every)."""
  best, best_key = None, None
  for g in groups:
    if g.algorithm != 'fedavg':
      continue
    t = to_target(g, target)
    if not t['reached']:
      continue
    key = (-t['reached'] / t['seeds'], t['rounds'][0], t['examples'][0] or 0)
    if best_key is None or key < best_key:
      best, best_key = g, key
  return best


def grid_cost(groups: list[Group]) -> tuple[int, int, int]:
  """(examples, local steps, runs) summed over every FedAvg run: what the grid search cost."""
  runs = [r for g in groups if g.algorithm == 'fedavg' for r in g.runs]
  return (sum(r.total_examples for r in runs), sum(r.total_local_steps for r in runs),
          len(runs))


# What a static FedAvg grid searches over (and FATHOM starts from): settings differing in these
# alone are one grid. FATHOM's own fields are left out by unread_paths.
GRID_FIELDS = frozenset({'algorithm', 'eta', 'epochs', 'batch_size', 'seed'})


def same_runs(groups: list[Group]) -> list[list[RunData]]:
  """Runs of one config, its seed included, found in several folders: what the sweep takes for
  one run (workdir.config_fingerprint: every field it reads alike), whose copies each count
  as a run of their own (three copies in a setting: '3 seeds', std 0; in two settings of a
  FedAvg grid, twice in its cost)."""
  by_key: dict[str, list[RunData]] = {}
  for g in groups:
    for r in g.runs:
      if r.config:
        key = workdir_lib.flat_fingerprint(workdir_lib.with_defaults(r.config))
        by_key.setdefault(key, []).append(r)
  return [runs for runs in by_key.values() if len(runs) > 1]


def _grid_key(group: Group) -> tuple:
  flat = workdir_lib.with_defaults(group.config)
  # alpha too: FedAvg reads it only for the h_glob it logs, its model is the same at any alpha.
  drop = (GRID_FIELDS | {'alpha'} | NOT_COMPARED | unread_paths({**flat, 'algorithm': 'fedavg'}))
  return tuple(sorted((f, json.dumps(v, sort_keys=True)) for f, v in flat.items()
                      if f not in drop))


def grids(groups: list[Group]) -> tuple[list[tuple[str, list[Group], list[Group]]],
                                        list[Group]]:
  """([(label, FedAvg settings, FATHOM settings)], FATHOM settings in no grid): the FedAvg
  settings that differ in eta, E and B alone are one grid search, compared with the FATHOM
  settings run alike in every other field (the same cohort size, model, data, ...). label
  names the fields in which the grids differ ('' for a single grid)."""
  keys = {g.setting: _grid_key(g) for g in groups if g.algorithm in ('fedavg', 'fathom')}
  order = list(dict.fromkeys(keys[g.setting] for g in groups if g.algorithm == 'fedavg'))
  values = [dict(k) for k in order]
  varying = sorted({f for v in values for f in v if any(w.get(f) != v[f] for w in values)})
  out = []
  for key, v in zip(order, values):
    label = ', '.join(f'{f}={json.loads(v[f]) if f in v else "—"}' for f in varying)
    out.append((label, [g for g in groups if g.algorithm == 'fedavg' and keys[g.setting] == key],
                [g for g in groups if g.algorithm == 'fathom' and keys[g.setting] == key]))
  alone = [g for g in groups if g.algorithm == 'fathom' and keys[g.setting] not in order]
  return out, alone


def _fmt(ms: tuple[float | None, float | None], big: bool = False) -> str:
  mean, std = ms
  if mean is None:
    return '—'
  f = (lambda v: f'{v:,.0f}') if big else (lambda v: f'{v:.1f}')
  return f(mean) if std is None else f'{f(mean)} ± {f(std)}'


def _fmt_acc(ms: tuple[float | None, float | None]) -> str:
  mean, std = ms
  if mean is None:
    return '—'
  return f'{mean:.3f}' if std is None else f'{mean:.3f} ± {std:.3f}'


def _reached_note(r: dict) -> str:
  return '' if r['reached'] in (0, r['seeds']) else f' ({r["reached"]}/{r["seeds"]})'


def markdown(groups: list[Group], targets: list[float], *, timing: bool = True,
             not_started: dict[str, dict[str, int]] | None = None,
             unread_indexes: list[str] | None = None) -> str:
  """The report's tables: cost to each target per setting; per FedAvg grid, its best setting
  and total cost against the FATHOM settings run alike.

  timing=False leaves out the seconds-per-round column, so that the tables are a function of
  the runs' results alone (a rerun with the same seeds gives the same bytes). not_started:
  the settings a sweep lists that have no run yet (see not_started); unread_indexes: the
  sweep.json files that could not be read (unreadable_indexes).
  """
  lines = ['| setting | algorithm | seeds | final test accuracy |' + (' s/round |' * timing)
           + ''.join(f' rounds to {t:g} | examples to {t:g} | local steps to {t:g} |'
                     for t in targets),
           '| --- | --- | --- | --- |' + ' --- |' * timing + ' --- | --- | --- |' * len(targets)]
  for g in groups:
    unfinished = len(g.runs) - len(g.finished)
    failed = min(g.failed, unfinished)
    # Diverged and stopped, beyond those the sweep marked failed (which a sweep's diverged
    # runs are): they were said 'unfinished', as if running them again would go on.
    diverged = min(max(sum(r.diverged for r in g.runs) - failed, 0), unfinished - failed)
    missing = max(g.listed - len(g.runs), 0)
    failed_unstarted = min(g.failed_unstarted, missing)
    gone = min(g.gone, missing - failed_unstarted)
    notes = [f'{n} {what}' for n, what in (
        (unfinished - failed - diverged, 'unfinished'),
        (diverged, 'diverged: stopped by max_rejected_rounds'),
        (failed + failed_unstarted, 'failed'),
        (missing - failed_unstarted - gone, 'not started'),
        (gone, 'done but its folder gone')) if n]
    seeds = (str(len(g.runs)) + (f' of {g.listed}' if missing else '')
             + (f' ({", ".join(notes)})' if notes else ''))
    final = _fmt_acc(final_accuracy(g))
    if unfinished or missing:
      final += ' (last evals)' if not g.finished else f' ({len(g.finished)} finished)'
    cells = [f'`{g.setting}`', g.algorithm, seeds, final]
    if timing:
      # Seeds run as one vectorised program log the group's clock: a round of all of them.
      cells.append('; '.join(f'{s:.3f}' + (f' ({k} seeds at once)' if k > 1 else '')
                             for k, s in seconds_per_round(g).items()) or '—')
    for t in targets:
      r = to_target(g, t)
      cells += [_fmt(r['rounds']) + _reached_note(r), _fmt(r['examples'], True),
                _fmt(r['local_steps'], True)]
    lines.append('| ' + ' | '.join(cells) + ' |')
  lines.append('')
  lines.append('Means and sample std over the seeds that reached the target; (k/n): only k of '
               'n seeds reached it; —: none did.'
               + (' s/round: median seconds between rounds; "(k seeds at once)": a round of k '
                  'seeds run as one program, apart from their rounds run alone.' if timing
                  else '')
               + ' Unfinished runs count with the rounds they have. Final test accuracy: the '
               'finished seeds\' (whole test set, last round); "last evals": no seed has '
               'finished, each seed\'s last evaluation instead.')
  if not_started:
    def seeds(c: dict) -> str:
      n, failed, gone = c['seeds'], c.get('failed_unstarted', 0), c.get('gone', 0)
      return (f'{n} seed{"s" * (n > 1)}' + (f', {failed} failed' if failed else '')
              + (f', {gone} done but its folder gone' if gone else ''))
    lines += ['', 'No run folder (listed in sweep.json): '
              + ', '.join(f'`{s}` ({seeds(c)})' for s, c in not_started.items()) + '.']
  rounds = {g.setting: g.num_rounds for g in groups}
  if len(set(rounds.values())) > 1:
    lines += ['', 'Warning: the settings run to different numbers of rounds ('
              + '; '.join(f'{n}: ' + ', '.join(f'`{s}`' for s, r in rounds.items() if r == n)
                          for n in sorted(set(rounds.values())))
              + '): a target not reached may only not have been reached yet.']
  damaged = [os.path.join(r.workdir, f) for g in groups for r in g.runs for f in r.unreadable]
  damaged += unread_indexes or []
  if damaged:
    lines += ['', 'Warning: files there but not readable as a JSON object (torn, or a field '
              'holding another type of value than a run writes there), taken as missing '
              '(config.json: the run\'s own settings unknown, its setting\'s taken from its '
              'other seeds; summary.json: the run unfinished; sweep.json: the seeds not started '
              'and those failed not counted): '
              + ', '.join(f'`{path}`' for path in damaged) + '.']
  same = same_runs(groups)
  if same:
    lines += ['', 'Warning: runs of one config and seed, each counted as a run of its own (a '
              'copy, or `--config.seed` left out of a seed\'s command): '
              + '; '.join(', '.join(f'`{r.workdir}`' for r in runs) for runs in same[:5])
              + (f'; and {len(same) - 5} more such sets' if len(same) > 5 else '')
              + '. Each copy counts in its setting\'s seeds and in a grid\'s cost as a run '
              'of its own.']
  for g in groups:
    differ = g.differing_fields()
    if differ:
      lines.append('')
      lines.append(f'Warning: the runs of `{g.setting}` differ in '
                   + '; '.join(f'{f} ({", ".join(v)})' for f, v in differ.items())
                   + ': they are not seeds of one setting measured alike.')
  found, alone = grids(groups)
  for label, fedavg, fathom in found:
    lines += _grid_table(label, fedavg, fathom, targets)
  if found and alone:
    grid_keys = [dict(_grid_key(fedavg[0])) for _, fedavg, _ in found]
    lines += ['', 'FATHOM settings run unlike every FedAvg grid (in a field other than eta, '
              'E and B), so compared with none: '
              + ', '.join(f'`{g.setting}` ({_unlike(g, grid_keys)})' for g in alone) + '.']
  return '\n'.join(lines) + '\n'


def _unlike(group: Group, grid_keys: list[dict]) -> str:
  """The fields in which a FATHOM setting differs from the FedAvg grid nearest it (the one
  it differs from in fewest fields), with both values."""
  mine = dict(_grid_key(group))
  diffs = [{f: (mine.get(f), key.get(f)) for f in sorted(set(mine) | set(key))
            if mine.get(f) != key.get(f)} for key in grid_keys]
  nearest = min(diffs, key=len)
  said = lambda v: '—' if v is None else json.loads(v)  # noqa: E731
  return ('; '.join(f'{f} {said(a)}, the grid\'s {said(b)}' for f, (a, b) in
                    list(nearest.items())[:4])
          + (f'; and {len(nearest) - 4} more' if len(nearest) > 4 else ''))


def _grid_table(label: str, fedavg: list[Group], fathom: list[Group],
                targets: list[float]) -> list[str]:
  examples, steps, n_runs = grid_cost(fedavg)
  lines = ['', f'FedAvg grid search{f" ({label})" if label else ""}: {n_runs} runs, '
           f'{examples:,} examples and {steps:,} local steps in all. Its best setting per '
           'target is chosen on the same test accuracy the table reports (no validation '
           'split): an optimistic baseline.', '',
           '| target | best static FedAvg | its rounds | its examples | its local steps |'
           + ''.join(f' `{g.setting}` rounds | `{g.setting}` examples | `{g.setting}` '
                     'local steps |' for g in fathom),
           '| --- | --- | --- | --- | --- |' + ' --- | --- | --- |' * len(fathom)]
  for t in targets:
    best = best_fedavg(fedavg, t)
    if best is None:
      cells = [f'{t:g}', 'none reached it', '—', '—', '—']
    else:
      r = to_target(best, t)
      cells = [f'{t:g}', f'`{best.setting}`' + _reached_note(r), _fmt(r['rounds']),
               _fmt(r['examples'], True), _fmt(r['local_steps'], True)]
    for g in fathom:
      r = to_target(g, t)
      cells += [_fmt(r['rounds']) + _reached_note(r), _fmt(r['examples'], True),
                _fmt(r['local_steps'], True)]
    lines.append('| ' + ' | '.join(cells) + ' |')
  return lines

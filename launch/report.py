"""Writes a report of runs and sweeps: PNG plots and a Markdown table.

  python launch/report.py runs/eta runs/fedavg_grid --out=reports/eta --targets=0.3,0.4

Writes <out>/report.md (cost to each target per setting, mean ± std over seeds; the FedAvg
grid's best setting per target and its total cost), accuracy.png, hparams.png and, where a
FedAvg grid run alike with FATHOM settings reached a target, fathom_vs_fedavg.png (said when
not).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402

from launch import cli  # noqa: E402

_OUT = flags.DEFINE_string('out', None, 'Folder for report.md and the PNGs.')
_TARGETS = flags.DEFINE_list('targets', ['0.3', '0.4'], 'Target test accuracies.')
_TIMING = flags.DEFINE_bool('timing', True, 'Include seconds per round (--notiming: tables '
                            'that depend on the runs\' results alone, for comparing reruns).')


def main(argv):
  from fathom_sim import metrics, plots, report, results
  from fathom_sim.errors import (EXIT_FAILED, MOUNT_HINT, OutputError, file_for_folder, is_url,
                                 tilde_left)
  paths = argv[1:]
  if not paths:
    cli.fail('name at least one run or sweep folder')
  missing = [p for p in paths if not os.path.isdir(p)]
  if missing:
    hint = f'; for a URL, {MOUNT_HINT}' if any(is_url(p) for p in missing) else ''
    cli.fail(f'no such folder: {", ".join(missing)}{hint}')
  try:
    targets = [float(t) for t in _TARGETS.value]
  except ValueError:
    targets = []
  if not targets or not all(0 < t <= 1 for t in targets):
    cli.fail(f'--targets must be test accuracies in (0, 1], got {",".join(_TARGETS.value)!r}')
  if len(set(targets)) < len(targets):  # (each column and best-setting row twice over)
    cli.fail(f'--targets names a target twice ({",".join(_TARGETS.value)!r}); give each once')
  if len({f'{t:g}' for t in targets}) < len(targets):  # (the tables name a target so)
    cli.fail(f'--targets {",".join(_TARGETS.value)!r}: two targets share their first 6 '
             'digits, the columns\' names; give targets that differ within them')
  out = _OUT.value
  if is_url(out):
    cli.fail(f'--out {out!r} is a URL, and reports are written through the filesystem; '
             f'{MOUNT_HINT}')
  refusal = (tilde_left(out, '--out', made=True)
             or file_for_folder(out, '--out', 'report.md and the PNGs'))
  if refusal:
    cli.fail(refusal)
  # Before any is written: the plots come first, and were replaced when report.md then failed.
  folders = [n for n in ('report.md', plots.ACCURACY_PNG, plots.HPARAMS_PNG, plots.VERSUS_PNG)
             if os.path.isdir(os.path.join(out, n))]
  if folders:
    are = 'is a folder' if len(folders) == 1 else 'are folders'
    cli.fail(f'--out {out!r}: {", ".join(folders)} {are}, where the report writes a file; '
             'move it away or give another --out')
  from fathom_sim.data import DataError
  try:
    listed = results.find_listed(paths)
    groups = results.group_runs(results.find_runs(paths), listed)
  except DataError as e:  # a run's metrics.jsonl that is not a run's
    cli.fail(str(e))
  if not groups:
    cli.fail(f'no runs (folders with metrics.jsonl) under {", ".join(paths)}')
  table = report.markdown(groups, targets, timing=_TIMING.value,
                          not_started=results.not_started(groups, listed),
                          unread_indexes=results.unreadable_indexes(paths))
  try:
    # The plots first, report.md last and whole: a report.md is never older than its plots.
    written = plots.write_plots(groups, out, targets)
    metrics.write_text(os.path.join(out, 'report.md'), table)
  except OSError as e:
    cli.fail(f'--out {out!r}: cannot write the report there ({e.strerror or e}); give a '
             'folder that can be made or written')
  except OutputError as e:  # (metrics.write_text's, e.g. a full disk)
    cli.fail(str(e), EXIT_FAILED)
  print(table)
  print('wrote ' + ', '.join([os.path.join(out, 'report.md'), *written]))
  if (os.path.join(out, plots.VERSUS_PNG) not in written
      and {g.algorithm for g in groups} >= {'fathom', 'fedavg'}):
    if not any(alike for _, _, alike in report.grids(groups)[0]):
      why = ('no FedAvg grid is run alike with a FATHOM setting (the same fields but eta, E '
             'and B: cohort size, model, data, ...); report.md says which differ')
    else:
      why = ('no FedAvg grid run alike with a FATHOM setting reached one of the targets '
             f'({", ".join(f"{t:g}" for t in targets)}); lower --targets to compare them')
    print(f'no {plots.VERSUS_PNG}: {why}')


if __name__ == '__main__':
  flags.mark_flags_as_required(['out'])
  app.run(main, flags_parser=cli.parse_flags_or_exit)

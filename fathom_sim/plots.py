"""The report's PNG plots (matplotlib, Agg backend: no display needed).

Curves are means over a setting's finished seeds (every seed while none has finished: see
results.Group.plotted), at the rounds each of them logged; the band is the min..max over them.
"""

from __future__ import annotations

import functools
import os
from typing import Sequence

import matplotlib

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from fathom_sim.report import best_fedavg, grids  # noqa: E402
from fathom_sim.results import Group  # noqa: E402

HPARAMS = (('eta', 'η'), ('epochs', 'E'), ('batch_size', 'B'), ('h_glob', 'h_glob'),
           ('h_local', 'h_local'))
MAX_CURVES = 12  # beyond this a plot is unreadable; the table still lists every setting
# Points a curve draws at most: a week-long run logs millions of rounds, more than a plot's
# pixels show, and each costs matplotlib time and memory.
MAX_POINTS = 20_000
# Ten colours solid, then dashed: no two of MAX_CURVES curves look alike.
_STYLES = plt.cycler(linestyle=['-', '--']) * plt.cycler(color=plt.get_cmap('tab10').colors)


def curve(group: Group, field: str, x_field: str = 'round'):
  """(x, mean, min, max, n) over the n plotted seeds of `field`, at the rounds where each has
  it; at most MAX_POINTS of those rounds, evenly spread, the first and last among them.

  While no seed has finished, a seed that has not logged `field` yet (diverged or stopped
  before its first evaluation) is left out of that curve: the rounds common to it and the
  others are none, and the setting's curve vanished from the plot."""
  per_run = [run.rows.by_round(field, x_field) for run in group.plotted]
  if not group.finished:
    per_run = [r for r in per_run if len(r[0])]
  if not per_run:
    return None
  rounds = functools.reduce(np.intersect1d, (r for r, _, _ in per_run))
  if not len(rounds):
    return None
  if len(rounds) > MAX_POINTS:
    rounds = rounds[np.unique(np.linspace(0, len(rounds) - 1, MAX_POINTS).round().astype(int))]
  at = [np.searchsorted(r, rounds) for r, _, _ in per_run]
  x = np.stack([xs[i] for (_, xs, _), i in zip(per_run, at)]).mean(0)
  y = np.stack([ys[i] for (_, _, ys), i in zip(per_run, at)])
  return x, y.mean(0), y.min(0), y.max(0), len(per_run)


def _draw(ax, groups: list[Group], field: str, x_field: str, log_y: bool = False) -> None:
  ax.set_prop_cycle(_STYLES)
  drawn = 0
  for g in groups[:MAX_CURVES]:
    c = curve(g, field, x_field)
    if c is None:
      continue
    drawn += 1
    x, mean, lo, hi, n = c
    seeds = (f'n={n} of {len(g.runs)} seeds, none finished' if not g.finished else
             f'n={n}' if n == len(g.runs) else f'n={n}: the finished of {len(g.runs)} seeds')
    # (matplotlib leaves out of the legend a label that starts with '_')
    label = ('\u200b' if g.setting.startswith('_') else '') + f'{g.setting} ({seeds})'
    (line,) = ax.plot(x, mean, lw=1.2, label=label)
    if n > 1:
      ax.fill_between(x, lo, hi, color=line.get_color(), alpha=0.15, lw=0)
  if not drawn:  # runs stopped before their first row, or FedAvg's h_glob: an empty panel said
    ax.text(0.5, 0.5, f'no run has logged {field}', transform=ax.transAxes, ha='center',
            va='center', fontsize=8, alpha=0.7)
  if len(groups) > MAX_CURVES:
    ax.text(0.01, 0.01, f'the first {MAX_CURVES} of {len(groups)} settings (report.md lists '
            'all)', transform=ax.transAxes, fontsize=7, alpha=0.7)
  if log_y:
    ax.set_yscale('log')
  ax.grid(alpha=0.3)


def _legend(ax, fontsize: int) -> None:
  """The legend of the curves drawn; none (and no matplotlib warning) where none is."""
  if ax.get_legend_handles_labels()[0]:
    ax.legend(fontsize=fontsize)


def _save(fig, path: str) -> str:
  """Saved whole or not at all: a report stopped mid-way leaves the last report's plot."""
  fig.tight_layout()
  tmp = f'{path}.tmp.png'  # (savefig picks the format by the name's end)
  try:
    fig.savefig(tmp, dpi=90)
    os.replace(tmp, path)
  finally:
    plt.close(fig)
    if os.path.exists(tmp):
      os.remove(tmp)
  return path


def accuracy_plot(groups: list[Group], path: str, title: str = 'test accuracy') -> str:
  """Test accuracy against rounds (left) and against examples processed (right)."""
  fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.2))
  _draw(a, groups, 'test_accuracy', 'round')
  _draw(b, groups, 'test_accuracy', 'examples')
  a.set_xlabel('round')
  b.set_xlabel('examples processed by clients')
  a.set_ylabel('test accuracy')
  _legend(a, fontsize=7)
  fig.suptitle(title)
  return _save(fig, path)


def hparams_plot(groups: list[Group], path: str) -> str:
  """η, E, B, h_glob and h_local against rounds."""
  fig, axes = plt.subplots(1, len(HPARAMS), figsize=(16, 3.4))
  for ax, (field, label) in zip(axes, HPARAMS):
    _draw(ax, groups, field, 'round', log_y=field == 'batch_size')
    ax.set_title(label)
    ax.set_xlabel('round')
  _legend(axes[0], fontsize=6)
  return _save(fig, path)


# The files write_plots writes.
ACCURACY_PNG, HPARAMS_PNG, VERSUS_PNG = 'accuracy.png', 'hparams.png', 'fathom_vs_fedavg.png'


def write_plots(groups: list[Group], out: str, targets: Sequence[float]) -> list[str]:
  """accuracy.png, hparams.png (FATHOM settings, or all when none) and, where FATHOM settings
  have a FedAvg grid run alike (report.grids), fathom_vs_fedavg.png: each against its grid's
  best setting at the hardest of `targets` that setting reached."""
  os.makedirs(out, exist_ok=True)
  paths = [accuracy_plot(groups, os.path.join(out, ACCURACY_PNG))]
  fathom = [g for g in groups if g.algorithm == 'fathom']
  paths.append(hparams_plot(fathom or groups, os.path.join(out, HPARAMS_PNG)))
  # Each FedAvg grid's best setting at the hardest of `targets` it reached, after the FATHOM
  # settings run alike (report.grids).
  shown, compared, at = [], 0, []
  for _, fedavg, alike in grids(groups)[0]:
    best = None
    for target in sorted(targets, reverse=True):
      best = best_fedavg(fedavg, target)
      if best is not None:
        break
    if best is None or not alike:
      continue
    compared += len(alike)
    # The baseline is drawn whatever the number of FATHOM settings.
    room = MAX_CURVES - len(shown) - 1
    if room > 0:
      shown += alike[:room] + [best]
      at.append(target)  # (the title names the targets of the grids drawn only)
  versus = os.path.join(out, VERSUS_PNG)
  if not shown and os.path.exists(versus):
    os.remove(versus)  # a last report's, of other runs or targets: not beside this one's
  if shown:
    drawn = sum(g.algorithm == 'fathom' for g in shown)
    cut = f' (the first {drawn} of {compared} FATHOM settings)' if drawn < compared else ''
    where = (f'at {at[0]:g}' if len(set(at)) == 1 else
             'of each grid, at the hardest target it reached')
    paths.append(accuracy_plot(shown, versus,
                               f'FATHOM against the best static FedAvg {where}{cut}'))
  return paths

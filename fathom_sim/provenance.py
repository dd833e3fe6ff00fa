"""Which simulator made a run: the results version, the source commit and the package versions,
recorded in every checkpoint and in summary.json, and compared when a run resumes.

A config names what a run computes only together with the code that reads it. Some changes
alter what the same config computes (a layer added to a model, a rounding rule, how a file's
text is split); a run resumed across one is half one computation and half another, and nothing
in its config says so. RESULTS_VERSION counts those changes; a resumed run whose checkpoint
names another is run on (a week's run is not thrown away for a change that may not matter to
it) with a warning, and its summary.json says which version each part ran under.
"""

from __future__ import annotations

import functools
import importlib.metadata
import os
import platform
import subprocess

# Bump when the same config computes something else (not for speed, logging or new fields,
# which old workdirs read at their defaults). History:
#   3: Posts.xml text composed (NFC), combining marks kept in their word (a dataset prepared
#      before is refused by its TEXT_VERSION; one prepared again resumes on other word ids).
#   2: the LSTM models' tanh before the output layer; FATHOM's integer batch size rounds half
#      up; FedJAX/TFF-prepared Stack Overflow text splits on ' ' (December 2026).
#   1: runs whose checkpoints record no version read as this.
RESULTS_VERSION = 3
UNRECORDED = 1  # the version of a checkpoint saved before versions were recorded

_PACKAGES = ('jax', 'jaxlib', 'flax', 'optax', 'orbax-checkpoint', 'numpy')


@functools.cache
def source_commit() -> str | None:
  """The git commit of the checkout this package runs from: '+' marks uncommitted changes to
  tracked files, '?' a status git could not tell. None where it is not a checkout of its own
  (an installed copy, or a copy unpacked inside another repository, whose commit is not ours)
  or git is absent."""
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

  def git(*args):
    return subprocess.run(['git', *args], cwd=root, capture_output=True, text=True, timeout=10)

  try:
    top, head = git('rev-parse', '--show-toplevel'), git('rev-parse', 'HEAD')
    if top.returncode or head.returncode or (
        os.path.realpath(top.stdout.strip()) != os.path.realpath(root)):
      return None
    dirty = git('status', '--porcelain', '--untracked-files=no')
  except (OSError, subprocess.SubprocessError):
    return None
  return head.stdout.strip() + ('?' if dirty.returncode else '+' if dirty.stdout.strip() else '')


def _version(package: str) -> str | None:
  try:
    return importlib.metadata.version(package)
  except importlib.metadata.PackageNotFoundError:
    return None


@functools.cache
def _describe() -> tuple:
  return (('results_version', RESULTS_VERSION), ('commit', source_commit()),
          ('python', platform.python_version()),
          *((p, _version(p)) for p in _PACKAGES))


def describe() -> dict:
  """This simulator: {'results_version', 'commit', 'python', and each package's version}."""
  return dict(_describe())


def results_version(recorded: dict | None) -> int:
  """The results version a checkpoint's record names (UNRECORDED for one saved without)."""
  if not isinstance(recorded, dict):
    return UNRECORDED
  v = recorded.get('results_version')
  return v if isinstance(v, int) and not isinstance(v, bool) else UNRECORDED


def _stretches(saved: list | None) -> list[dict]:
  """A checkpoint's list of stretches ({'from_round', ...}), copied; [] where it kept none."""
  return [dict(r) for r in saved or () if isinstance(r, dict)]


def _same(stretch: dict, now: dict) -> bool:
  """Whether a stretch ran as `now` describes (its start aside)."""
  return {k: v for k, v in stretch.items() if k != 'from_round'} == now


def started() -> list[dict]:
  """A new run's list of the simulators it ran under: this one, from round 0."""
  return [{'from_round': 0, **describe()}]


def resumed(saved: list | None, at: int, where: str, *,
            runs_rounds: bool) -> tuple[list[dict], str | None]:
  """A resumed run's list, and the warning to log (None when there is nothing to say).

  The list is the checkpoint's (`saved`; None for one saved before lists were kept, read as
  version UNRECORDED from round 0), with this simulator appended from round `at` where it
  differs from the last and `runs_rounds` (a finished run only evaluated again runs none). The
  warning: this simulator computes differently from the one that saved the checkpoint and goes
  on from `at`, or, running no round, evaluates rounds another version ran. `where`: the
  workdir, for the message."""
  runs = _stretches(saved) or [{'from_round': 0, 'results_version': UNRECORDED}]
  if not runs_rounds:
    ran = sorted({results_version(r) for r in runs})
    if ran == [RESULTS_VERSION]:
      return runs, None
    return runs, (f'{where}: its rounds ran under simulator results version(s) {ran}; this '
                  f'one, version {RESULTS_VERSION}, evaluates it again (see '
                  'fathom_sim/provenance.py)')
  now, previous = describe(), runs[-1]
  if _same(previous, now):
    return runs, None
  runs.append({'from_round': at, **now})
  saved_version = results_version(previous)
  if saved_version == RESULTS_VERSION:
    return runs, None  # another commit or package, the same computation: recorded, not said
  by = (f'simulator results version {saved_version}' if 'commit' in previous else
        f'a simulator that recorded no version (read as {UNRECORDED})')
  commit = previous.get('commit')
  return runs, (
      f'{where}: its checkpoint was saved by {by}{f", commit {commit}" if commit else ""}; '
      f'this simulator is results version {RESULTS_VERSION}, which computes some configs '
      f'differently (see fathom_sim/provenance.py). The run goes on from round {at} under this '
      'version; summary.json\'s "simulators" says which rounds ran under which. Start a new '
      'workdir for a run wholly under one version.')


# How a stretch of rounds was executed, where a change alters how float sums round (clients
# summed lane by lane, lanes across devices, products by precision and conv form) but not
# what they compute: a run resumed across one is equal to an uninterrupted one only up to
# float rounding, not bit for bit, which a researcher comparing params_sha256 must know.
EXECUTION_FIELDS = ('platform', 'devices', 'processes', 'lanes_per_device',
                    'batch_pad_per_octave', 'conv', 'matmul_precision', 'local_loop',
                    'xla_flags')

# XLA flags that say where XLA writes what it did, or how many CPU devices to make (recorded as
# `devices`), not what a program computes.
_XLA_FLAGS_COMPUTING_NOTHING = ('--xla_dump', '--xla_force_host_platform_device_count')


def xla_flags() -> str:
  """$XLA_FLAGS, which XLA reads once at start, but for the flags that change nothing a program
  computes (dumps, CPU host devices): '' without any. The others may (fast math, a GPU's
  deterministic ops or autotuning): with other flags, sums may round otherwise."""
  return ' '.join(flag for flag in os.environ.get('XLA_FLAGS', '').split()
                  if not flag.startswith(_XLA_FLAGS_COMPUTING_NOTHING))


def executed(saved: list | None, at: int, now: dict, where: str) -> tuple[list[dict], str | None]:
  """A run's list of how its stretches of rounds were executed ({'from_round', and
  EXECUTION_FIELDS}), with `now` appended from round `at` where it differs from the last
  entry, and the warning to log then (None when nothing changed, or the checkpoint recorded
  nothing: `saved` None, the list then starting at `at`)."""
  runs = _stretches(saved)
  # A field recorded on one side only (xla_flags, added after a stretch was recorded; or one
  # a later simulator stops recording) is unknown there, not a change.
  if runs and all(runs[-1][k] == v for k, v in now.items() if k in runs[-1]):
    return runs, None
  runs.append({'from_round': at, **now})
  if len(runs) == 1:
    return runs, None
  before = runs[-2]
  changes = ', '.join(f'{k} {before[k]!r} -> {now[k]!r}' for k in now
                      if k in before and before[k] != now[k])
  return runs, (f'{where}: resumed at round {at} with {changes}: the sums round in another '
                'order, so from here the run equals an uninterrupted one up to float rounding, '
                'not bit for bit (params_sha256); summary.json\'s "executions" says how each '
                'stretch of rounds ran')

"""How a run that cannot go on says so: a device out of memory (what ran out, the fields that
size it, the checkpoints kept), and rounds rejected until the run stopped itself."""

from __future__ import annotations

import contextlib

import ml_collections
import numpy as np
from absl import logging

from fathom_sim import distributed, evaluation, fathom
from fathom_sim import workdir as workdir_lib
from fathom_sim.book import Book
from fathom_sim.config import ConfigError
from fathom_sim.mesh import out_of_memory
from fathom_sim.run import Run
from fathom_sim.types import BATCH


class OutOfMemory(ConfigError):
  """A device ran out of memory: the config asks more than the devices hold. The workdir keeps
  its checkpoints and rows as they were; a sweep marks the run failed and goes on."""


def out_of_memory_message(run: Run, doing: dict, xla: str) -> str:
  """What ran out of memory and the fields that size it. `doing` is what the run was doing:
  'init' (a fresh state), 'restore', 'round' t at hyperparameters hp, or the 'evaluation'
  after round t; 'seeds' > 1 when seeds are vectorised (each holds its own copy)."""
  c, lanes = run.config, run.lanes_per_device
  if xla.startswith('host: '):  # numpy's allocation on the host, not a device's
    what = {'init': "the model's first state", 'restore': 'restoring the checkpoint',
            'evaluation': f'the evaluation after round {doing.get("round")}'}.get(
                doing['what'], f'round {doing.get("round")}')
    return (f"{what} ran out of the host's memory ({xla[6:]}); the config asks for more than "
            'this machine holds: lower the sizes it sets (config.cohort_size, '
            'config.batch_size or its upper bound, config.eval_batch_size, the data)')
  on = (f'on {run.mesh.devices.size} {run.mesh.devices.flat[0].platform} device(s) '
        f'({xla})')
  seeds = doing.get('seeds', 1)
  fewer_seeds = (f'; fewer seeds side by side ({seeds} now: launch/sweep.py without '
                 '--vmap_seeds) resume these workdirs' if seeds > 1 else '')
  if doing['what'] == 'init':
    where = ('starts afresh in this workdir, which holds no round yet' if doing.get('fresh')
             else 'needs a new workdir')
    return (f"the model's first state ran out of memory {on}; a smaller model "
            f'({_model_fields(c)}) {where}{fewer_seeds}')
  if doing['what'] == 'restore':
    return (f'restoring the checkpoint ran out of memory {on}; a device with more memory '
            f'resumes it{fewer_seeds}')
  if doing['what'] == 'evaluation':
    # The batch's rows, not the field's value: a value past the test set evaluates in batches
    # of the test set, and a smaller value than asked but still past it would run out again.
    rows = evaluation.batch_rows(c.eval_batch_size, run.task.test.num_examples)
    capped = ', no more than the test set holds' if rows < c.eval_batch_size else ''
    return (f'the evaluation after round {doing["round"]} ran out of memory {on} in batches '
            f'of {rows} examples (config.eval_batch_size={c.eval_batch_size}{capped}); a '
            f'config.eval_batch_size below {rows} resumes this workdir{fewer_seeds}')
  hp = np.atleast_2d(doing['hp'])  # [seeds, 3] when seeds are vectorised
  b = float(hp[:, BATCH].max())
  bound = 'config.upper_batch_size' if c.algorithm == 'fathom' else 'config.batch_size'
  lanes_hint = (f'a smaller config.lanes_per_device (now {lanes}) resumes this workdir; '
                if lanes > 1 else '')
  b_int = fathom.batch_size_int(b)
  return (f'round {doing["round"]} ran out of memory {on} with B {b:.6g} ({b_int} '
          f'example{"s" if b_int > 1 else ""} a local step), config.cohort_size='
          f'{c.cohort_size} clients, {lanes} side by side per device (each with its copy of '
          f'the model); {lanes_hint}a smaller {bound} or config.cohort_size, a smaller model '
          f"({_model_fields(c)}), or config.model.compute_dtype='bfloat16', needs a new "
          f'workdir{fewer_seeds}')


def _model_fields(c) -> str:
  """The fields that size the model, said in an out-of-memory error: its classes are a
  field of npz data only (the other tasks fix them)."""
  return ('config.model, or fewer classes: config.data.num_classes' if c.data.name == 'npz'
          else 'config.model')


def checkpoints_kept(workdirs: list[str]) -> str:
  """The newest checkpoint each workdir holds, said for an error message."""
  newest = [workdir_lib.newest_step(workdir) for workdir in workdirs]
  if len(set(newest)) > 1:
    return 'the workdirs keep the checkpoints of rounds ' + ', '.join(
        'none' if n is None else str(n) for n in newest)
  if newest[0] is None:
    return 'no round was checkpointed yet'
  keeps = 'the workdir keeps' if len(workdirs) == 1 else 'each workdir keeps'
  return f'{keeps} the checkpoint of round {newest[0]}'


@contextlib.contextmanager
def closed_on_error(run: Run, books: list, doing: dict, workdirs: list[str]):
  """Whatever ends the run with an error (bad data met in a round, a device out of memory, a
  bug), its files are closed as they stand first: metrics flushed, pending checkpoint saves
  finished (an unfinished one was left as a temporary folder). XLA's out-of-memory error
  becomes an OutOfMemory that says what ran out, which fields to lower, and the checkpoints
  `workdirs` keep."""
  try:
    yield
  except BaseException as e:
    distributed.stand_down()  # a peer stopping now must not end this process mid-close
    for book in books:
      try:
        book.close()
      except Exception as close_error:  # noqa: BLE001 - the run's own error is the one to raise
        logging.warning('%s: closing the run\'s files failed too (%s: %s)', book.workdir,
                        type(close_error).__name__, close_error)
    xla = out_of_memory(e)
    if xla is None:
      raise
    raise OutOfMemory(f'{out_of_memory_message(run, doing, xla)}; '
                      f'{checkpoints_kept(workdirs)}') from None


def diverged_message(c: ml_collections.ConfigDict, stopped: list[tuple[Book, int]]) -> str:
  """Why runs stopped: max_rejected_rounds rounds in a row rejected, ending at each's round."""
  n = c.max_rejected_rounds
  ends = sorted({t for _, t in stopped})
  if len(stopped) == 1:
    what, saved = f'rounds {ends[0] - n + 1}..{ends[0]}', f'its checkpoint of round {ends[0]}'
  elif len(ends) == 1:
    what = (f'seeds {", ".join(str(b.config.seed) for b, _ in stopped)}: rounds '
            f'{ends[0] - n + 1}..{ends[0]}')
    saved = f'their checkpoints of round {ends[0]}'
  else:
    what = '; '.join(f'seed {b.config.seed}: rounds {t - n + 1}..{t}' for b, t in stopped)
    saved = 'their checkpoints of those last rounds'
  if all(b.rejected_by == 'step' for b, _ in stopped):
    # Finite clients' updates: halving eta (FATHOM does, each rejected round) did not help.
    why = ('the clients\' updates were finite but the server or hyper step was not (an '
           'overflow of the server optimizer\'s state, or of phi)')
    fix = ('A smaller server_lr or eta' if c.algorithm == 'fedavg' else
           'A smaller eta_h (FATHOM\'s steps on phi) or server_lr')
  else:
    why = 'no finite update'
    fix = f'A smaller {"eta" if c.algorithm == "fedavg" else "eta or upper_eta"}'
  return (f'{what} were all rejected ({n} in a row, config.max_rejected_rounds; 0 never '
          f'stops): {why}, so the run has diverged and stopped, {saved} saved. {fix}, or '
          'another seed, may train')

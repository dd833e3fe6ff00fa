"""A run's host-side record (Book: its files, counters, and each round's row), and how a
command picks its run up: the checkpoint restored and checked against the data, vectorised
seeds brought back to one round, the rows kept up to the checkpoint."""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Callable

import jax
import ml_collections
import numpy as np
from absl import logging

from fathom_sim import distributed, metrics, provenance
from fathom_sim import workdir as workdir_lib
from fathom_sim.checkpoint import Checkpointer
from fathom_sim.run import Run, execution, init_state
from fathom_sim.types import BATCH, EPOCHS, ETA, ServerState


@dataclasses.dataclass
class Book:
  """One run's host-side record: its files, counters and what it needs of its rows."""
  config: ml_collections.ConfigDict
  workdir: str
  checkpointer: Checkpointer
  done: int
  meta: dict
  log: metrics.RowLog = dataclasses.field(default_factory=metrics.RowLog)
  writer: metrics.MetricsWriter | None = None
  last_eval: tuple | None = None
  start: float = 0.0
  cache_hits: int = 0  # compile_cache.hits() when the run started
  closed: bool = False
  diverged_at: int | None = None  # the round after which it stopped (max_rejected_rounds)
  # Why its rounds rejected in a row (this command's) were: every client's update not finite
  # ('clients'), the server or hyper step not finite with finite clients' updates ('step'),
  # or some of each ('both'); None after an accepted round.
  rejected_by: str | None = None

  def close(self) -> None:
    """Flushes the metrics and finishes pending checkpoint saves (once)."""
    if not self.closed:
      self.closed = True
      try:
        if self.writer:
          self.writer.close()
      finally:  # a metrics file that cannot be flushed (a full disk) still lets saves finish
        self.checkpointer.close()

  def bookkeeping(self, t: int, hp: np.ndarray) -> dict:
    return {'round': t, 'hp': [float(v) for v in hp], 'total_examples': self.meta['total_examples'],
            'total_steps': self.meta['total_steps'], 'computed': self.meta['computed'],
            'wall_s': time.time() - self.start, 'config': workdir_lib.config_dict(self.config),
            'simulators': self.meta['simulators'], 'executions': self.meta['executions'],
            'rejected_in_a_row': self.meta['rejected_in_a_row'], 'data': self.meta['data']}

  def count_rejected(self, accepted: bool) -> None:
    """Counts a round into the rounds rejected in a row (kept in its checkpoints' meta)."""
    self.meta['rejected_in_a_row'] = 0 if accepted else self.meta['rejected_in_a_row'] + 1
    if accepted:
      self.rejected_by = None

  def round_row(self, t: int, ms, used: np.ndarray, plan, computed: int, *,
                vectorized_seeds: int) -> dict:
    """Round t's row but its evaluation and wall_s, the round's examples and steps added to the
    run's counts; a rejected round, and an accepted one whose loss jumped, said in the log.
    `ms`: the round's metrics, `used`: its hyperparameters, `plan`: its cohort plan,
    `computed`: the example-gradients computed (padding included)."""
    c, meta, tag = self.config, self.meta, self.tag(bool(vectorized_seeds))
    meta['total_steps'] += int(plan.num_steps.sum())
    meta['total_examples'] += plan.useful_rows()
    meta['computed'] += computed
    row = {'round': t, 'train_loss': float(ms.train_loss), 'eta': float(used[ETA]),
           'epochs': float(used[EPOCHS]), 'batch_size': float(used[BATCH]),
           'batch_size_int': plan.batch_size, 'h_glob': float(ms.h_glob),
           'h_local': float(ms.h_local), 'examples': meta['total_examples'],
           'local_steps': meta['total_steps'], 'dropped_clients': int(ms.dropped_clients),
           'accepted': bool(ms.accepted),
           'padding_efficiency': plan.useful_rows() / max(computed, 1)}
    if vectorized_seeds:  # its wall_s is the group's clock: a report times rounds by it
      row['vectorized_seeds'] = vectorized_seeds
    if not ms.accepted:
      dropped = int(ms.dropped_clients)
      cause = ('clients' if dropped >= int(np.sum(np.asarray(plan.num_examples) > 0))
               else 'step')
      self.rejected_by = cause if self.rejected_by in (None, cause) else 'both'
      why = ('no client returned a finite update' if cause == 'clients'
             else 'the server or hyper step was not finite')
      logging.warning('%sround %d rejected: %s (%d clients dropped); the model is '
                      'unchanged%s', tag, t, why, dropped,
                      '' if c.algorithm == 'fedavg' else ' and the eta it used is halved')
    jump = metrics.loss_jump(self.log.accepted_loss, row, metrics.LOSS_JUMP)
    if jump is not None:
      logging.warning('%sround %d: the training loss rose %.3gx in one round (%.4g -> %.4g) '
                      'and the round was accepted; the run may be diverging (SGD can diverge '
                      'near zero training loss, on any device and precision; '
                      'a smaller eta, or upper_eta for FATHOM, takes smaller steps)',
                      tag, t, jump[1], jump[0], row['train_loss'])
    return row

  def tag(self, vectorized: bool) -> str:
    """How log lines name the run: by its seed when seeds are vectorised."""
    return f'seed {self.config.seed}: ' if vectorized else ''


def open_book(run: Run, config: ml_collections.ConfigDict, workdir: str, data_id: str,
              known_ids: set[str], doing: dict, cache_hits: int
              ) -> tuple[Book, ServerState, np.ndarray | None]:
  """The run in `workdir`: its Book, state and hyperparameters (None: the config's initial
  ones), restored from its newest checkpoint, else round 0's. Refuses checkpoints trained on
  other data than `data_id` (`known_ids`: the fingerprints that name the same data).
  Sets doing['what'] ('init', then 'restore') for an out-of-memory error's message."""
  doing['what'] = 'init'
  state = init_state(dataclasses.replace(run, config=config))
  checkpointer = Checkpointer(workdir, config.keep_checkpoints)
  doing['what'] = 'restore'
  try:
    restored = checkpointer.restore_newest(state)
  except workdir_lib.WorkdirError as e:
    # Data that shapes the model otherwise (more classes, another vocabulary) reads no
    # checkpoint back: that is the data's change, which the checkpoints' meta names, not
    # damage to undo by moving them out (which would start the run again on other data).
    saved = checkpointer.saved_values('data')
    checkpointer.close()
    if saved and not known_ids & set(saved):
      raise other_data(workdir, config, ', '.join(sorted(saved)), data_id) from e
    raise
  except BaseException:
    checkpointer.close()
    raise
  if restored is None:
    meta = {'total_examples': 0, 'total_steps': 0, 'computed': 0, 'wall_s': 0.0}
    done, hp = 0, None
    meta['simulators'] = provenance.started()
    meta['executions'] = [{'from_round': 0, **execution(run, config)}]
  else:
    state, meta = restored
    done, hp = int(meta['round']), np.asarray(meta['hp'], np.float32)
    # The config names the data, not what its folder holds now: data prepared again from
    # other files would silently make the resumed rounds another run's. (A checkpoint from
    # before the fingerprint was kept is taken as it is.)
    if meta.get('data', data_id) not in known_ids:
      checkpointer.close()
      raise other_data(workdir, config, meta['data'], data_id)
    logging.info('%s: resuming from the checkpoint of round %d', workdir, done)
  meta['data'] = data_id
  return Book(config, workdir, checkpointer, done, meta, cache_hits=cache_hits), state, hp


def may_go_back(books: list[Book], c: ml_collections.ConfigDict) -> bool:
  """Whether vectorised seeds whose checkpoints stand apart may all resume from the round the
  least advanced holds: one process (the agreements and removals of several are not made for
  it); every seed has rounds there; none is stopped by max_rejected_rounds (the others ran on
  beside it idle, which it would not be from an older round); none has a summary of rounds
  past that round (a finished seed taken back would keep one of rounds its rows no longer
  have; one of fewer rounds, left by a run since extended, is every extended sweep's, and
  kept them apart for good)."""
  common = min(b.done for b in books)

  def stopped(book: Book) -> bool:
    limit = (book.meta.get('config') or {}).get('max_rejected_rounds', c.max_rejected_rounds)
    return bool(limit) and book.meta.get('rejected_in_a_row', 0) >= limit

  def summarised_past(book: Book) -> bool:
    if not os.path.exists(os.path.join(book.workdir, metrics.SUMMARY_FILE)):
      return False
    rounds = metrics.finished_rounds(book.workdir)
    return rounds is None or rounds > common  # (one not read: as if it were past)
  return (jax.process_count() == 1 and common > 0 and not any(stopped(b) for b in books)
          and not any(summarised_past(b) for b in books))


def go_back(books: list[Book], states: list, hps: list, data_id: str, known_ids: set[str]
            ) -> None:
  """Vectorised seeds whose checkpoints stand at different rounds (may_go_back): those ahead
  restored at the round the least advanced holds, in `states` and `hps`, and their newer
  checkpoints dropped, where each reads back there on the same data."""
  common = min(b.done for b in books)
  ahead = [i for i, b in enumerate(books) if b.done > common]
  back = [books[i].checkpointer.restore_older(states[i], common) for i in ahead]
  if all(r is not None and r[1].get('data', data_id) in known_ids for r in back):
    logging.warning('the seeds\' checkpoints stand at rounds %s; seeds %s resume from round '
                    '%d, as the others do, their newer checkpoints dropped: all run on '
                    'together, as the uninterrupted run did', [b.done for b in books],
                    [books[i].config.seed for i in ahead], common)
    for i, (state, meta) in zip(ahead, back):
      books[i].checkpointer.drop_newer_than(common)
      states[i], hps[i] = state, np.asarray(meta['hp'], np.float32)
      books[i].done, books[i].meta = common, {**meta, 'data': data_id}


def adopt(books: list[Book], run: Run, num_rounds: int) -> None:
  """Every check passed: the runs' configs become this command's, and a resumed run's
  provenance lists this simulator and how it executes the rounds it runs."""
  for book in books:
    workdir_lib.save_config(book.workdir, book.config)
    if 'round' in book.meta:  # resumed: this simulator joins the list if it runs rounds
      book.meta['simulators'], warning = provenance.resumed(
          book.meta.get('simulators'), book.done, book.workdir,
          runs_rounds=book.done < num_rounds)
      if warning:
        logging.warning('%s', warning)
      book.meta.setdefault('executions', None)  # (a checkpoint saved before they were kept)
      if book.done < num_rounds:
        book.meta['executions'], warning = provenance.executed(
            book.meta.get('executions'), book.done, execution(run, book.config), book.workdir)
        if warning:
          logging.warning('%s', warning)


def open_rows(books: list[Book], done: int, c: ml_collections.ConfigDict) -> Callable[[], None]:
  """Reads each run's rows to keep up to round `done` (its checkpoint's), every run's before
  any is changed, and returns what then keeps them: cuts each file there, opens its writer,
  and sets its clock on from the seconds it had run. (Called before adopt, so that a damaged
  file is refused with config.json as it was; cut after it, so that rows are never cut under a
  config.json that still says the rounds they ended at: such a run looked finished, an
  evaluation dropped from its rows for good.)"""
  cuts = []
  for book in books:
    if distributed.is_writer():  # on several hosts, process 0 alone writes the run's files
      # Rows past the checkpoint are redone, and a run taken further than it ended drops the
      # evaluation made only because it ended there (whether or not it lived to write its
      # summary.json, and whichever command ended it there): its rows become an uninterrupted
      # run's. The eval_every of the run that wrote the rows: a row it evaluated on its
      # schedule stays, whatever this command's eval_every; one off it was a last round's.
      # (A checkpoint from before its config was kept has no eval_every: this command's
      # stands in, and only a run known to have ended there drops the evaluation.)
      saved = (book.meta.get('config') or {}).get('eval_every')
      every = saved or c.eval_every
      off_period = done < c.num_rounds and done % every != 0 and (saved or ended_at(book))
      book.log = metrics.RowLog(c.target_accuracy)
      cuts.append((book, metrics.rows_kept(book.workdir, done, done if off_period else None,
                                           into=book.log)))

  def keep() -> None:
    for book, cut in cuts:
      if cut():
        logging.info('%s: the run ended at round %d and goes on to %d; the evaluation of '
                     'round %d is dropped from %s (an uninterrupted run does not evaluate '
                     'there)', book.workdir, done, c.num_rounds, done, metrics.METRICS_FILE)
      book.writer = metrics.MetricsWriter(book.workdir)
    for book in books:
      book.start = time.time() - float(book.meta['wall_s'])

  return keep


def data_named(config: ml_collections.ConfigDict) -> str:
  """How the config names its data, for messages: config.data's name and folder or file."""
  named = [f'data.name={config.data.name}']
  for field in ('data_dir', 'path'):
    if config.data.get(field):
      named.append(f'data.{field}={config.data.get(field)}')
  return ', '.join(named)


def other_data(workdir: str, config, saved: str, data_id: str) -> Exception:
  """The error of a workdir whose checkpoints were trained on other data than `data_id`."""
  return workdir_lib.WorkdirError(
      f'{workdir_lib.named(workdir)} holds a run trained on other data than this command gives '
      f'it ({data_named(config)}): the clients, their example counts, the examples of a file '
      f'or prepared dataset, or its format or vocabulary differ (data fingerprint {saved}, now '
      f'{data_id}); '
      f'resume it on the data it was trained on, or {workdir_lib.another_folder()}')


def ended_at(book: Book) -> bool:
  """Whether a run ended at the round of the checkpoint resumed from, and evaluated there as a
  last round: the one that saved it, as the config saved with it says (a run stopped at a
  periodic checkpoint then resumed with another eval_every did not end there), or a later
  command run with num_rounds at that round, which ran none and wrote summary.json."""
  saved = (book.meta.get('config') or {}).get('num_rounds')
  return saved == book.done or metrics.read_summary(book.workdir, book.done) is not None

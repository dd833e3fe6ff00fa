"""A run's summary.json: written when its last round is done, and read back to tell whether a
finished run is asked anything new."""

from __future__ import annotations

import os
import time

import numpy as np
from absl import logging

from fathom_sim import compile_cache, distributed, evaluation, metrics
from fathom_sim import workdir as workdir_lib
from fathom_sim.book import Book
from fathom_sim.driver import Rounds
from fathom_sim.run import Run, execution
from fathom_sim.types import BATCH, EPOCHS, ETA


def write(book: Book, final: dict, params, hp: np.ndarray, rounds: Rounds, run: Run, *,
          vectorized_seeds: int) -> dict:
  """Writes and returns the run's summary.json; `vectorized_seeds`: the seeds run side by side
  with it (0: alone)."""
  c, meta = book.config, book.meta
  compiles, ahead = rounds.compiles, rounds.compile_ahead
  l2, sha = metrics.params_digest(params)
  summary = {
      'algorithm': c.algorithm, 'task': run.task.name, 'rounds': c.num_rounds,
      **execution(run, c), 'loop_chunk': run.loop_chunk,
      'compute_dtype': c.model.compute_dtype,
      'compiles': compiles,
      # Every program (rounds, evaluation, set-up) loaded from the persistent cache; in a
      # vectorised group, the group's.
      'compile_cache_hits': compile_cache.hits() - book.cache_hits,
      'compiled_ahead': None if ahead is None else {'compiled': ahead.compiled,
                                                    'loaded': ahead.loaded,
                                                    'used': ahead.used},
      'planned_ahead': rounds.planned_ahead, 'replanned': rounds.replanned,
      'replanned_seeds': rounds.replanned_seeds,
      'vectorized_seeds': vectorized_seeds, 'resumed_from': book.done,
      'simulators': meta['simulators'], 'executions': meta['executions'],
      'wall_s': _wall_s(book, c.num_rounds), 'total_examples': meta['total_examples'],
      'total_local_steps': meta['total_steps'],
      'padding_efficiency': meta['total_examples'] / max(meta['computed'], 1),
      'final': {'test_accuracy': final['accuracy'], 'test_loss': final['loss'],
                'test_examples': final['count'], 'params_l2': l2, 'params_sha256': sha,
                **evaluation.extra_accuracies(final)},
      'final_hparams': {'eta': float(hp[ETA]), 'epochs': float(hp[EPOCHS]),
                        'batch_size': float(hp[BATCH])},
      'config_sha256': workdir_lib.config_fingerprint(c),
  }
  if c.target_accuracy:
    reached = book.log.reached
    summary['target_accuracy'] = c.target_accuracy
    summary['rounds_to_target'] = reached['round'] if reached else None
    summary['examples_to_target'] = reached['examples'] if reached else None
    summary['local_steps_to_target'] = reached['local_steps'] if reached else None
  if distributed.is_writer():
    metrics.write_json(os.path.join(book.workdir, metrics.SUMMARY_FILE), summary)
  loaded = summary['compile_cache_hits']
  logging.info('%sdone: %d rounds in %.1fs, %d compiles%s; final test accuracy %.4f, loss %.4f',
               book.tag(bool(vectorized_seeds)), c.num_rounds, summary['wall_s'], compiles,
               f' ({loaded} programs loaded from the compilation cache)' if loaded else '',
               final['accuracy'], final['loss'])
  return summary


def _wall_s(book: Book, num_rounds: int) -> float:
  """The run's seconds, summed over the commands that ran its rounds: a command that ran none
  (a finished run summarised again, or one stopped at its last checkpoint) adds none of its
  own, and the run's are its summary's (else its last checkpoint's)."""
  if book.done < num_rounds:
    return time.time() - book.start
  summary = metrics.read_summary(book.workdir, num_rounds) or {}
  if isinstance(summary.get('wall_s'), (int, float)):  # (written by the command that ended
    return float(summary['wall_s'])  # there, as in book.ended_at)
  return float(book.meta['wall_s'])


def of_finished(book: Book, num_rounds: int) -> dict | None:
  """The summary.json of a run checkpointed at its last round, if it describes that run and
  the command asks nothing new of it (another target_accuracy, say, is summarised again)."""
  if book.done != num_rounds:
    return None
  summary = metrics.read_summary(book.workdir, num_rounds)
  if summary is None:
    return None
  try:
    saved = workdir_lib.read_saved(book.workdir)
  except ValueError:  # (WorkdirError)
    return None
  if saved is None or saved.get('num_rounds') != num_rounds:
    # Taken further since (num_rounds raised, then stopped before its next checkpoint): that
    # command rewrote config.json, then may have cut the rows (the last round's evaluation
    # dropped) and written rows past this round. Not finished as its files stand: run on,
    # they are put back.
    return None
  if 'config_sha256' in summary:
    # What the summary itself says it summarises: config.json is rewritten before a finished
    # run is summarised again, and a command killed between the two left the old summary
    # beside the new config, which took it as its own.
    same = summary['config_sha256'] == workdir_lib.config_fingerprint(book.config)
    return summary if same else None
  # (A summary from before the fingerprint: config.json says what it summarises.) Any field
  # that differs asks something new of it, but one the run does not read.
  same = not workdir_lib.differing(
      saved, workdir_lib.flatten(workdir_lib.config_dict(book.config)), ())
  return summary if same else None

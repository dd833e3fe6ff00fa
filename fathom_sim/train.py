"""train_and_evaluate(config, workdir): the round loop, its evaluations, checkpoints and rows,
and where a signal stops it.

The run's parts are built in run.py; each run's record, and how a resumed one is picked up, in
book.py; the host's side of each round is driver.py's Rounds, and its computation the one
jitted function of round.py; summary.json is summary.py's; failures.py says what stopped a run.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import signal
import threading
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from fathom_sim import book as book_lib
from fathom_sim import compile_cache, distributed, evaluation, failures, metrics, rng
from fathom_sim import summary as summary_lib
from fathom_sim import workdir as workdir_lib
from fathom_sim.book import Book
from fathom_sim.config import ConfigError
from fathom_sim.data.federated import Task, fingerprint
from fathom_sim.data.sampling import sample_clients
from fathom_sim.driver import Rounds
from fathom_sim.errors import Diverged, Preempted, exit_status, one_line
from fathom_sim.evaluation import KEEP_BYTES, make_evaluator
from fathom_sim.mesh import put, replicated
from fathom_sim.run import Run, build


@contextlib.contextmanager
def _stop_signals():
  """Turns SIGTERM / SIGINT (what a TPU preemption sends) into a flag read between rounds; a
  second SIGINT raises KeyboardInterrupt at once."""
  received: list[int] = []
  if threading.current_thread() is not threading.main_thread():
    yield received
    return
  previous = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}

  def on_signal(signum, frame):
    if received and signum == signal.SIGINT:
      # A second Ctrl-C: out now, mid-round or mid-save; the files are closed as they stand
      # (failures.closed_on_error) and the last checkpoint is where the run resumes.
      raise KeyboardInterrupt
    received.append(signum)

  for s in previous:
    signal.signal(s, on_signal)
  # Taken once this handler is in place, so that none falls between the two.
  received.extend(distributed.take_early_signals())  # (several hosts: before the rounds)
  try:
    yield received
  finally:
    for s, handler in previous.items():
      signal.signal(s, handler)


def _agreed_stop(signals: list[int]) -> int:
  """The signal to stop on after this round (0: go on). On several hosts the processes agree
  (one receiving it stops all), so that all stop after the same round."""
  mine = signals[0] if signals else 0
  if jax.process_count() == 1:
    return mine
  return int(np.max(multihost_utils.process_allgather(np.int32(mine))))


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Runs `config` into `workdir`, resuming the run already there; returns the summary.

  Raises Preempted after checkpointing when SIGTERM or SIGINT arrives.
  """
  return _train([config], [workdir], vectorized=False)[0]


def train_seeds(configs: list[ml_collections.ConfigDict], workdirs: list[str],
                task: Task | None = None) -> list[dict]:
  """Runs configs that differ only in `seed` as one vectorised program (vmap over seeds).

  Each workdir gets exactly what a solo run of its config writes (metrics, checkpoints,
  summary), with the same numbers up to float rounding: one compilation and one start-up
  serve all the seeds. Seeds whose checkpoints stand at different rounds run as one group per
  round. `task`: the configs' data, already loaded (else loaded here).
  """
  if len(configs) != len(workdirs) or not configs:
    raise ValueError('train_seeds needs one workdir per config, and at least one config')
  base = workdir_lib.flatten(workdir_lib.config_dict(configs[0]))
  for c in configs[1:]:
    other = workdir_lib.flatten(workdir_lib.config_dict(c))
    # (One data folder spelled otherwise: each resumed seed keeps its run's spelling.)
    differ = sorted(k for k in set(base) | set(other)
                    if k != 'seed' and not workdir_lib.same_value(k, base.get(k), other.get(k)))
    if differ:
      raise ConfigError('vectorised seeds need configs that differ only in config.seed; '
                        f'these differ too: {", ".join(differ)}')
  if len({c.seed for c in configs}) != len(configs):
    raise ConfigError('vectorised seeds need distinct config.seed values')
  # Each workdir's lock is this process's, shared: a workdir given twice, or one inside
  # another before that one had rows, was taken, the seeds' rows interleaved in one file.
  # Sorted by their folders' names, a folder's own come right after it: a workdir given
  # twice, or inside another, is next to that one.
  parts = [os.path.realpath(w).split(os.sep) for w in workdirs]
  order = sorted(range(len(workdirs)), key=parts.__getitem__)
  for j, i in zip(order, order[1:]):
    outer, inner = parts[j], parts[i]
    if inner[:len(outer)] == outer:
      raise workdir_lib.WorkdirError(
          f'vectorised seeds need a workdir each: {workdirs[i]!r} (seed {configs[i].seed}) '
          + ('is' if inner == outer else 'is inside') + f' {workdirs[j]!r}, seed '
          f'{configs[j].seed}\'s')
  return _train(configs, workdirs, vectorized=len(configs) > 1, task=task)


def _seed(tree, s: int | None):
  """Seed s's slice of a stacked pytree (the tree itself when not vectorised)."""
  return tree if s is None else jax.tree.map(lambda x: x[s], tree)


def _train(configs: list[ml_collections.ConfigDict], workdirs: list[str], *,
           vectorized: bool, task: Task | None = None) -> list[dict]:
  books: list[Book] = []
  # Stopped by another process (distributed.py): its pending saves finish first.
  forget = distributed.before_stopping(
      lambda: [b.checkpointer.wait() for b in books if not b.closed])
  try:
    cache_hits = compile_cache.hits()
    with contextlib.ExitStack() as locks:  # each workdir's, for the whole run
      for config, workdir in zip(configs, workdirs):
        workdir_lib.check_before_load(workdir, config, locks)
      run = build(configs[0], task)
      for config, workdir in zip(configs, workdirs):
        workdir_lib.prepare(workdir, config, locks)
      # What the run is doing, for an out-of-memory error's message.
      doing = {'what': 'init', 'seeds': len(configs) if vectorized else 1}
      with failures.closed_on_error(run, books, doing, workdirs):
        return _run(run, configs, workdirs, books, doing, cache_hits=cache_hits,
                    vectorized=vectorized)
  except (Preempted, Diverged):
    # Every process stops after the same round (_agreed_stop; the rounds' replicated
    # outputs): none is left waiting, and none is to be told to stop.
    raise
  except BaseException as e:
    # On several hosts the others would wait for this process in a collective: they stop
    # too, naming this error, with the exit status launch/cli.py ends this process with. Its
    # files are closed by now (failures.closed_on_error).
    distributed.stop_peers(one_line(e), exit_status(e))
    raise
  finally:
    forget()


def _check_processes_agree(configs: list[ml_collections.ConfigDict], data_id: str) -> None:
  """Each host reads its own config file and data: an edit on one worker, or data prepared
  otherwise there, would give the processes different programs (a hang) or different
  examples under one mesh (silently wrong numbers). Refused, naming the processes."""
  differ = distributed.differing_processes({
      'config': json.dumps([workdir_lib.config_dict(cf) for cf in configs],
                           sort_keys=True).encode(),
      'data': data_id.encode()})
  if differ:
    raise ConfigError(
        'the processes of the run were given different '
        + ' and '.join(f'{what} (process(es) {", ".join(map(str, who))} against process 0)'
                       for what, who in differ.items())
        + ': every host runs the same config on the same data (its clients, their sizes, '
        'a file\'s or prepared dataset\'s examples, format and vocabulary compared here)')


def _run_apart(run: Run, configs: list[ml_collections.ConfigDict], workdirs: list[str],
               books: list[Book]) -> list[dict]:
  """Vectorised seeds whose checkpoints still stand at different rounds: the seeds of each
  round run as one group, one group after another; their summaries in `configs`' order."""
  for b in books:
    b.close()
  # Seeds at one round still share a program (a seed stopped by max_rejected_rounds, or an
  # unfinished save, put the others' rounds apart from its own).
  by_round: dict[int, list[int]] = {}
  for i, b in enumerate(books):
    by_round.setdefault(b.done, []).append(i)
  logging.warning('the seeds\' checkpoints stand at rounds %s; running the seeds of each '
                  'round together, one round\'s after another', [b.done for b in books])
  out = [None] * len(books)
  for group in by_round.values():
    # (The data this run loaded: loaded again per group, the host held it twice.)
    done_ = train_seeds([configs[i] for i in group], [workdirs[i] for i in group],
                        task=run.task)
    for i, summary in zip(group, done_):
      out[i] = summary
  return out


def _run(run: Run, configs: list[ml_collections.ConfigDict], workdirs: list[str],
         books: list[Book], doing: dict, *, cache_hits: int, vectorized: bool) -> list[dict]:
  """_train's body: restores or starts each run (a Book appended to `books` once its
  checkpoints are open), then runs the rounds; `doing` is kept up to date."""
  c, task, mesh = configs[0], run.task, run.mesh
  n_dev = mesh.devices.size
  logging.info('task %s: %d train clients (%d examples), %d test clients (%d examples); %d '
               'device(s) (%s), %d lane(s) per device, training set %s%s', task.name,
               len(task.train.num_examples), int(np.sum(task.train.num_examples)),
               len(task.test.num_examples), int(np.sum(task.test.num_examples)), n_dev,
               mesh.devices.flat[0].platform,
               run.lanes_per_device, 'on device' if run.resident else 'fed per round',
               f'; {len(configs)} seeds vectorised' if vectorized else '')

  data_id = fingerprint(task)
  # What checkpoints kept before the examples' digest was part of the fingerprint: still the
  # same data (a resume then keeps the full one).
  known_ids = {data_id, fingerprint(task, examples=False)}
  if jax.process_count() > 1:
    _check_processes_agree(configs, data_id)

  states, hps = [], []
  # Out of memory at the model's init, the corrected command may start afresh in these
  # workdirs only if none holds a round yet (workdir.started).
  doing['fresh'] = not any(workdir_lib.started(w) for w in workdirs)
  for config, workdir in zip(configs, workdirs):
    book, state, hp = book_lib.open_book(run, config, workdir, data_id, known_ids, doing,
                                         cache_hits)
    books.append(book)
    states.append(state)
    hps.append(hp)
  doing['what'] = 'init'
  for book in books:
    if book.done > c.num_rounds:  # (_train closes the books; found before the load by now)
      raise workdir_lib.too_few_rounds(book.workdir, book.done, c.num_rounds)
  kept = [summary_lib.of_finished(book, c.num_rounds) for book in books]
  finished = all(summary is not None for summary in kept)
  # All return, or all go on (to the evaluation's collectives).
  finished = distributed.every_process(finished)
  if finished:
    # Nothing to run: its files stay as the run left them (a summary rewritten here would lose
    # the run's own compiles, wall_s and resumed_from).
    for book in books:
      book.close()
      logging.info('%s: the run finished its %d rounds already; its files are kept as they are',
                   book.workdir, c.num_rounds)
    return kept
  # A seed of the group that finished keeps its summary (the others are summarised): every
  # process skips its final evaluation, a collective, or none does (a mount may show process
  # 0's summary.json late on another host).
  kept = [k if distributed.every_process(k is not None) else None for k in kept]
  if vectorized and len({b.done for b in books}) > 1 and book_lib.may_go_back(books, c):
    # A kill between the seeds' saves of one round (or one seed's newest checkpoint set
    # aside) left their checkpoints at different rounds. Run apart, each group's program
    # pads to its own seeds, and the results were no longer the uninterrupted run's, bit for
    # bit. The seeds ahead go back to the round the others hold, where their checkpoint of it
    # reads back (keep_checkpoints > 1), and all run on together as before.
    book_lib.go_back(books, states, hps, data_id, known_ids)
  if vectorized and len({b.done for b in books}) > 1:
    return _run_apart(run, configs, workdirs, books)
  done = books[0].done
  # The rows are read (a damaged metrics.jsonl refused, config.json as it was), then the
  # configs adopted, then the rows cut (book_lib.open_rows says why in this order).
  keep_rows = book_lib.open_rows(books, done, c)
  book_lib.adopt(books, run, c.num_rounds)  # every check passed
  keep_rows()

  rounds = Rounds(run, [cf.seed for cf in configs] if vectorized else None)
  if vectorized:
    state = put(jax.device_get(jax.tree.map(lambda *x: jnp.stack(x), *states)),
                replicated(mesh))
  else:
    state = states[0]
  fresh = rounds.initial_hparams(state)  # [S, 3] when vectorised
  if vectorized:
    hp = np.stack([fresh[i] if h is None else h for i, h in enumerate(hps)])
  else:
    hp = fresh if hps[0] is None else hps[0]
  seeds = list(range(len(books))) if vectorized else [None]

  host_loop = run.local_loop == 'host'
  test_clients = np.flatnonzero(np.asarray(task.test.num_examples) > 0)
  sampled = bool(c.eval_clients) and c.eval_clients < len(test_clients)
  # Every evaluation takes the same clients (but a sampled run's last): small, they stay sent.
  rows = evaluation.batch_rows(c.eval_batch_size, task.test.num_examples)
  evaluate = make_evaluator(run.model, mesh, rows,
                            keep_bytes=0 if sampled else KEEP_BYTES)
  if not len(test_clients):
    logging.warning('%s: the test split holds no examples: nothing is evaluated, and '
                    'test_accuracy, rounds_to_target are null', task.name)
  elif c.eval_clients > len(test_clients):  # 0 = all, and a count past them is all of them too
    logging.warning('config.eval_clients=%d is more than the %d test clients with examples: '
                    'each evaluation takes all of them', c.eval_clients, len(test_clients))
  last_log = (time.time(), done)

  if rounds.compile_ahead is not None and len(test_clients) and done < c.num_rounds:
    # The evaluation's program compiles while round 1's does and the rounds before the first
    # evaluation run (on an H100 it made round 100 wait 4-15 s). It evaluates one seed's
    # parameters as the rounds return them: replicated.
    params = jax.tree.map(lambda a: jax.ShapeDtypeStruct(
        a.shape[1:] if vectorized else a.shape, a.dtype, sharding=replicated(mesh)),
        state.params)
    rounds.compile_ahead.also('evaluation', functools.partial(
        evaluate.lower, params, task.test, int(test_clients[0])))

  def evaluate_on_test(params, clients) -> dict:
    if rounds.compile_ahead is not None:
      rounds.compile_ahead.ready('evaluation')  # waits for its compile if still running
    return evaluate(params, task.test, clients)

  def evaluate_into(row: dict, book: Book, params, t: int) -> None:
    """Round t's evaluation into its row: on eval_clients sampled test clients, but the last
    round's on all of them (the final evaluation: the row, rounds_to_target and the summary
    say the same)."""
    if sampled and t != c.num_rounds:
      chosen = sample_clients(book.config.seed, t, rng.EVAL, test_clients, c.eval_clients)
    else:
      chosen = test_clients
    doing['what'] = 'evaluation'
    result = evaluate_on_test(params, chosen)
    book.last_eval = (t, len(chosen) == len(test_clients), result)
    row['test_accuracy'], row['test_loss'] = result['accuracy'], result['loss']
    row.update(evaluation.extra_accuracies(result))

  def amend_last_row(book: Book, row: dict) -> None:
    """Round `done`'s row, written again with `row`'s fields (by the process that holds the
    rows); the rows are then appended to as before."""
    last = book.log.last
    if last and last.get('round') == done and book.writer:
      book.writer.close()
      book.log = metrics.RowLog(c.target_accuracy)
      metrics.keep_rows(book.workdir, done, amend=row, into=book.log, check=False)
      book.writer = metrics.MetricsWriter(book.workdir)

  # Stopped after round T and run again with num_rounds = T: no round runs, but the last row
  # gets the evaluation an uninterrupted run of T rounds makes there (rows, rounds_to_target).
  # Taken further than it ended on an evaluation round, where it evaluated every test client
  # as a last round does, that row gets the sampled one an uninterrupted run makes there.
  # Every process evaluates (a collective), so all take process 0's word on where the run
  # ended (an old checkpoint's is read from summary.json, which process 0 writes); the one
  # that holds the rows amends them.
  for s, book in zip(seeds, books):
    every = (book.meta.get('config') or {}).get('eval_every') or c.eval_every
    if done != c.num_rounds and not (sampled and done and done % every == 0
                                     and distributed.process_zeros(book_lib.ended_at(book))):
      continue
    row = {}
    evaluate_into(row, book, _seed(state.params, s), done)
    amend_last_row(book, row)  # (the same values again where the row had them)

  finished_by = 0  # a signal that came in the last round: raised once the summary is written
  # Rejected rounds in a row, each run's, in its meta: counted on from its checkpoint (a
  # resumed run stops where an uninterrupted one does; a checkpoint from before the count was
  # kept has none). Every process sees the same (the round's outputs are replicated), so all
  # stop at the same round.
  for book in books:
    book.meta.setdefault('rejected_in_a_row', 0)
  # closing: compiles queued ahead are dropped however the loop ends, and those running waited
  # for. After the last round that wait is made with the stop handlers still in place: a
  # signal in it stops the run once its summary is written (SIGTERM killed it unsummarised),
  # and a second Ctrl-C still ends it at once. Ended by an error, the handlers are restored
  # first, so a signal in the wait acts at once, as before.
  with contextlib.closing(rounds), _stop_signals() as signals:
    for t in range(done + 1, c.num_rounds + 1):
      doing.update(what='round', round=t, hp=hp)
      state, m, plans = rounds(state, t, hp)
      stop = _agreed_stop(signals)
      used_all, hp = np.asarray(m.hparams), np.asarray(m.next_hparams)
      accepted_all = np.asarray(m.accepted)
      for s, book in zip(seeds, books):
        if book.diverged_at is None:  # (a stopped seed's count ended with it)
          book.count_rejected(bool(_seed(accepted_all, s)))
      # A seed whose max_rejected_rounds rounds in a row were rejected stops there, as it
      # would alone: its rows and checkpoint end at this round, while the program goes on for
      # the others. (A run whose last round completes the count has run every round.)
      newly = {id(b) for b in books if b.diverged_at is None and c.max_rejected_rounds
               and t < c.num_rounds and b.meta['rejected_in_a_row'] >= c.max_rejected_rounds}
      diverged = bool(newly) and all(b.diverged_at is not None or id(b) in newly
                                     for b in books)
      for s, book in zip(seeds, books):
        if book.diverged_at is not None:
          continue
        ms, plan = _seed(m, s), plans if s is None else plans[s]
        # Seeds in one program compute the longest lane and the largest B_pad of any of them
        # (but a stopped seed's: its plans are idle).
        others = () if s is None else tuple(p for i, p in enumerate(plans) if i != s)
        row = book.round_row(t, ms, _seed(used_all, s), plan,
                             plan.computed_rows(n_dev, host_loop, run.loop_chunk, others),
                             vectorized_seeds=len(books) if vectorized else 0)
        if t % c.eval_every == 0 or t == c.num_rounds:
          evaluate_into(row, book, _seed(state.params, s), t)
        row['wall_s'] = time.time() - book.start
        if book.writer:
          book.writer.write(row)
        book.log.add(row)
        ends = id(book) in newly
        if stop or ends or t % c.checkpoint_every == 0 or t == c.num_rounds:
          if book.writer:
            book.writer.sync()
          book.checkpointer.save(_seed(state, s), book.bookkeeping(t, _seed(hp, s)),
                                 wait=bool(stop) or ends or t == c.num_rounds)
        if ends:
          book.diverged_at = t
          book.close()
          if s is not None:
            rounds.stop_seed(s)
          if not diverged:
            logging.warning('%s%s; the other seeds go on', book.tag(vectorized),
                            failures.diverged_message(c, [(book, t)]))
      if t % c.log_every == 0 or t == c.num_rounds:
        now = time.time()
        speed = (t - last_log[1]) / max(now - last_log[0], 1e-9)
        for book in books:
          if book.diverged_at is None:  # (a stopped seed's last line was said)
            logging.info(book.tag(vectorized)
                         + metrics.progress_line(book.log.last, c.num_rounds, speed))
        last_log = (now, t)
      if stop and t < c.num_rounds:
        for book in books:
          book.close()
        logging.warning('signal %d: stopped after round %d, checkpoint saved; run the same '
                        'command again to resume', stop, t)
        raise Preempted(stop, t)
      if stop:  # in the last round: the run is done but for its summary, written first
        finished_by = stop
        logging.warning('signal %d: it came in the last round, %d, checkpoint saved; the run '
                        'writes its summary, then stops', stop, t)
      if diverged:
        for book in books:
          book.close()
        raise Diverged([b.workdir for b in books],
                       failures.diverged_message(c, [(b, b.diverged_at) for b in books]))
    rounds.close()  # (closing's own call after it does nothing)
    if not finished_by:  # every process asks: all then stop after the summary, or none does
      finished_by = _agreed_stop(signals)
  for book in books:
    book.close()

  summaries = []
  for s, book, old in zip(seeds, books, kept):
    if old is not None:  # finished before: a group of which a seed's summary was not written
      summaries.append(old)
      continue
    if book.diverged_at is not None:  # stopped, as it would alone: no summary
      continue
    params = _seed(state.params, s)
    # Final evaluation on the whole test set (reusing the last round's if it was already whole).
    if book.last_eval is not None and book.last_eval[0] == c.num_rounds and book.last_eval[1]:
      final = book.last_eval[2]
    else:
      doing.update(what='evaluation', round=c.num_rounds)
      final = evaluate_on_test(params, test_clients)
    summaries.append(summary_lib.write(book, final, params, _seed(hp, s), rounds, run,
                                       vectorized_seeds=len(books) if vectorized else 0))
  # The summaries are process 0's to write: the others wait for them (a barrier), so that a
  # write that fails (a full disk) ends them with its exit status, through the stop watcher,
  # where they had already exited 0.
  distributed.every_process(True)
  if finished_by:  # a sweep or a job script stops here, as the signal asked
    raise Preempted(finished_by, c.num_rounds)
  stopped = [(b, b.diverged_at) for b in books if b.diverged_at is not None]
  if stopped:  # the others finished, summarised: a sweep marks these failed, those done
    raise Diverged([b.workdir for b, _ in stopped], failures.diverged_message(c, stopped))
  return summaries



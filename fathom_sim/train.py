"""train_and_evaluate(config, workdir): the workdir, the round loop, evaluation, checkpoints,
metrics and the summary.

The run's parts are built in run.py; the host's side of each round is driver.py's Rounds, and
its computation the one jitted function of round.py.
"""

from __future__ import annotations

import contextlib
import dataclasses
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

from fathom_sim import compile_cache, distributed, fathom, metrics, provenance, rng
from fathom_sim import workdir as workdir_lib
from fathom_sim.checkpoint import Checkpointer
from fathom_sim.config import ConfigError
from fathom_sim.data.federated import Task, fingerprint
from fathom_sim.data.sampling import sample_clients
from fathom_sim.driver import Rounds
from fathom_sim.errors import Diverged, InputError, Preempted, exit_status
from fathom_sim.evaluation import KEEP_BYTES, make_evaluator
from fathom_sim.mesh import out_of_memory, put, replicated
from fathom_sim.run import Run, build, init_state, matmul_precision
from fathom_sim.types import BATCH, EPOCHS, ETA


class OutOfMemory(ConfigError):
  """A device ran out of memory: the config asks more than the devices hold. The workdir keeps
  its checkpoints and rows as they were; a sweep marks the run failed and goes on."""


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
      # (_closed_on_error) and the last checkpoint is where the run resumes.
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


def _out_of_memory_message(run: Run, doing: dict, xla: str) -> str:
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
    return (f'the evaluation after round {doing["round"]} ran out of memory {on} in batches '
            f'of config.eval_batch_size={c.eval_batch_size}; a smaller one resumes this workdir'
            f'{fewer_seeds}')
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


def _checkpoints_kept(workdirs: list[str]) -> str:
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
def _closed_on_error(run: Run, books: list, doing: dict, workdirs: list[str]):
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
    raise OutOfMemory(f'{_out_of_memory_message(run, doing, xla)}; '
                      f'{_checkpoints_kept(workdirs)}') from None


def _extra_accuracies(result: dict) -> dict:
  """A model's further accuracies (e.g. Stack Overflow's without OOV) as test_* fields."""
  return {f'test_{k}': v for k, v in result.items() if k.startswith('accuracy_')}


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
  return _train(configs, workdirs, vectorized=len(configs) > 1, task=task)


@dataclasses.dataclass
class _Book:
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


def _may_go_back(books: list[_Book], c: ml_collections.ConfigDict) -> bool:
  """Whether vectorised seeds whose checkpoints stand apart may all resume from the round the
  least advanced holds: one process (the agreements and removals of several are not made for
  it); every seed has rounds there; none is stopped by max_rejected_rounds (the others ran on
  beside it idle, which it would not be from an older round); none has a summary (a finished
  seed taken back would keep one of rounds its rows no longer have)."""
  def stopped(book: _Book) -> bool:
    limit = (book.meta.get('config') or {}).get('max_rejected_rounds', c.max_rejected_rounds)
    return bool(limit) and book.meta.get('rejected_in_a_row', 0) >= limit
  return (jax.process_count() == 1 and min(b.done for b in books) > 0
          and not any(stopped(b) for b in books)
          and not any(os.path.exists(os.path.join(b.workdir, metrics.SUMMARY_FILE))
                      for b in books))


def _execution(run: Run, config: ml_collections.ConfigDict) -> dict:
  """How this command executes the run's rounds (provenance.EXECUTION_FIELDS)."""
  return {'platform': run.mesh.devices.flat[0].platform, 'devices': int(run.mesh.devices.size),
          'processes': jax.process_count(), 'lanes_per_device': run.lanes_per_device,
          'batch_pad_per_octave': config.batch_pad_per_octave,
          'conv': run.conv if config.model.name == 'emnist_cnn' else None,
          'matmul_precision': matmul_precision(), 'local_loop': run.local_loop,
          'xla_flags': provenance.xla_flags()}


def _data_named(config: ml_collections.ConfigDict) -> str:
  """How the config names its data, for messages: config.data's name and folder or file."""
  named = [f'data.name={config.data.name}']
  for field in ('data_dir', 'path'):
    if config.data.get(field):
      named.append(f'data.{field}={config.data.get(field)}')
  return ', '.join(named)


def _other_data(workdir: str, config, saved: str, data_id: str) -> Exception:
  """The error of a workdir whose checkpoints were trained on other data than `data_id`."""
  return workdir_lib.WorkdirError(
      f'{workdir_lib.named(workdir)} holds a run trained on other data than this command gives '
      f'it ({_data_named(config)}): the clients, their example counts, the examples of a file '
      f'or prepared dataset, or its format or vocabulary differ (data fingerprint {saved}, now '
      f'{data_id}); '
      f'resume it on the data it was trained on, or {workdir_lib.another_folder()}')


def _seed(tree, s: int | None):
  """Seed s's slice of a stacked pytree (the tree itself when not vectorised)."""
  return tree if s is None else jax.tree.map(lambda x: x[s], tree)


def _train(configs: list[ml_collections.ConfigDict], workdirs: list[str], *,
           vectorized: bool, task: Task | None = None) -> list[dict]:
  books: list[_Book] = []
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
      with _closed_on_error(run, books, doing, workdirs):
        return _run(run, configs, workdirs, books, doing, cache_hits=cache_hits,
                    vectorized=vectorized)
  except (Preempted, Diverged):
    # Every process stops after the same round (_agreed_stop; the rounds' replicated
    # outputs): none is left waiting, and none is to be told to stop.
    raise
  except BaseException as e:
    # On several hosts the others would wait for this process in a collective: they stop
    # too, naming this error, with the exit status launch/cli.py ends this process with. Its
    # files are closed by now (_closed_on_error).
    distributed.stop_peers(str(e) if isinstance(e, InputError) else
                           f'{type(e).__name__}: {e}' if str(e) else type(e).__name__,
                           exit_status(e))
    raise
  finally:
    forget()


def _run(run: Run, configs: list[ml_collections.ConfigDict], workdirs: list[str],
         books: list[_Book], doing: dict, *, cache_hits: int, vectorized: bool) -> list[dict]:
  """_train's body: restores or starts each run (a _Book appended to `books` once its
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
    # Each host reads its own config file and data: an edit on one worker, or data prepared
    # otherwise there, would give the processes different programs (a hang) or different
    # examples under one mesh (silently wrong numbers).
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

  states, hps = [], []
  # Out of memory at the model's init, the corrected command may start afresh in these
  # workdirs only if none holds a round yet (workdir.started).
  doing['fresh'] = not any(workdir_lib.started(w) for w in workdirs)
  for config, workdir in zip(configs, workdirs):
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
        raise _other_data(workdir, config, ', '.join(sorted(saved)), data_id) from e
      raise
    except BaseException:
      checkpointer.close()
      raise
    if restored is None:
      meta = {'total_examples': 0, 'total_steps': 0, 'computed': 0, 'wall_s': 0.0}
      done, hp = 0, None
      meta['simulators'] = provenance.started()
      meta['executions'] = [{'from_round': 0, **_execution(run, config)}]
    else:
      state, meta = restored
      done, hp = int(meta['round']), np.asarray(meta['hp'], np.float32)
      # The config names the data, not what its folder holds now: data prepared again from
      # other files would silently make the resumed rounds another run's. (A checkpoint from
      # before the fingerprint was kept is taken as it is.)
      if meta.get('data', data_id) not in known_ids:
        checkpointer.close()
        raise _other_data(workdir, config, meta['data'], data_id)
      logging.info('%s: resuming from the checkpoint of round %d', workdir, done)
    meta['data'] = data_id
    books.append(_Book(config, workdir, checkpointer, done, meta, cache_hits=cache_hits))
    states.append(state)
    hps.append(hp)
  doing['what'] = 'init'
  for book in books:
    if book.done > c.num_rounds:  # (_train closes the books; found before the load by now)
      raise workdir_lib.too_few_rounds(book.workdir, book.done, c.num_rounds)
  kept = [_summary_of_finished(book, c.num_rounds) for book in books]
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
  if vectorized and len({b.done for b in books}) > 1 and _may_go_back(books, c):
    # A kill between the seeds' saves of one round (or one seed's newest checkpoint set
    # aside) left their checkpoints at different rounds. Run apart, each group's program
    # pads to its own seeds, and the results were no longer the uninterrupted run's, bit for
    # bit. The seeds ahead go back to the round the others hold, where their checkpoint of it
    # reads back (keep_checkpoints > 1), and all run on together as before.
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
  if vectorized and len({b.done for b in books}) > 1:
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
  for book in books:  # every check passed: the resumed runs' configs are this command's
    workdir_lib.save_config(book.workdir, book.config)
    if 'round' in book.meta:  # resumed: this simulator joins the list if it runs rounds
      book.meta['simulators'], warning = provenance.resumed(
          book.meta.get('simulators'), book.done, book.workdir,
          runs_rounds=book.done < c.num_rounds)
      if warning:
        logging.warning('%s', warning)
      book.meta.setdefault('executions', None)  # (a checkpoint saved before they were kept)
      if book.done < c.num_rounds:
        book.meta['executions'], warning = provenance.executed(
            book.meta.get('executions'), book.done, _execution(run, book.config), book.workdir)
        if warning:
          logging.warning('%s', warning)
  done = books[0].done

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
      off_period = done < c.num_rounds and done % every != 0 and (saved or _ended_at(book))
      book.log = metrics.RowLog(c.target_accuracy)
      dropped = metrics.keep_rows(book.workdir, done, done if off_period else None,
                                  into=book.log)
      if dropped:
        logging.info('%s: the run ended at round %d and goes on to %d; the evaluation of '
                     'round %d is dropped from %s (an uninterrupted run does not evaluate '
                     'there)', book.workdir, done, c.num_rounds, done, metrics.METRICS_FILE)
      book.writer = metrics.MetricsWriter(book.workdir)
    book.start = time.time() - float(book.meta['wall_s'])

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
  evaluate = make_evaluator(run.model, mesh, c.eval_batch_size,
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

  def evaluate_into(row: dict, book: _Book, params, t: int) -> None:
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
    row.update(_extra_accuracies(result))

  def amend_last_row(book: _Book, row: dict) -> None:
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
                                     and distributed.process_zeros(_ended_at(book))):
      continue
    row = {}
    evaluate_into(row, book, _seed(state.params, s), done)
    amend_last_row(book, row)  # (the same values again where the row had them)

  # closing: compiles queued ahead are dropped however the loop ends, and those running waited
  # for. After the last round that wait is made with the stop handlers still in place: a
  # signal in it stops the run once its summary is written (SIGTERM killed it unsummarised),
  # and a second Ctrl-C still ends it at once. Ended by an error, the handlers are restored
  # first, so a signal in the wait acts at once, as before.
  finished_by = 0  # a signal that came in the last round: raised once the summary is written
  # Rejected rounds in a row, each run's, in its meta: counted on from its checkpoint (a
  # resumed run stops where an uninterrupted one does; a checkpoint from before the count was
  # kept has none). Every process sees the same (the round's outputs are replicated), so all
  # stop at the same round.
  for book in books:
    book.meta.setdefault('rejected_in_a_row', 0)
  with contextlib.closing(rounds), _stop_signals() as signals:
    for t in range(done + 1, c.num_rounds + 1):
      doing.update(what='round', round=t, hp=hp)
      state, m, plans = rounds(state, t, hp)
      stop = _agreed_stop(signals)
      used_all, hp = np.asarray(m.hparams), np.asarray(m.next_hparams)
      accepted_all = np.asarray(m.accepted)
      for s, book in zip(seeds, books):
        if book.diverged_at is not None:  # stopped: its count ended with it
          continue
        in_a_row = book.meta['rejected_in_a_row']
        book.meta['rejected_in_a_row'] = 0 if bool(_seed(accepted_all, s)) else in_a_row + 1
        if bool(_seed(accepted_all, s)):
          book.rejected_by = None
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
        used, meta = _seed(used_all, s), book.meta
        # Seeds in one program compute the longest lane and the largest B_pad of any of them
        # (but a stopped seed's: its plans are idle).
        others = () if s is None else tuple(p for i, p in enumerate(plans) if i != s)
        computed = plan.computed_rows(n_dev, host_loop, run.loop_chunk, others)
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
        if vectorized:  # its wall_s is the group's clock: a report times rounds by it
          row['vectorized_seeds'] = len(books)
        if not ms.accepted:
          dropped = int(ms.dropped_clients)
          cause = ('clients' if dropped >= int(np.sum(np.asarray(plan.num_examples) > 0))
                   else 'step')
          book.rejected_by = cause if book.rejected_by in (None, cause) else 'both'
          why = ('no client returned a finite update' if cause == 'clients'
                 else 'the server or hyper step was not finite')
          logging.warning('%sround %d rejected: %s (%d clients dropped); the model is '
                          'unchanged%s', _tag(book, vectorized), t, why, dropped,
                          '' if c.algorithm == 'fedavg' else ' and the eta it used is halved')
        jump = metrics.loss_jump(book.log.accepted_loss, row, metrics.LOSS_JUMP)
        if jump is not None:
          logging.warning('%sround %d: the training loss rose %.3gx in one round (%.4g -> %.4g) '
                          'and the round was accepted; the run may be diverging (SGD can diverge '
                          'near zero training loss, on any device and precision; '
                          'a smaller eta, or upper_eta for FATHOM, takes smaller steps)',
                          _tag(book, vectorized), t, jump[1], jump[0], row['train_loss'])
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
            logging.warning('%s%s; the other seeds go on', _tag(book, vectorized),
                            _diverged_message(c, [(book, t)]))
      if t % c.log_every == 0 or t == c.num_rounds:
        now = time.time()
        speed = (t - last_log[1]) / max(now - last_log[0], 1e-9)
        for book in books:
          if book.diverged_at is None:  # (a stopped seed's last line was said)
            logging.info(_tag(book, vectorized) + metrics.progress_line(book.log.last,
                                                                        c.num_rounds, speed))
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
                       _diverged_message(c, [(b, b.diverged_at) for b in books]))
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
    summaries.append(_summary(book, final, params, _seed(hp, s), rounds, run,
                              vectorized=len(books) if vectorized else 0))
  # The summaries are process 0's to write: the others wait for them (a barrier), so that a
  # write that fails (a full disk) ends them with its exit status, through the stop watcher,
  # where they had already exited 0.
  distributed.every_process(True)
  if finished_by:  # a sweep or a job script stops here, as the signal asked
    raise Preempted(finished_by, c.num_rounds)
  stopped = [(b, b.diverged_at) for b in books if b.diverged_at is not None]
  if stopped:  # the others finished, summarised: a sweep marks these failed, those done
    raise Diverged([b.workdir for b, _ in stopped], _diverged_message(c, stopped))
  return summaries


def _diverged_message(c: ml_collections.ConfigDict, stopped: list[tuple[_Book, int]]) -> str:
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


def _summary_of_finished(book: _Book, num_rounds: int) -> dict | None:
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
    # command rewrote config.json, then rows past this round, and dropped or replaced the last
    # round's evaluation. Not finished as its files stand: run on, they are put back.
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


def _ended_at(book: _Book) -> bool:
  """Whether a run ended at the round of the checkpoint resumed from, and evaluated there as a
  last round: the one that saved it, as the config saved with it says (a run stopped at a
  periodic checkpoint then resumed with another eval_every did not end there), or a later
  command run with num_rounds at that round, which ran none and wrote summary.json."""
  saved = (book.meta.get('config') or {}).get('num_rounds')
  return saved == book.done or metrics.read_summary(book.workdir, book.done) is not None


def _tag(book: _Book, vectorized: bool) -> str:
  return f'seed {book.config.seed}: ' if vectorized else ''


def _wall_s(book: _Book, num_rounds: int) -> float:
  """The run's seconds, summed over the commands that ran its rounds: a command that ran none
  (a finished run summarised again, or one stopped at its last checkpoint) adds none of its
  own, and the run's are its summary's (else its last checkpoint's)."""
  if book.done < num_rounds:
    return time.time() - book.start
  summary = metrics.read_summary(book.workdir, num_rounds) or {}
  if isinstance(summary.get('wall_s'), (int, float)):  # (written by the command that ended
    return float(summary['wall_s'])  # there, as in _ended_at)
  return float(book.meta['wall_s'])


def _summary(book: _Book, final: dict, params, hp: np.ndarray, rounds: Rounds, run: Run, *,
             vectorized: int) -> dict:
  """Writes and returns the run's summary.json."""
  c, meta = book.config, book.meta
  compiles, ahead = rounds.compiles, rounds.compile_ahead
  l2, sha = metrics.params_digest(params)
  summary = {
      'algorithm': c.algorithm, 'task': run.task.name, 'rounds': c.num_rounds,
      **_execution(run, c), 'loop_chunk': run.loop_chunk,
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
      'vectorized_seeds': vectorized, 'resumed_from': book.done,
      'simulators': meta['simulators'], 'executions': meta['executions'],
      'wall_s': _wall_s(book, c.num_rounds), 'total_examples': meta['total_examples'],
      'total_local_steps': meta['total_steps'],
      'padding_efficiency': meta['total_examples'] / max(meta['computed'], 1),
      'final': {'test_accuracy': final['accuracy'], 'test_loss': final['loss'],
                'test_examples': final['count'], 'params_l2': l2, 'params_sha256': sha,
                **_extra_accuracies(final)},
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
               _tag(book, bool(vectorized)), c.num_rounds, summary['wall_s'], compiles,
               f' ({loaded} programs loaded from the compilation cache)' if loaded else '',
               final['accuracy'], final['loss'])
  return summary

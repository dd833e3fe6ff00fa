"""Several hosts, one run: joining JAX's distributed runtime, and who writes the run's files.

Every process runs the same program on the same config. Each samples and plans the same
cohorts (they are functions of seed and round alone) but loads and sends to its devices only
the examples of the lanes its own devices hold; the mesh spans all processes' devices, and the
collectives of the round cross hosts. Process 0 writes metrics, summary and config; all
processes take part in checkpoints (orbax writes each array once), so the workdir must be a
folder every host sees (a GCS bucket on a Cloud TPU pod).
"""

from __future__ import annotations

import atexit
import importlib
import os
import signal
import socket
import sys
import threading
import time
from typing import Callable

import jax
from absl import flags, logging

from fathom_sim.errors import EXIT_BAD_INPUT, first_line


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> None:
  """Joins the distributed runtime before any computation.

  On a Cloud TPU pod (or under Slurm / Open MPI) every argument may be None: JAX detects them.
  Elsewhere give all three, the same coordinator_address (host:port of process 0) on every
  process. CPU devices use gloo for their cross-process collectives.
  """
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  jax.distributed.initialize(coordinator_address=coordinator_address,
                             num_processes=num_processes, process_id=process_id)
  _orbax_syncs_on_the_coordination_service()
  _watch_for_stopped_peers()
  _record_sigterm()


def check_address(address: str) -> str | None:
  """What is wrong with a coordinator's host:port ([v6 address]:port too), None if nothing:
  its form and its port's range. A host that does not resolve (yet) is warned of, not
  refused: where process 0's name appears only once it is up (a Kubernetes service), JAX's
  own wait for it is what joins the run."""
  host, colon, port = address.rpartition(':')
  if host.startswith('['):
    host = host[1:-1] if host.endswith(']') else ''
  if not colon or not host or address.endswith(']'):
    return 'not of the form host:port'
  if not (port.isascii() and port.isdigit()) or not 1 <= int(port) <= 65535:
    return f'the port must be a number in [1, 65535], got {port!r}'
  try:
    socket.getaddrinfo(host, int(port))
  except (socket.gaierror, UnicodeError) as e:
    logging.warning('--coordinator_address=%s: the host %r does not resolve now (%s); JAX '
                    'waits for it (jax.distributed.initialize\'s timeout)', address, host, e)
  return None


# SIGTERM (a preemption notice, tpu_pod.sh stop) taken before the rounds' own handler is in
# place (train._stop_signals) or after it: the rounds read it at their first round's end.
_early_signals: list[int] = []


def _record_sigterm() -> None:
  """Joining the runtime starts JAX's preemption service, whose C++ handler takes SIGTERM and
  tells nothing that this program reads: a SIGTERM during the data load, restore or first
  compile was lost (the run went on until killed), and one after the rounds met the default
  action restored there, ending one host while the others waited in a collective."""
  if threading.current_thread() is threading.main_thread():
    signal.signal(signal.SIGTERM, lambda signum, frame: _early_signals.append(signum))


def take_early_signals() -> list[int]:
  """The stop signals recorded outside the rounds since the last call, oldest first."""
  taken = list(_early_signals)
  _early_signals.clear()
  return taken


# orbax's absl flag (orbax.checkpoint._src.multihost): barriers through jax.distributed's client.
ORBAX_BARRIER_FLAG = 'experimental_orbax_use_distributed_barrier'


def _orbax_syncs_on_the_coordination_service() -> None:
  """Makes orbax's checkpoint syncs wait at the distributed runtime's barrier (up to orbax's
  300 s) instead of running a collective over every device.

  On CPU that collective goes through gloo, which fails when the processes reach it more than
  30 s apart (the first contact's key-value lookup times out): a process that reached the
  first checkpoint sync that late failed a test run once. On accelerators the barrier also
  keeps checkpoint syncs off the devices.
  """
  importlib.import_module('orbax.checkpoint')  # defines the flag
  if ORBAX_BARRIER_FLAG in flags.FLAGS:
    flags.FLAGS[ORBAX_BARRIER_FLAG].value = True
  else:
    logging.warning('orbax has no --%s flag: its checkpoint syncs run as collectives',
                    ORBAX_BARRIER_FLAG)


def every_process(true: bool) -> bool:
  """Whether `true` holds on every process of the run (a collective on several hosts)."""
  if jax.process_count() == 1:
    return true
  import numpy as np
  from jax.experimental import multihost_utils
  return bool(np.min(multihost_utils.process_allgather(np.int32(true))))


def smallest(value: int) -> int:
  """The smallest of `value` (0 <= value < 2^31) over the processes (a collective on several
  hosts): for a decision each process measures for itself and all must take alike."""
  if jax.process_count() == 1:
    return value
  import numpy as np
  from jax.experimental import multihost_utils
  return int(np.min(multihost_utils.process_allgather(np.int32(value))))


def process_zeros(answer: bool) -> bool:
  """Process 0's `answer`, on every process (a collective on several hosts): for what only
  process 0 can be sure of, such as a file it writes that other hosts' mounts show late."""
  if jax.process_count() == 1:
    return answer
  import numpy as np
  from jax.experimental import multihost_utils
  return bool(multihost_utils.process_allgather(np.int32(answer))[0])


def differing_processes(values: dict[str, bytes]) -> dict[str, list[int]]:
  """For each named value that some process holds otherwise than process 0 (compared by
  sha256), those processes. A collective: every process calls it with the same names."""
  import hashlib
  import numpy as np
  from jax.experimental import multihost_utils
  if jax.process_count() == 1:
    return {}
  mine = np.stack([np.frombuffer(hashlib.sha256(v).digest(), np.uint8) for v in values.values()])
  every = np.asarray(multihost_utils.process_allgather(mine))  # [process, name, 32]
  out = {}
  for i, name in enumerate(values):
    others = [p for p in range(len(every)) if not np.array_equal(every[p, i], every[0, i])]
    if others:
      out[name] = others
  return out


def is_writer() -> bool:
  """True on the one process that writes the run's files (metrics, summary, config)."""
  return jax.process_index() == 0


# ---- stopping together ------------------------------------------------------------------
# A process that stops with an error leaves "<process>\n<its exit status>\n<its error>" under
# STOP_KEY in the distributed runtime's key-value store; every process watches that key from a
# thread. The others are then waiting in a round's collective for a process that is gone,
# where no Python code of theirs runs: measured on CPU (gloo), they waited 5 minutes, until the
# one that failed timed out in JAX's shutdown barrier, and then every process aborted with a
# stack dump (exit 134), the failed one included.

STOP_KEY = 'fathom_sim/stopped'
_POLL_MS = 500
_CHORES_S = 60.0  # at most this long for a stopping process's pending saves and its farewell

_watch: dict = {'thread': None, 'quiet': threading.Event(), 'chores': [], 'told': False}
# Who says why this process stops, once: its own error, or a peer's stop (the watching thread).
# Every process meeting the same error at once (a config that differs between hosts) printed
# both lines, its own and the peer's.
_word: dict = {'by': None}
_word_lock = threading.Lock()


def _claim_word(who: str) -> bool:
  with _word_lock:
    if _word['by'] is None:
      _word['by'] = who
    return _word['by'] == who


def _watch_for_stopped_peers() -> None:
  if _watch['thread'] is not None or jax.process_count() == 1:
    return
  _watch['quiet'].clear()
  _watch['told'] = False
  _word['by'] = None
  thread = threading.Thread(target=_watch_loop, name='fathom_sim-stop-watch', daemon=True)
  _watch['thread'] = thread
  thread.start()
  # Runs before JAX's own exit hook (registered earlier, at import) shuts the runtime down: the
  # thread leaves its blocking read before the client it reads through goes away.
  atexit.register(_stop_watching)


def _stop_watching() -> None:
  _watch['quiet'].set()
  thread = _watch['thread']
  if thread is not None and thread is not threading.current_thread():
    thread.join(timeout=2 * _POLL_MS / 1000)


def _watch_loop() -> None:
  from jax._src import distributed as jax_distributed  # the runtime's client: no public name
  me = jax.process_index()
  while not _watch['quiet'].is_set():
    client = jax_distributed.global_state.client
    if client is None:
      return
    try:
      # Not a blocking get with a timeout: each one that times out leaves its callback queued
      # at the coordinator until the key is set (never, in a healthy run), and memory behind
      # in both processes: 3,000 of them grew process 0 by 149 MB (jax 0.10.2), some GB a
      # day at this rate. A plain read kept it flat over 30,000 (docs/benchmarks.md).
      value = client.key_value_try_get(STOP_KEY)
    except Exception as e:  # noqa: BLE001 - the runtime raises one type for every status
      if 'NOT_FOUND' in str(e):  # no process has stopped
        _watch['quiet'].wait(_POLL_MS / 1000)
        continue
      if not _watch['quiet'].is_set():  # else: the runtime is shutting down at exit
        logging.warning('no longer watching for other processes stopping (%s)',
                        first_line(e))
      return
    process, _, rest = value.partition('\n')
    status, _, message = rest.partition('\n')
    if _watch['quiet'].is_set() or process == str(me):
      return
    _stop_this_process(process, message, int(status) if status.isdigit() else EXIT_BAD_INPUT)


def _stop_this_process(process: str, message: str, status: int) -> None:
  """Ends this process, from the watching thread, after its pending checkpoint saves finish
  and it leaves the runtime (JAX's shutdown barrier, which the stopped process waits at),
  with the stopped process's exit status: a job scheduler sees one status for one failure.
  Not where this process is already stopping with its own error, which it says."""
  _watch['quiet'].set()
  if not _claim_word('peer'):
    return
  print(f'error: process {process} of the run stopped: {message}; this process stops too',
        file=sys.stderr, flush=True)

  def chores():
    for chore in list(_watch['chores']):
      try:
        chore()
      except Exception as e:  # noqa: BLE001 - stopping goes on whatever a chore meets
        logging.warning('while stopping: %s: %s', type(e).__name__, e)
    try:
      jax.distributed.shutdown()
    except Exception as e:  # noqa: BLE001
      logging.warning('leaving the distributed runtime: %s: %s', type(e).__name__, e)

  done = threading.Thread(target=chores, daemon=True)
  done.start()
  done.join(_CHORES_S)
  logging.flush()
  sys.stdout.flush()
  # The main thread may be blocked in a collective that no longer completes: only an exit
  # that does not wait for it ends the process.
  os._exit(status)


def before_stopping(chore: Callable[[], None]) -> Callable[[], None]:
  """Registers `chore` (e.g. finishing pending checkpoint saves) to run when another process
  stops this one; returns the function that unregisters it."""
  _watch['chores'].append(chore)
  return lambda: _watch['chores'].remove(chore) if chore in _watch['chores'] else None


def stand_down() -> bool:
  """This process is ending by its own error: a peer's stop no longer ends it (it could cut
  the closing of its files short). False where a peer's stop came first: the watching thread
  has said why this process stops, and ends it."""
  _watch['quiet'].set()
  return _claim_word('self')


def _await_the_watcher() -> None:
  """Leaves the ending to the watching thread, which has printed why (within _CHORES_S)."""
  while True:
    time.sleep(1)


def stop_peers(message: str, status: int = EXIT_BAD_INPUT) -> None:
  """Tells the run's other processes that this one stops with the error `message` (its first
  line is passed on) and exit `status`: they stop too, saying so in one line, with that
  status. Call it once this process's files are closed (their pending checkpoint saves need
  the others), before saying the error. Does nothing in a run of one process, or when this
  process told them already (its error passes through _train, then launch/cli.fail). Where a
  peer's stop came first, it does not return: that peer's line is this process's."""
  if not stand_down():
    _await_the_watcher()
  from jax._src import distributed as jax_distributed
  client = jax_distributed.global_state.client
  if client is None or _watch['told']:  # one process, not joined to a runtime; or told
    return
  _watch['told'] = True
  first = message.strip().splitlines()[0] if message.strip() else 'an error'
  try:
    client.key_value_set(STOP_KEY, f'{jax.process_index()}\n{int(status)}\n{first}')
  except Exception as e:  # noqa: BLE001 - ALREADY_EXISTS: another process stopped first
    logging.info('a peer had stopped already (%s)', first_line(e))

"""Checkpoints of a run (orbax): the whole server state plus the host's bookkeeping.

A checkpoint at round t holds the `ServerState` after round t (params, server-optimizer state,
FATHOM's phi, hyper-optimizer state and moving average g, the round counter and the base key)
and, as JSON, what the host needs to continue exactly (the hyperparameters of round t+1 and the
cumulative counters) and the run's config, so that a checkpoint describes itself. Saves are
asynchronous; orbax writes each one under a temporary name and commits it by renaming, so a run
killed mid-save leaves the previous checkpoints intact.

The JSON also holds a sha256 of the state's arrays, and one of the JSON itself: orbax reads
bytes without a checksum, so a checkpoint whose bytes changed on disk would otherwise resume a
run from garbage (arrays), or plan its rounds from other hyperparameters and count from other
totals (JSON).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import sys
import threading
import warnings
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

from fathom_sim import distributed, metrics
from fathom_sim.errors import OutputError, first_line
from fathom_sim.mesh import out_of_memory
from fathom_sim.types import ServerState
from fathom_sim.workdir import CHECKPOINTS, UNREADABLE

_TMP = '.orbax-checkpoint-tmp'  # in the name of orbax's folder for a save not yet committed
_REMOVAL = 'delete_steps'  # orbax's function that removes the checkpoints past max_to_keep


def _chain(error: BaseException | None, *, implicit: bool):
  """`error`, then what caused it (`implicit`: or what was being handled when it was raised),
  each once."""
  seen = set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    yield error
    error = error.__cause__ or (error.__context__ if implicit else None)


def _raised_in(error: BaseException, function: str) -> bool:
  """Whether `error` (or what caused it) was raised inside a function of that name."""
  for e in _chain(error, implicit=True):
    tb = e.__traceback__
    while tb is not None:
      if tb.tb_frame.f_code.co_name == function:
        return True
      tb = tb.tb_next
  return False

# How tensorstore names the errno of a filesystem error in its message: "[os_error_code='28']"
# (0.1.86, this project's pin), "[OS error 28: No space left on device]" (older releases).
_TENSORSTORE_ERRNO = re.compile(r"\[os_error_code='?(\d+)'?\]|\[OS error (\d+):")


def _tensorstore_errno(error: BaseException) -> int | None:
  found = _TENSORSTORE_ERRNO.search(str(error))
  return None if found is None else int(found.group(1) or found.group(2))


def _filesystem_fault(error: BaseException) -> BaseException | None:
  """The error in `error`'s chain of causes that the filesystem raised, if any: an OSError, or
  tensorstore's ValueError for one (it names the errno, and orbax raises a bare Exception from
  it), which says nothing of the checkpoint's files. A file that is not there (ENOENT, or a
  FileNotFoundError with no errno, as orbax raises for a missing meta/metadata) is a
  checkpoint missing a part: damage, not a fault. (Causes only: an error raised while another
  was handled says what it says.)"""
  for e in _chain(error, implicit=False):
    if isinstance(e, OSError) and e.errno != errno.ENOENT and not isinstance(
        e, FileNotFoundError):
      return e
    code = _tensorstore_errno(e)
    if code is not None and code != errno.ENOENT:
      return e
  return None


def _said(error: BaseException) -> str:
  """An error named inside one line: its type and first line, after the errno's own words
  where tensorstore names one at the end of a long message (a full disk was said as
  'RESOURCE_EXHAUSTED: Error writing local file "<path>": Failed writing: "<path>...', the
  200 characters of a line cut before 'No space left on device')."""
  text = first_line(error) if str(error).strip() else ''
  said = type(error).__name__ + (f': {text}' if text else '')
  code = None if isinstance(error, OSError) else _tensorstore_errno(error)
  return said if code is None else f'{os.strerror(code)}: {said}'


DIGEST = 'state_sha256'  # meta's key for state_digest of the saved state
META_DIGEST = 'meta_sha256'  # meta's key for meta_digest of the rest of the JSON
# What the host reads of a checkpoint's JSON to go on (book.py); a checkpoint without one of
# these is unreadable, as one with a torn array is.
REQUIRED = ('round', 'hp', 'total_examples', 'total_steps', 'computed', 'wall_s')


def _host_copy(x) -> np.ndarray:
  """A leaf on the host. The server state is replicated: on several hosts, where no process
  addresses every device, the local copy is the whole array."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    x = x.addressable_data(0)
  return np.asarray(jax.device_get(x))


def state_digest(state: ServerState) -> str:
  """sha256 over the state's leaves in tree order: each one's dtype, shape and bytes."""
  digest = hashlib.sha256()
  for leaf in jax.tree.leaves(state):
    metrics.update_digest(digest, _host_copy(leaf))
  return digest.hexdigest()


def meta_digest(meta: dict[str, Any]) -> str:
  """sha256 of a checkpoint's JSON but its own digest, keys sorted: the same before a save and
  after a restore (JSON keeps Python's floats exactly)."""
  rest = {k: v for k, v in meta.items() if k != META_DIGEST}
  return hashlib.sha256(json.dumps(rest, sort_keys=True, allow_nan=True).encode()).hexdigest()


def _check_meta(meta: Any, step: int) -> None:
  """Raises ValueError where a restored checkpoint's JSON is not what save() wrote."""
  if not isinstance(meta, dict):
    raise ValueError(f'its JSON is a {type(meta).__name__}, not an object')
  missing = [k for k in REQUIRED if k not in meta]
  if missing:
    raise ValueError(f'its JSON lacks {", ".join(missing)}')
  # Checkpoints written before the JSON's digest existed have none to check.
  if META_DIGEST in meta and meta_digest(meta) != meta[META_DIGEST]:
    raise ValueError('its JSON differs from the one saved (sha256 mismatch)')
  if int(meta['round']) != step:
    raise ValueError(f'checkpoint {step} holds round {meta["round"]}')


# Orbax's coroutine reading one array of a checkpoint (orbax 0.12).
_ORBAX_ARRAY_READ = '_read_array_index_and_device_put'


def _quiet_closed_loop_callbacks() -> None:
  """Silences the messages a failed save or restore leaves behind. Orbax reads and writes a
  checkpoint's arrays in an asyncio loop that the first failure closes; reads and writes still
  in flight then finish into it, and each prints an "Event loop is closed" traceback (a full
  disk printed up to 9 above the save's error line), or its own read error (TensorStore's
  spec, ~60 lines each), through sys.unraisablehook, after the simulator has said the failure.
  Installed once, with the first checkpointer (the failure's own messages may come before the
  simulator learns of it); every other unraisable exception still goes to the hook before
  it."""
  before = sys.unraisablehook
  if getattr(before, 'fathom_sim_quiet', False):
    return

  def hook(unraisable):
    e = unraisable.exc_value
    closed_loop = isinstance(e, RuntimeError) and str(e) == 'Event loop is closed'
    array_read = getattr(unraisable.object, '__name__', None) == _ORBAX_ARRAY_READ
    if not (closed_loop or array_read):
      before(unraisable)

  hook.fathom_sim_quiet = True
  sys.unraisablehook = hook


def _skip_raw_byte_counts() -> None:
  """Stops orbax asking TensorStore for its byte counters around each array batch it saves.
  TensorStore 0.1.80-0.1.86's experimental_collect_matching_metrics leaks a list per metric a
  call, uncollectable (6 objects a call here; orbax 0.12 calls it a few times a save): with
  what else a save left, ~30 KB of host memory a checkpoint that a run never got back, 9 GB
  over a week of checkpoints every 50 quickstart rounds. The counts only feed orbax's
  throughput log line (silenced here) and its jax.monitoring figures; answered 0, orbax skips
  both. Checkpoints are written alike. (An orbax without the function is left as it is.)"""
  from orbax.checkpoint._src.serialization import tensorstore_utils
  if hasattr(tensorstore_utils, 'get_tensorstore_raw_bytes'):
    tensorstore_utils.get_tensorstore_raw_bytes = lambda direction=None: 0


class _KvStoreSpec:
  """tensorstore.KvStore.Spec, but that to_json() of a local folder's spec
  {'driver': 'file', 'path': p} is answered in Python. TensorStore 0.1.86's conversion of JSON
  to Python objects keeps a reference to each key and value it makes (never freed, and
  untracked by gc: no object count sees them), and orbax 0.12 resolves the spec of a save's
  folder 16 times a save: ~5 KB a checkpoint, over half of what a save left behind.
  TensorStore resolves such a spec to itself once it has checked the path (the Spec is still
  built, and raises as before), so checkpoints are written alike; any other spec goes to
  TensorStore."""

  def __init__(self, spec):
    import tensorstore
    self.json, self.spec = spec, tensorstore.KvStore.Spec(spec)

  def to_json(self, *args, **kwargs):
    j = self.json
    if (not args and not kwargs and isinstance(j, dict) and set(j) == {'driver', 'path'}
        and j['driver'] == 'file' and isinstance(j['path'], str) and self.spec.path == j['path']):
      return {'driver': 'file', 'path': j['path']}
    return self.spec.to_json(*args, **kwargs)


class _KvStore:
  """tensorstore.KvStore as orbax's tensorstore_utils uses it: Spec and open."""
  Spec = _KvStoreSpec

  @staticmethod
  def open(spec, *args, **kwargs):
    import tensorstore
    return tensorstore.KvStore.open(spec.spec if isinstance(spec, _KvStoreSpec) else spec,
                                    *args, **kwargs)


class _FileSpecResolver:
  """The tensorstore module as orbax's tensorstore_utils sees it: all of it but KvStore's
  (_KvStore)."""
  KvStore = _KvStore

  def __getattr__(self, name):
    import tensorstore
    return getattr(tensorstore, name)


def _resolve_file_specs_in_python() -> None:
  """Has orbax resolve its local folders' KvStore specs without TensorStore's leaking
  to_json (_FileSpecResolver). (An orbax without the module is left as it is.)"""
  try:
    from orbax.checkpoint._src.serialization import tensorstore_utils
  except ImportError:
    return
  if not isinstance(getattr(tensorstore_utils, 'ts', None), _FileSpecResolver):
    tensorstore_utils.ts = _FileSpecResolver()


def _state_handler() -> ocp.PyTreeCheckpointHandler:
  """Orbax's handler of the state's arrays, each written whole by one device. Orbax's default
  (unless $JAX_PLATFORMS names a GPU), "replica-parallel", splits a replicated array among the
  devices that hold it, each writing a part, through a slicing program compiled for each
  device and shape: 24 on the first save of the 8-device quickstart (1.5 s of its 4.5 s),
  hundreds on a pod slice, for a state of a few MB that one writer saves as fast. Only the
  chunking of the files differs: checkpoints saved either way read back alike."""
  from orbax.checkpoint._src.metadata import array_metadata_store  # (orbax 0.12's own default)
  array = ocp.type_handlers.ArrayHandler(use_replica_parallel=False,
                                         array_metadata_store=array_metadata_store.Store())
  registry = ocp.type_handlers.create_type_handler_registry(*[
      (t, array if t is jax.Array else ocp.type_handlers.get_type_handler(t))
      for t in ocp.type_handlers.supported_types()])
  return ocp.PyTreeCheckpointHandler(type_handler_registry=registry)


def _save_operation() -> str | None:
  """The id orbax gave the save it started last (it numbers each at its start); None where
  this orbax keeps none."""
  try:
    from orbax.checkpoint._src.futures import synchronization
    return synchronization.OperationIdGenerator.get_current_operation_id()
  except (ImportError, AttributeError):
    return None


def _let_go_of_waiters(operation: str | None) -> None:
  """Ends orbax's threads of the failed save `operation` that wait for a signal it will never
  send: where the save could not make its folder (no inodes left, a read-only mount), its
  writers waited for "directory created" for orbax's coordination timeout, and the process's
  exit waited on them: 300 s after the error line, then ~15 lines of timeouts. They are
  cancelled, then woken; another save's threads are left alone. In a run of one process only:
  on several hosts the signals are the distributed runtime's, and would wake the other
  processes' writers of the save too, uncancelled (they wait as before). (An orbax without
  these threads is left as it is.)"""
  if jax.process_count() > 1:
    return
  try:
    from orbax.checkpoint._src.futures import future
    waiting = [t for t in threading.enumerate() if isinstance(t, future._SignalingThread)
               and t.is_alive() and getattr(t, '_operation_id', None) == operation]
    for t in waiting:
      t.cancel()  # (woken cancelled, it returns before its work)
      future.set_signals(t._receive_signals, operation_id=operation)
  except (ImportError, AttributeError):
    return
  if waiting:  # their work's coroutines, never run, each said so at exit: 10 more lines
    warnings.filterwarnings('ignore', r"coroutine '.*' was never awaited", RuntimeWarning)


class CheckpointError(OutputError):
  """A checkpoint could not be saved (a full disk, a lost mount), or none could be read for a
  filesystem's error: the run stops, and the checkpoints stay where they were."""


class Checkpointer:
  """Saves and restores a run's checkpoints under <workdir>/checkpoints."""

  def __init__(self, workdir: str, keep: int):
    self.workdir = workdir
    self.directory = os.path.join(os.path.abspath(workdir), CHECKPOINTS)
    self.keep = keep
    self._pending: int | None = None  # the round of a save still finishing in the background
    self._operation: str | None = None  # orbax's id of that save
    self._manager = self._open()

  def _open(self) -> ocp.CheckpointManager:
    _skip_raw_byte_counts()
    _resolve_file_specs_in_python()
    _quiet_closed_loop_callbacks()
    # A run killed mid-save leaves orbax's temporary folder of that step; a resumed run that
    # never saves that step again (it was the last) would keep it for good. Orbax removes it
    # without a word: said here, so that a log tells why a run resumed from an earlier round.
    if os.path.isdir(self.directory):
      cut = sorted({n.split('.')[0] for n in os.listdir(self.directory) if _TMP in n},
                   key=lambda n: (len(n), n))  # 9 before 10
      if cut:
        logging.warning('%s: the unfinished save of round %s (a run stopped mid-save) is '
                        'removed', self.directory, ', '.join(cut))
    options = ocp.CheckpointManagerOptions(max_to_keep=self.keep,
                                           enable_async_checkpointing=True, create=True,
                                           cleanup_tmp_directories=True)
    return ocp.CheckpointManager(self.directory, options=options, item_handlers={
        'state': _state_handler(), 'meta': ocp.JsonCheckpointHandler()})

  def steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def saved_values(self, key: str) -> set:
    """The values of `key` in the checkpoints' meta, of those whose meta reads as JSON: what
    the checkpoints say of themselves when their states do not read back (read from orbax's
    file of the item, not through it: this process alone, no collective)."""
    values = set()
    for step in self.steps():
      try:
        with open(os.path.join(self.directory, str(step), 'meta', 'metadata'), 'rb') as f:
          meta = json.load(f)
      except (OSError, ValueError):
        continue
      if isinstance(meta, dict) and isinstance(meta.get(key), str):
        values.add(meta[key])
    return values

  def save(self, state: ServerState, meta: dict[str, Any], *, wait: bool = False) -> None:
    """Saves round `state.round`; returns once the device arrays are copied, unless `wait`."""
    step = int(meta['round'])
    meta = json.loads(json.dumps({**meta, DIGEST: state_digest(state)}))  # as restored
    meta[META_DIGEST] = meta_digest(meta)
    # Orbax raises a background save's error at the next call: the previous save is waited for
    # (orbax's save waits for it anyway) so that its error is said as its own.
    self._finished_or_raise(self._manager.wait_until_finished)
    self._finished_or_raise(self._manager.check_for_errors)
    self._pending = step

    def start():
      before = _save_operation()
      try:
        self._manager.save(step, args=ocp.args.Composite(
            state=ocp.args.PyTreeSave(state), meta=ocp.args.JsonSave(meta)))
      finally:  # (one that raised may have started threads; one raised before it was
        # numbered, none: the id is then another save's, a vectorised seed's, left alone)
        after = _save_operation()
        self._operation = after if after != before else None

    self._finished_or_raise(start)
    if wait:
      self.wait()

  def _finished_or_raise(self, call) -> None:
    try:
      call()
    except Exception as e:  # noqa: BLE001 - orbax's or the filesystem's, whatever it is
      step, self._pending = self._pending, None
      if step is not None and _raised_in(e, _REMOVAL) and self._committed(step):
        # What failed is the removal of the checkpoints past keep_checkpoints, which orbax
        # makes in the same background step. Raised as the save's, it stopped the run, and
        # again after every interval.
        logging.warning('%s: the checkpoint of round %d is saved, but removing older ones '
                        '(keep_checkpoints=%d) failed (%s: %s); they stay on disk, and are '
                        'removed with the next ones', self.directory, step, self.keep,
                        type(e).__name__, first_line(e))
        self._manager.reload()  # orbax's list of the steps, read again from disk
        return
      if self._operation is not None:
        _let_go_of_waiters(self._operation)
      named = _filesystem_fault(e) or e  # (not orbax's wrapper, whose first line is a spec)
      raise CheckpointError(
          f'{self.directory}: saving the checkpoint of round {step} failed ({_said(named)}); '
          'the newest complete checkpoint stays, and the same command resumes from it once '
          'the filesystem is writable') from e

  def _committed(self, step: int) -> bool:
    """Whether round `step`'s save has been renamed from its temporary folder whole: on a
    bucket's mount a rename copies object by object, and one that failed leaves part of the
    folder beside what is left of the temporary one."""
    try:
      names = os.listdir(self.directory)
    except OSError:
      return False
    return str(step) in names and not any(n.startswith(f'{step}.') and _TMP in n
                                          for n in names)

  def restore_newest(self, like: ServerState) -> tuple[ServerState, dict] | None:
    """The newest checkpoint that reads back whole (None without any); unreadable newer ones
    are then moved aside. Raises WorkdirError, moving nothing, when none reads back."""
    from fathom_sim.workdir import WorkdirError  # (workdir imports this module)
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
    # orbax lists step folders only: a file in a step's place would be passed over in silence.
    listed = os.listdir(self.directory) if os.path.isdir(self.directory) else []  # (made by
    strays = sorted(n for n in listed  # process 0: another's may not exist, on a wrong mount)
                    if n.isdigit() and not os.path.isdir(os.path.join(self.directory, n)))
    if strays:
      logging.warning('%s: %s in place of checkpoint folders, skipped', self.directory,
                      ', '.join(f'{n} is a file' for n in strays))
    steps = self.steps()
    if jax.process_count() > 1:
      # One agreement a step below, so every process must list the same steps: a host whose
      # mount failed (an empty local folder) or lists stale ones would pair its collectives
      # with others' and have process 0 set a readable checkpoint aside.
      differ = distributed.differing_processes({'steps': json.dumps(steps).encode()})
      if differ:
        raise WorkdirError(
            f'{self.directory}: process(es) {", ".join(map(str, differ["steps"]))} list other '
            f'checkpoints than process 0 (process {jax.process_index()} lists '
            f'{steps or "none"}); every host must see the one workdir (a mount that failed on '
            'one is a plain local folder there)')
    unread = []  # (step, why) of the newer checkpoints that did not read back
    filesystem = True  # whether every read that failed here failed with an OSError (agreed
    # below: each process must stop with the same exit status)
    for step in reversed(steps):
      why = None
      try:
        state, meta = self._read(step, abstract)
      except Exception as e:  # any failure to read means: not a usable checkpoint
        if out_of_memory(e):  # ... but a device too full to hold it says nothing of the files
          raise
        fault = _filesystem_fault(e)
        why = _said(fault or e)
        filesystem = filesystem and fault is not None
      # On several hosts every process must resume the same round, and the folder is moved
      # only once none reads it: each moving it as it failed, one moved it under another's
      # read, and the second move failed (a traceback, or orbax's syncs out of step: a hang).
      try:
        whole = distributed.every_process(why is None)
      except Exception as e:  # noqa: BLE001 - the collective's own error, whatever it is
        # A read that failed on some hosts only skips orbax's closing barrier there, and the
        # processes reach this agreement apart.
        raise WorkdirError(
            f'{self.directory}: the processes could not agree whether the checkpoint of round '
            f'{step} reads back ({why or "it read here"}; {first_line(e)}): some host sees '
            'other files there than the others') from e
      if whole:
        for bad, bad_why in unread:
          logging.warning('checkpoint of round %d is unreadable (%s); moved to %s, resuming '
                          'from round %d', bad, bad_why, self._set_aside(bad), step)
        return state, meta
      unread.append((step, why or 'another process could not read it'))
    if unread:
      # Not a start from round 0: a failing mount, a process out of file handles, or a
      # version of the code whose server state differs fails every read alike, and starting
      # over would redo the whole run (and cut metrics.jsonl to round 0) after a passing fault.
      # Every read failing with an OSError (EIO, too many open files) is the filesystem's, to
      # retry (exit 1; a sweep stops): not the workdir's fault (exit 2; a sweep goes on).
      error = CheckpointError if distributed.every_process(filesystem) else WorkdirError
      raise error(
          f'{self.directory}: no checkpoint reads back ('
          + '; '.join(f'round {step}: {why}' for step, why in unread)
          + '); none was moved. If the filesystem failed, run the same command once it reads '
          'again; if the checkpoints were saved by another version of fathom_sim, resume with '
          f'that one; to start again from round 0, move {CHECKPOINTS}/ out of the workdir')
    return None

  def _read(self, step: int, abstract) -> tuple[ServerState, dict]:
    """Round `step`'s state and meta, checked whole; raises if they do not read back."""
    restored = self._manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.PyTreeRestore(abstract, ocp.checkpoint_utils.construct_restore_args(
            abstract)), meta=ocp.args.JsonRestore()))
    state, meta = restored.state, restored.meta
    _check_meta(meta, step)
    if int(_host_copy(state.round)) != step:
      raise ValueError(f'checkpoint {step} holds the state of round '
                       f'{int(_host_copy(state.round))}')
    # Checkpoints written before the digest existed have none to check.
    if DIGEST in meta and state_digest(state) != meta[DIGEST]:
      raise ValueError('its arrays differ from the ones saved (sha256 mismatch)')
    return state, meta

  def restore_older(self, like: ServerState, step: int) -> tuple[ServerState, dict] | None:
    """Round `step`'s checkpoint, where it is kept and reads back (None otherwise), for one
    process (book.may_go_back): no agreement among processes is made. Moves nothing aside:
    one that does not read back is left to restore_newest."""
    if step not in self.steps():
      return None
    try:
      return self._read(step, jax.tree.map(ocp.utils.to_shape_dtype_struct, like))
    except Exception as e:  # noqa: BLE001 - not readable: the caller goes on without it
      if out_of_memory(e):
        raise
      return None

  def drop_newer_than(self, step: int) -> None:
    """Removes the checkpoints past round `step`: the run goes on from `step`, and saves those
    rounds again. Raises CheckpointError naming the folder where one cannot be removed."""
    for newer in self.steps():
      if newer > step:
        try:
          self._manager.delete(newer)
        except Exception as e:  # noqa: BLE001 - orbax's or the filesystem's, whatever it is
          raise CheckpointError(
              f'{self.directory}: the checkpoint of round {newer} could not be removed to go '
              f'back to round {step} ({_said(_filesystem_fault(e) or e)}); the same command '
              'tries again once the filesystem is writable') from e

  def _set_aside(self, step: int) -> str:
    """Moves step's folder into UNREADABLE (process 0 alone; the others wait for it) and
    re-reads the steps: a step still listed would stop orbax saving that round again on that
    process alone, and the processes' checkpoint syncs would fall out of step (a hang)."""
    target = f'{UNREADABLE} (by process 0)'
    if jax.process_index() == 0:
      target_dir = os.path.join(self.workdir, UNREADABLE)
      os.makedirs(target_dir, exist_ok=True)
      target = os.path.join(target_dir, str(step))
      suffix = 0
      while os.path.exists(target):
        suffix += 1
        target = os.path.join(target_dir, f'{step}.{suffix}')
      shutil.move(os.path.join(self.directory, str(step)), target)
      # Kept for whoever wants to look, never deleted: one a bad save, a whole checkpoint
      # each, so over a long run of preemptions they may add up.
      try:
        held = sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(target_dir)
                   for f in files)
        logging.warning('%s holds %d set-aside checkpoint(s), %.1f MiB: delete them once they '
                        'are no longer wanted', target_dir, len(os.listdir(target_dir)),
                        held / 2**20)
      except OSError:  # (files deleted meanwhile, a dangling link): the count is a courtesy
        pass
    distributed.every_process(True)  # (a barrier: process 0 has moved it)
    # Re-reads the steps on disk. Closing and reopening the manager instead left orbax's
    # background threads printing "Event loop is closed" tracebacks.
    self._manager.reload()
    return target

  def wait(self) -> None:
    """Returns once the pending saves are on disk; raises CheckpointError if one failed."""
    self._finished_or_raise(self._manager.wait_until_finished)
    self._finished_or_raise(self._manager.check_for_errors)
    self._pending = None

  def close(self) -> None:
    try:
      self.wait()
    finally:  # orbax's threads and handles are let go, whether or not the last save failed
      self._manager.close()

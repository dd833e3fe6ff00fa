"""JAX's persistent compilation cache: a program compiled by one run is loaded by the next.

A run compiles a round program per padded shape, plus evaluation and set-up programs. A rerun,
a resumed run (after a preemption) and the runs of a sweep compile the same programs again.
With the cache on, they load them from disk instead: the 500-round quickstart took 23.5-28.5 s
instead of 37.5-40.4 s end to end on 2 CPU cores, with the same final params
(docs/benchmarks.md). Turn it on before the process compiles anything: JAX sets its cache up
at the first compile.
An entry is keyed by the program and the jax version, backend and devices, so a loaded program
is the one compilation would have made; and by the folder's own path (JAX names a folder inside
it among the compile options, even on a CPU), so a folder copied or mounted elsewhere loads
nothing. An unreadable entry (cut short, e.g. a process killed while writing it, or its
compressed bytes altered: zlib's checksum) is skipped with a warning at every load, and the
program is compiled; deleting the folder clears it. JAX checks no sum of its own: an entry
altered before compression (a faulty writer, an edit by hand) is loaded as it is, and a run
of it ended with SIGILL. The devices enter the key as the topology each process sees: for CPU host
devices that differs per process, so a multi-process CPU run loads on process 0 only (the others
miss and compile; docs/benchmarks.md).
"""

from __future__ import annotations

import contextlib
import os
import threading

import jax
from jax import monitoring

from fathom_sim.errors import first_line

CACHE_HIT = '/jax/compilation_cache/cache_hits'  # jax.monitoring's event for a program loaded
MAX_BYTES = 4 * 2**30  # the default folder's cap (a CPU round program takes ~0.1 MB)
# JAX keeps only programs that took 1 s or more to compile: each command compiled the cohort
# sampler (0.8 s on 2 CPU cores) and the initial model's draws (1.1 s) again, half of what a
# small run's 4 rounds and checkpoints take. Loading one from a local disk takes milliseconds,
# so a local folder keeps every program: the ~25 operations the initial model is drawn with,
# one by one (bit for bit as the package draws it), took 0.7 s of each command at 0.2 s.
MIN_COMPILE_SECONDS = 0.0
# A folder several processes or machines share (a bucket's mount, gs://) pays a round trip per
# entry, which may cost more than compiling a small program: there, only the bigger ones.
SHARED_MIN_COMPILE_SECONDS = 0.2
# JAX's names for an entry's program and its last access (jax/_src/lru_cache.py).
_CACHE_SUFFIX, _ATIME_SUFFIX = '-cache', '-atime'
_lock = threading.Lock()  # compile_ahead loads programs on a thread too
_hits = 0
_thread = threading.local()  # the hits of each thread (JAX records one on the loading thread)


def default_dir() -> str:
  """$JAX_COMPILATION_CACHE_DIR if set, else $XDG_CACHE_HOME/fathom_sim/jax (by default
  ~/.cache/fathom_sim/jax)."""
  named = os.environ.get('JAX_COMPILATION_CACHE_DIR')
  if named:
    return named
  base = os.environ.get('XDG_CACHE_HOME') or os.path.join(os.path.expanduser('~'), '.cache')
  return os.path.join(base, 'fathom_sim', 'jax')


def enable(path: str, max_bytes: int | None = None) -> None:
  """Keeps compiled programs in `path` (all of them in a single process's local folder, those
  that took SHARED_MIN_COMPILE_SECONDS or more to compile in a remote or multi-process one,
  unless $JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS says otherwise) and loads them from
  there; with `max_bytes`, a single process's local folder is held to that size (unless
  $JAX_COMPILATION_CACHE_MAX_SIZE says otherwise) by dropping the least recently used
  programs. Raises OSError with the reason when a local `path` cannot be created or written
  by the process that writes it (process 0: the others only read, and a folder they cannot
  see only misses)."""
  if '://' in path:
    if jax.process_index() == 0:
      _check_remote(path)
  else:
    path = os.path.abspath(os.path.expanduser(path))
    if jax.process_index() == 0:
      os.makedirs(path, exist_ok=True)
      if not os.access(path, os.W_OK | os.X_OK):
        raise PermissionError(f'{path!r} is not writable')
    # Not for several processes: a pod's workers share a folder on a bucket's mount, where
    # JAX's file lock does not hold across machines and every read would write an access time.
    if (max_bytes is not None and 'JAX_COMPILATION_CACHE_MAX_SIZE' not in os.environ
        and jax.process_count() == 1):
      jax.config.update('jax_compilation_cache_max_size', int(max_bytes))
    # Whoever capped it (here, or $JAX_COMPILATION_CACHE_MAX_SIZE, which JAX reads itself).
    if jax.config.jax_compilation_cache_max_size != -1 and jax.process_index() == 0:
      _stamp_access_times(path)
  if 'JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS' not in os.environ:  # (JAX's, read by JAX)
    shared = '://' in path or jax.process_count() > 1
    jax.config.update('jax_persistent_cache_min_compile_time_secs',
                      SHARED_MIN_COMPILE_SECONDS if shared else MIN_COMPILE_SECONDS)
  jax.config.update('jax_enable_compilation_cache', True)
  jax.config.update('jax_compilation_cache_dir', path)


def _check_remote(path: str) -> None:
  """Raises OSError where a remote folder cannot be made through etils' epath, as JAX writes
  it (gs:// without gcsfs installed, an unknown scheme): JAX only warned, once, and the run
  cached nothing. (Whether a bucket's folder may be written is not tried here.)"""
  try:
    from etils import epath
    epath.Path(path).mkdir(parents=True, exist_ok=True)
  except Exception as e:  # (etils' and each filesystem's own errors, of any kind)
    raise OSError(f'{type(e).__name__}: {first_line(e)}') from None


def _stamp_access_times(path: str) -> None:
  """Gives each entry without one the access-time file JAX's size cap reads (its mtime): an
  entry written uncapped has none, and with one such entry in the folder JAX's eviction
  failed, and with it every later write (FileNotFoundError warnings, nothing cached)."""
  for name in os.listdir(path):
    if name.endswith(_CACHE_SUFFIX):
      stamp = os.path.join(path, name[:-len(_CACHE_SUFFIX)] + _ATIME_SUFFIX)
      if not os.path.exists(stamp):
        with contextlib.suppress(OSError):  # (deleted meanwhile: nothing to stamp)
          mtime = os.stat(os.path.join(path, name)).st_mtime_ns
          with open(stamp, 'wb') as f:
            f.write(mtime.to_bytes(8, 'little'))


def disable() -> None:
  """Compiles every program (also where $JAX_COMPILATION_CACHE_DIR names a cache)."""
  jax.config.update('jax_enable_compilation_cache', False)


def hits() -> int:
  """Programs this process has loaded from a persistent cache since this module's import,
  however the cache was turned on (`enable`, or $JAX_COMPILATION_CACHE_DIR, which JAX reads
  itself)."""
  return _hits


def thread_hits() -> int:
  """Programs the calling thread has loaded from a persistent cache."""
  return getattr(_thread, 'hits', 0)


def _count(event: str, **kwargs) -> None:
  global _hits
  if event == CACHE_HIT:
    with _lock:
      _hits += 1
    _thread.hits = thread_hits() + 1


# From import, not from `enable`: a library caller may turn the cache on through JAX's own
# variable, and its loads belong in the run's summary too.
monitoring.register_event_listener(_count)

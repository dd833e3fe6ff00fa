"""Test session setup: 8 CPU devices (before jax is imported anywhere), the repo on the path, and
compilation caches of the session's own: one for the commands the tests start, one for the
programs the tests build in their own process."""

import atexit
import os
import shutil
import sys
import tempfile

os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                           ' --xla_force_host_platform_device_count=8').strip()
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# The commands' persistent compilation cache (fathom_sim/compile_cache.py) goes under
# $XDG_CACHE_HOME by default: the session's runs share one of their own, never the user's.
_CACHE_HOME = tempfile.mkdtemp(prefix='fathom_sim_test_cache_')
atexit.register(shutil.rmtree, _CACHE_HOME, ignore_errors=True)
os.environ['XDG_CACHE_HOME'] = _CACHE_HOME
os.environ.pop('JAX_COMPILATION_CACHE_DIR', None)

import jax  # noqa: E402  (after XLA_FLAGS: the backend reads it once)

# The tests build the same programs again and again (every run of a resume test, each seed
# beside its solo run, the slow references' model), each time from new closures that jit's own
# cache cannot match. JAX's persistent cache keys a program by its HLO, so a process compiles
# each once and loads it after: the suite took 534 s instead of 818-828 s on 2 cores. One
# folder per process (pytest-xdist's workers too): JAX writes an entry in place, and a worker
# could read another's half-written one. Programs that compile in under 0.2 s are not kept.
# Counts of compiles stay what they were: JAX's compile event times a load as it does a compile.
_PROGRAMS = tempfile.mkdtemp(prefix='fathom_sim_test_programs_')
atexit.register(shutil.rmtree, _PROGRAMS, ignore_errors=True)
jax.config.update('jax_compilation_cache_dir', _PROGRAMS)
jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.2)


def pytest_configure(config):
  # Without x64, JAX truncates an explicit float64 request to float32 with only a warning; in
  # the package that is a dtype taken from numpy inputs (e.g. parameters given as float64
  # arrays), which would change under jax_enable_x64, so a test that meets one fails.
  config.addinivalue_line('filterwarnings',
                          'error:Explicitly requested dtype float64:UserWarning')

"""Test session setup: 8 CPU devices (before jax is imported anywhere), the repo on the path, and
a compilation cache of the session's own."""

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


def pytest_configure(config):
  # Without x64, JAX truncates an explicit float64 request to float32 with only a warning; in
  # the package that is a dtype taken from numpy inputs (e.g. parameters given as float64
  # arrays), which would change under jax_enable_x64, so a test that meets one fails.
  config.addinivalue_line('filterwarnings',
                          'error:Explicitly requested dtype float64:UserWarning')

"""The persistent compilation cache of the commands (fathom_sim/compile_cache.py)."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest

from fathom_sim import compile_cache
from tests.common import uncreatable_path
from tests.test_cli import QUICKSTART, ROOT, launch

RUN = (f'--config={QUICKSTART}', '--config.num_rounds=4', '--config.eval_every=4')


def _summary(workdir) -> dict:
  with open(os.path.join(workdir, 'summary.json')) as f:
    return json.load(f)


def test_default_folder_follows_jax_s_variable_then_xdg_then_home(monkeypatch, tmp_path):
  monkeypatch.setenv('JAX_COMPILATION_CACHE_DIR', str(tmp_path / 'named'))
  monkeypatch.setenv('XDG_CACHE_HOME', str(tmp_path / 'xdg'))
  assert compile_cache.default_dir() == str(tmp_path / 'named')
  monkeypatch.delenv('JAX_COMPILATION_CACHE_DIR')
  assert compile_cache.default_dir() == str(tmp_path / 'xdg' / 'fathom_sim' / 'jax')
  monkeypatch.delenv('XDG_CACHE_HOME')
  monkeypatch.setenv('HOME', str(tmp_path / 'home'))
  assert compile_cache.default_dir() == str(tmp_path / 'home' / '.cache' / 'fathom_sim' / 'jax')


def test_a_second_run_loads_its_programs_and_ends_with_the_same_params(tmp_path, monkeypatch):
  # The tiny run's programs compile in well under JAX's default 1 s threshold for caching.
  monkeypatch.setenv('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0')
  cache = tmp_path / 'cache'
  first, second = (launch(*RUN, f'--workdir={tmp_path / name}', f'--compilation_cache={cache}')
                   for name in ('first', 'second'))
  assert first.returncode == 0, first.stderr[-3000:]
  assert second.returncode == 0, second.stderr[-3000:]
  a, b = _summary(tmp_path / 'first'), _summary(tmp_path / 'second')
  assert any(cache.iterdir())
  # A run meets a few programs twice (the same computation jitted apart): those it loads even
  # the first time. The second run loads its round programs too.
  assert b['compile_cache_hits'] >= a['compile_cache_hits'] + b['compiles']
  assert b['compiles'] >= 1
  assert 'programs loaded from the compilation cache' in second.stdout
  assert b['final']['params_sha256'] == a['final']['params_sha256']
  assert b['compiles'] == a['compiles']


def test_an_empty_value_compiles_everything_and_writes_no_cache(tmp_path, monkeypatch):
  monkeypatch.setenv('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0')
  # Even where JAX's own variable names a cache.
  monkeypatch.setenv('JAX_COMPILATION_CACHE_DIR', str(tmp_path / 'named'))
  for name in ('first', 'second'):
    p = launch(*RUN, f'--workdir={tmp_path / name}', '--compilation_cache=')
    assert p.returncode == 0, p.stderr[-3000:]
    assert _summary(tmp_path / name)['compile_cache_hits'] == 0
  assert not (tmp_path / 'named').exists()


def test_the_default_folder_is_used_when_none_is_given(tmp_path, monkeypatch):
  monkeypatch.setenv('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0')
  monkeypatch.setenv('XDG_CACHE_HOME', str(tmp_path / 'xdg'))
  p = launch(*RUN, f'--workdir={tmp_path / "run"}')
  assert p.returncode == 0, p.stderr[-3000:]
  assert any((tmp_path / 'xdg' / 'fathom_sim' / 'jax').iterdir())


def test_a_cache_folder_that_cannot_be_made_is_one_clear_error_before_any_run_file(tmp_path):
  target = uncreatable_path(tmp_path, 'cache')
  workdir = tmp_path / 'run'
  p = launch(*RUN, f'--workdir={workdir}', f'--compilation_cache={target}')
  assert p.returncode == 2, p.stderr[-2000:]
  errors = [line for line in p.stderr.splitlines() if line.startswith('error:')]
  assert len(errors) == 1 and f'--compilation_cache {target!r} cannot be used' in errors[0]
  assert not workdir.exists()


@pytest.mark.parametrize('url,why', [('nosuch://b/jax', "KeyError: 'nosuch://'"),
                                     ('gs://a-bucket/jax', 'ImportError: Please install gcsfs')])
def test_a_remote_cache_jax_cannot_write_is_one_clear_error_before_any_run_file(tmp_path, url,
                                                                                  why):
  """JAX warned once (gcsfs is not among the requirements) and the run cached nothing."""
  if url.startswith('gs:') and importlib.util.find_spec('gcsfs') is not None:
    pytest.skip('gcsfs is installed: the check would reach the bucket')
  workdir = tmp_path / 'run'
  p = launch(*RUN, f'--workdir={workdir}', f'--compilation_cache={url}')
  assert p.returncode == 2, p.stderr[-2000:]
  errors = [line for line in p.stderr.splitlines() if line.startswith('error:')]
  assert len(errors) == 1 and errors[0].startswith(
      f'error: --compilation_cache {url!r} cannot be used: {why}'), errors
  assert not workdir.exists()


def test_a_default_folder_that_cannot_be_made_only_warns_and_the_run_compiles(tmp_path,
                                                                               monkeypatch):
  monkeypatch.setenv('XDG_CACHE_HOME', uncreatable_path(tmp_path, 'xdg'))
  p = launch(*RUN, f'--workdir={tmp_path / "run"}')
  assert p.returncode == 0, p.stderr[-3000:]
  assert 'the compilation cache' in p.stdout + p.stderr and 'cannot be used' in p.stdout + p.stderr
  assert _summary(tmp_path / 'run')['compile_cache_hits'] == 0


def test_the_test_session_loads_a_program_it_built_before_and_counts_it_as_a_compile():
  """What makes the suite fast (conftest.py): a program equal to one built before, from a new
  closure as the tests build them, is loaded from the session's persistent cache; and JAX's
  compile event, which the compile-counting tests and the benchmark count, fires for the load
  as for the compile, so those counts do not depend on the cache."""
  import threading

  import jax
  import jax.numpy as jnp
  import numpy as np
  from jax import monitoring

  from fathom_sim.compile_cache import CACHE_HIT as hit
  from launch.benchmark import BACKEND_COMPILE as compile_
  builds, this_thread = [], threading.current_thread()

  def record(event, *args, **kwargs):  # both kinds of listener: (event[, duration], **kwargs)
    # (a compile left running on another thread by an earlier test is not this test's)
    if event in (compile_, hit) and threading.current_thread() is this_thread:
      builds[-1].append(event)

  kept = jax.config.jax_persistent_cache_min_compile_time_secs
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 0)  # this one compiles fast
  monitoring.register_event_duration_secs_listener(record)
  monitoring.register_event_listener(record)
  try:
    for _ in range(2):
      builds.append([])
      jax.jit(lambda x: jnp.sin(x) * 1.8125)(np.arange(11.0, dtype=np.float32)).block_until_ready()
  finally:
    monitoring.unregister_event_duration_listener(record)
    monitoring.unregister_event_listener(record)
    jax.config.update('jax_persistent_cache_min_compile_time_secs', kept)
  assert builds == [[compile_], [hit, compile_]]


_AHEAD_AND_LIBRARY = r'''
import json, sys
import jax, jax.numpy as jnp
from fathom_sim import compile_cache
from fathom_sim.compile_ahead import CompileAhead
from fathom_sim.train import train_and_evaluate
from tests.common import tiny_config
ahead = CompileAhead(None, lambda pad: [])
x = jnp.ones((7, 5))
ahead.also('probe', lambda: jax.jit(lambda a: jnp.tanh(a @ a.T).sum()).lower(x))
ahead.wait()  # (ready drops a job its thread has not started yet)
ahead.ready('probe')
ahead.close()
summary = train_and_evaluate(tiny_config(num_rounds=2), sys.argv[1])
print(json.dumps({'compiled': ahead.compiled, 'loaded': ahead.loaded,
                  'hits': summary['compile_cache_hits'], 'compiles': summary['compiles']}))
'''


def test_loads_count_where_jax_s_own_variable_turns_the_cache_on_and_on_compile_threads(
    tmp_path, monkeypatch):
  """A library caller (no `enable`) with $JAX_COMPILATION_CACHE_DIR: the run's summary counts
  the programs it loaded, and a program a compile thread loads is `loaded`, not `compiled`."""
  import subprocess
  import sys
  from tests.test_cli import ROOT
  env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=str(tmp_path / 'named'),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0', JAX_PLATFORMS='cpu')
  got = []
  for name in ('first', 'second'):
    p = subprocess.run([sys.executable, '-c', _AHEAD_AND_LIBRARY, str(tmp_path / name)],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    got.append(json.loads(p.stdout.strip().splitlines()[-1]))
  first, second = got
  assert (first['compiled'], first['loaded']) == (1, 0)
  assert (second['compiled'], second['loaded']) == (0, 1)
  assert second['hits'] >= second['compiles'] >= 1  # its round programs, loaded


_THRESHOLD = '''
import sys, jax
from fathom_sim import compile_cache
compile_cache._check_remote = lambda path: None  # (no bucket here)
compile_cache.enable(sys.argv[1])
print(jax.config.jax_persistent_cache_min_compile_time_secs)
'''


@pytest.mark.parametrize('folder, variable, kept', [
    ('local', None, 0.0),
    ('gs://a-bucket/jax', None, 0.2),
    ('local', '3', 3.0), ('gs://a-bucket/jax', '3', 3.0)])
def test_a_local_folder_keeps_every_program_a_remote_one_those_of_a_fifth_of_a_second(
    tmp_path, folder, variable, kept):
  """JAX's default keeps programs that took 1 s: each command compiled its cohort sampler
  and its initial model's draws again. $JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS wins."""
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS='cpu')
  env.pop('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', None)
  if variable is not None:
    env['JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS'] = variable
  path = str(tmp_path) if folder == 'local' else folder
  p = subprocess.run([sys.executable, '-c', _THRESHOLD, path], env=env,
                     capture_output=True, text=True, timeout=120)
  assert p.returncode == 0, p.stderr[-3000:]
  assert float(p.stdout.split()[-1]) == kept


_FILL = r'''
import os, sys
import jax, jax.numpy as jnp
from fathom_sim import compile_cache
path, cap, first = sys.argv[1], sys.argv[2], int(sys.argv[3])
compile_cache.enable(path, max_bytes=None if cap == 'none' else int(cap))
jax.config.update('jax_persistent_cache_min_compile_time_secs', 0)
for k in range(first, first + 12):  # 12 programs of ~3.6 KB each, and a few of JAX's own
  jax.jit(lambda x: jnp.cumsum(jnp.sin(x) * (k + 1)))(jnp.ones(100 + k)).block_until_ready()
kept = [f for f in os.listdir(path) if f.endswith('-cache')]
print(len(kept), sum(os.path.getsize(os.path.join(path, f)) for f in kept))
'''


def _fill(path, cap, first=0, jax_variable=None) -> tuple[int, int]:
  """Compiles 12 new programs into the cache at `path` in a process of its own, capped at
  `cap` bytes ('none': uncapped); returns the entries and their bytes then."""
  env = dict(os.environ, PYTHONPATH=ROOT)
  env.pop('JAX_COMPILATION_CACHE_MAX_SIZE', None)
  if jax_variable is not None:
    env['JAX_COMPILATION_CACHE_MAX_SIZE'] = jax_variable
  p = subprocess.run([sys.executable, '-c', _FILL, str(path), str(cap), str(first)], env=env,
                     capture_output=True, text=True, timeout=300)
  assert p.returncode == 0, p.stderr[-3000:]
  assert 'Error writing persistent compilation cache entry' not in p.stderr, p.stderr[-3000:]
  entries, size = map(int, p.stdout.split())
  return entries, size


@pytest.mark.parametrize('jax_variable', [None, '-1'])
def test_a_capped_cache_is_held_to_its_cap_by_dropping_the_least_recently_used(
    tmp_path, jax_variable):
  """JAX's own $JAX_COMPILATION_CACHE_MAX_SIZE (-1: no cap) still wins over ours."""
  entries, size = _fill(tmp_path, 30000, jax_variable=jax_variable)
  if jax_variable is None:
    assert size <= 30000 and 1 <= entries < 12
  else:
    assert size > 30000 and entries >= 12


@pytest.mark.parametrize('capped_by', ['us', 'jax_variable'])
def test_a_cache_filled_uncapped_goes_on_caching_once_capped(tmp_path, capped_by):
  """Entries written uncapped have no access-time file; JAX's eviction failed on the first,
  and with it every later write: the folder cached nothing more, with a warning per compile.
  Also where $JAX_COMPILATION_CACHE_MAX_SIZE caps a folder we do not."""
  entries, _ = _fill(tmp_path, 'none', jax_variable='-1')
  assert entries >= 12
  if capped_by == 'us':
    again, size = _fill(tmp_path, 30000, first=100)
  else:
    again, size = _fill(tmp_path, 'none', first=100, jax_variable='30000')
  assert size <= 30000 and again >= 1
  assert any(f.startswith('jit__lambda') for f in os.listdir(tmp_path)
             if f.endswith('-cache'))


def test_only_the_default_folder_is_capped(tmp_path, monkeypatch):
  """The default folder, in the user's home, would grow for ever; a folder named is the user's
  (a pod's shared one on a bucket's mount, where JAX's file lock may not hold)."""
  monkeypatch.setenv('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0')
  monkeypatch.setenv('XDG_CACHE_HOME', str(tmp_path / 'xdg'))
  named = tmp_path / 'named'
  for folder in (None, named):
    given = () if folder is None else (f'--compilation_cache={folder}',)
    p = launch(*RUN, f'--workdir={tmp_path / str(folder is None)}', *given)
    assert p.returncode == 0, p.stderr[-3000:]
  default = tmp_path / 'xdg' / 'fathom_sim' / 'jax'
  stamped = lambda d: [f for f in os.listdir(d) if f.endswith('-atime')]  # the cap's records
  assert stamped(default) and not stamped(named) and os.listdir(named)

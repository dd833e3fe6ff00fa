"""The command line: the quickstart run and its outputs, and bad input refused in one line."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest

from tests.common import uncreatable_path

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAIN = os.path.join(ROOT, 'launch', 'main.py')
QUICKSTART = os.path.join(ROOT, 'configs', 'quickstart.py')

ROW_FIELDS = {'round', 'train_loss', 'eta', 'epochs', 'batch_size', 'batch_size_int', 'h_glob',
              'h_local', 'examples', 'local_steps', 'wall_s'}
SUMMARY_FIELDS = {'rounds', 'devices', 'compiles', 'wall_s', 'total_examples',
                  'total_local_steps', 'final', 'matmul_precision', 'compute_dtype'}


def load_config_file(path):
  spec = importlib.util.spec_from_file_location('cfg', os.path.join(ROOT, path))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def launch(*args, timeout=300):
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  env.pop('XLA_FLAGS', None)  # one CPU device, as a user's plain run
  return subprocess.run([sys.executable, MAIN, *args], cwd=ROOT, env=env, timeout=timeout,
                        capture_output=True, text=True)


def read_rows(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [json.loads(line) for line in f]


def test_a_disk_full_in_a_round_is_one_line_and_the_same_command_resumes(tmp_path):
  """A metrics row that could not be written (ENOSPC) ended in a traceback hundreds of lines
  long; it is one line naming the file, exit status 1 (to retry), and the checkpoint stays."""
  workdir = str(tmp_path / 'run')
  args = [f'--config={QUICKSTART}', f'--workdir={workdir}', '--config.num_rounds=8',
          '--config.checkpoint_every=3', '--config.eval_every=4']
  env = dict(os.environ, JAX_PLATFORMS='cpu', FULL_ROUND='5')
  env.pop('XLA_FLAGS', None)
  p = subprocess.run([sys.executable, os.path.join(ROOT, 'tests', 'full_disk.py'), *args],
                     cwd=ROOT, env=env, timeout=300, capture_output=True, text=True)
  errors = [line for line in p.stderr.splitlines() if line.startswith('error:')]
  assert p.returncode == 1 and len(errors) == 1, p.stderr[-3000:]
  assert (f'{os.path.join(workdir, "metrics.jsonl")} cannot be written (No space left on '
          'device); the run stops, its newest checkpoint stays') in errors[0]
  assert 'Traceback' not in p.stderr
  assert [r['round'] for r in read_rows(workdir)] == [1, 2, 3, 4]
  p = launch(*args)
  assert p.returncode == 0, p.stderr[-3000:]
  assert [r['round'] for r in read_rows(workdir)] == list(range(1, 9))


@pytest.mark.parametrize('algorithm', ['fedavg', 'fathom'])
def test_quickstart_writes_metrics_and_summary(tmp_path, algorithm):
  workdir = str(tmp_path / 'run')
  p = launch(f'--config={QUICKSTART}', f'--workdir={workdir}', f'--config.algorithm={algorithm}',
             '--config.num_rounds=12', '--config.eval_every=5')
  assert p.returncode == 0, p.stderr[-3000:]
  assert 'rounds/s' in p.stdout and 'ETA' in p.stdout
  rows = read_rows(workdir)
  assert [r['round'] for r in rows] == list(range(1, 13))
  for r in rows:
    assert ROW_FIELDS <= set(r)
  assert {r['round'] for r in rows if 'test_accuracy' in r} == {5, 10, 12}
  assert all(b['examples'] > a['examples'] and b['local_steps'] > a['local_steps']
             for a, b in zip(rows, rows[1:]))
  # The reference's rounding: a half goes up.
  assert all(r['batch_size_int'] == max(1, int(r['batch_size'] + 0.5)) for r in rows)
  with open(os.path.join(workdir, 'summary.json')) as f:
    summary = json.load(f)
  assert SUMMARY_FIELDS <= set(summary)
  assert {'test_accuracy', 'test_loss', 'params_l2', 'params_sha256'} <= set(summary['final'])
  assert summary['rounds'] == 12 and summary['devices'] == 1
  assert summary['total_examples'] == rows[-1]['examples']
  assert 'rounds_to_target' in summary  # the quickstart names a target accuracy
  if algorithm == 'fedavg':
    assert all(r['eta'] == pytest.approx(0.1) and r['batch_size'] == 20 for r in rows)
  else:
    assert len({r['batch_size'] for r in rows}) > 1  # FATHOM moves B


@pytest.mark.parametrize('args,needle', [
    (['--config.foo=1'], 'unknown config field config.foo'),
    (['--config.model.nme=mlp'], "config.model has no field 'nme'"),
    (['--config.num_rounds=abc'], "config.num_rounds must be an integer, got 'abc'"),
    # absl's words were "Failed to parse 'mlp' as a ConfigDict: ... <ast.Name object at 0x...>"
    (['--config.model=mlp'], '--config.model=mlp: config.model is a group of fields '
                             '(model.compute_dtype, model.conv, '),
    (['--config.eta=-0.1'], 'config.eta must be > 0'),
    (['--config.batch_size=0'], 'config.batch_size must be > 0'),
    (['--config.cohort_size=5000'], 'config.cohort_size must be at most'),
    (['--config.server_optimizer=sgdd'], 'config.server_optimizer must be one of'),
    (['--config.data.name=npz', '--config.data.path=/nonexistent/data.npz'],
     "data.path '/nonexistent/data.npz': no such file"),
    # Each of these ran, or ended in a traceback:
    (['config.eta=0.5'], "unexpected argument(s) 'config.eta=0.5': give settings as flags"),
    (['--num_processes=2'], '--num_processes and --process_id join a multi-process run with '
                            '--coordinator_address'),
    (['--multihost'], '--multihost (JAX finds the processes on a Cloud TPU pod, Slurm or Open '
                      'MPI only): cannot join the distributed run (ValueError'),
    (['--coordinator_address=notahost', '--num_processes=1', '--process_id=0'],
     '--coordinator_address=notahost: not of the form host:port; give host:port of process 0'),
    # JAX waited 5 minutes on these, then aborted with a C++ stack trace (exit 134):
    (['--coordinator_address=localhost:99999', '--num_processes=1', '--process_id=0'],
     "--coordinator_address=localhost:99999: the port must be a number in [1, 65535], got "
     "'99999'"),
    (['--coordinator_address=[::1]', '--num_processes=1', '--process_id=0'],
     '--coordinator_address=[::1]: not of the form host:port'),
])
def test_bad_input_is_one_clear_line_and_exit_2(tmp_path, args, needle):
  workdir = tmp_path / 'run'
  p = launch(f'--config={QUICKSTART}', f'--workdir={workdir}', *args)
  assert p.returncode == 2, (p.returncode, p.stderr[-2000:])
  errors = [line for line in p.stderr.splitlines() if line.startswith('error:')]
  assert len(errors) == 1 and needle in errors[0], p.stderr[-2000:]
  assert 'Traceback' not in p.stderr
  assert not workdir.exists() or not any(workdir.iterdir())


def test_a_workdir_that_is_a_file_is_said_to_be_one(tmp_path):
  """It was refused as 'cannot be created: File exists', after the data had loaded."""
  workdir = tmp_path / 'notes.txt'
  workdir.write_text('mine')
  p = launch(f'--config={QUICKSTART}', f'--workdir={workdir}')
  assert p.returncode == 2 and 'Traceback' not in p.stderr, p.stderr[-2000:]
  errors = [line for line in p.stderr.splitlines() if line.startswith('error:')]
  assert errors == [f"error: --workdir '{workdir}' is a file, not a folder; give a folder for "
                    "the run's files"]
  assert workdir.read_text() == 'mine'
  assert 'task ' not in p.stderr  # refused before the data load, which logs the task


def test_a_round_out_of_memory_is_one_clear_line_and_exit_2(tmp_path):
  """A real XLA out-of-memory error: a 2^20-wide hidden layer at B 16,384 asks ~200 GB in
  round 1. The child's address space is capped (16 GiB) so that no machine tries to give it
  that, whatever its overcommit policy."""
  workdir = tmp_path / 'run'
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  env.pop('XLA_FLAGS', None)
  p = subprocess.run(['bash', '-c', 'ulimit -v 16777216 && exec "$@"', 'bash', sys.executable,
                      MAIN, f'--config={QUICKSTART}', f'--workdir={workdir}',
                      '--config.algorithm=fedavg', '--config.num_rounds=2',
                      '--config.model.hidden=(1048576,)', '--config.batch_size=16384',
                      '--compilation_cache='], cwd=ROOT, env=env, timeout=300,
                     capture_output=True, text=True)
  assert p.returncode == 2, (p.returncode, p.stderr[-2000:])
  errors = [line for line in p.stderr.splitlines() if line.startswith('error:')]
  assert len(errors) == 1 and 'Traceback' not in p.stderr, p.stderr[-2000:]
  assert errors[0].startswith('error: round 1 ran out of memory on 1 cpu device(s) (XLA: '
                              'RESOURCE_EXHAUSTED'), errors[0]
  assert 'B 16384 (16384 examples a local step)' in errors[0]
  assert 'a smaller config.batch_size or config.cohort_size' in errors[0]
  assert errors[0].endswith('no round was checkpointed yet')
  assert read_rows(workdir) == []


def test_missing_config_file_is_named(tmp_path):
  p = launch('--config=configs/nope.py', f'--workdir={tmp_path}')
  assert p.returncode == 2 and "'configs/nope.py': no such config file" in p.stderr


@pytest.mark.parametrize('name', ['metrics.jsonl', 'summary.json'])
def test_foreign_run_files_are_not_overwritten(tmp_path, name):
  workdir = tmp_path / 'run'
  workdir.mkdir()
  (workdir / name).write_text('{"round": 1}\n')
  p = launch(f'--config={QUICKSTART}', f'--workdir={workdir}', '--config.num_rounds=2')
  assert p.returncode == 2 and 'holds run files but no config.json' in p.stderr
  assert (workdir / name).read_text() == '{"round": 1}\n'
  assert sorted(os.listdir(workdir)) == [name]


def test_unwritable_workdir_is_refused(tmp_path):
  target = uncreatable_path(tmp_path, 'run')
  p = launch(f'--config={QUICKSTART}', f'--workdir={target}', '--config.num_rounds=2')
  assert p.returncode == 2 and '--workdir' in p.stderr


def test_the_training_commands_can_share_one_process():
  """launch/main.py and launch/sweep.py both take --compilation_cache: importing both (a
  notebook, a driver script) defines it once instead of failing on a duplicate flag."""
  code = ('import launch.main, launch.sweep; '
          'assert launch.main._COMPILATION_CACHE is launch.sweep._COMPILATION_CACHE')
  done = subprocess.run([sys.executable, '-c', code], cwd=ROOT, capture_output=True, text=True,
                        env=dict(os.environ, JAX_PLATFORMS='cpu'), timeout=120)
  assert done.returncode == 0, done.stderr[-2000:]


def test_the_host_out_of_memory_before_any_round_is_one_line_and_exit_2(capsys):
  """Generated data of 1e9 clients ended in numpy's MemoryError traceback."""
  from launch import cli

  def job():
    raise MemoryError('Unable to allocate 22.3 GiB for an array with shape (99981182, 60)')

  with pytest.raises(SystemExit) as exit_:
    cli.run_or_exit(job)
  assert exit_.value.code == 2
  assert capsys.readouterr().err == (
      'error: the host ran out of memory making the run (Unable to allocate 22.3 GiB for an '
      'array with shape (99981182, 60)); the config asks for more than this machine holds: '
      'lower the sizes it sets (data.num_clients, data.max_examples, model widths), or make '
      "femnist_synthetic's examples on demand (data.in_memory=False)\n")


@pytest.mark.parametrize('args,want', [
    (['--config.model.hidden=64'], {'model.hidden': (64,)}),
    (['--config.model.hidden=(32)'], {'model.hidden': (32,)}),
    (['--config.model.hidden=8', '--config.model.hidden=4'], {'model.hidden': (8, 4)}),
    (['--config.batch_size=20', '--config.data.in_memory'], {'batch_size': 20.0,
                                                            'data.in_memory': True}),
    (["--config.algorithm=fedavg"], {'algorithm': 'fedavg'}),
    (['--config.num_rounds', '3', '--config.model.hidden', '8'], {'num_rounds': 3,
                                                                  'model.hidden': (8,)}),
])
def test_sweep_overrides_parse_as_the_run_command_parses_them(args, want):
  """sweep.py read --config.model.hidden=64 as the int 64 (refused) where main.py runs (64,)."""
  from absl import flags
  from ml_collections import config_flags
  from launch import cli
  rest = ['--sweep', 'x.py', '--dry_run']  # the command's own flags are left to it
  assert cli.config_overrides(['sweep.py', rest[0], *args, *rest[1:]]) == (
      want, ['sweep.py', *rest])
  values, argv = flags.FlagValues(), ['main.py', f'--config={QUICKSTART}', *args]
  config_flags.DEFINE_config_file('config', flag_values=values, sys_argv=argv)
  values(argv)
  for path, value in want.items():  # main.py's own flag gives the run the same values
    node = values.config
    for part in path.split('.'):
      node = node[part]
    assert node == value and type(node) is type(value)


@pytest.mark.parametrize('arg,needle', [
    ('--config.model.hiden=3', "unknown config field config.model.hiden (config.model has no "
                               "field 'hiden'); did you mean hidden?"),
    ('--config.num_rounds=1.5', "--config.num_rounds=1.5: config.num_rounds must be an integer, "
                                "got '1.5'"),
    ('--config.eta=fast', "--config.eta=fast: config.eta must be a number, got 'fast'"),
    ('--config.clip_log_params=yes', '--config.clip_log_params=yes: config.clip_log_params must '
                                     "be true or false, got 'yes'"),
    ('--config.data=npz', '--config.data=npz: config.data is a group of fields (data.alpha, '),
    ('--config.model.hidden={1:2}', '--config.model.hidden={1:2}: config.model.hidden must be a '
                                    'tuple, e.g. --config.model.hidden="(64,)", got a dict'),
    ('--config.model.hidden={64, 8}', 'config.model.hidden must be a tuple, e.g. '
                                      '--config.model.hidden="(64,)", got a set'),
])
def test_a_bad_sweep_override_is_one_line_and_exit_2(capsys, tmp_path, arg, needle):
  from launch import cli
  flagfile = tmp_path / 'flags.txt'
  flagfile.write_text(arg + '\n')
  for argv in (['sweep.py', arg], ['sweep.py', f'--flagfile={flagfile}']):  # read as given
    with pytest.raises(SystemExit) as exit_:
      cli.config_overrides(argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith('error: ') and needle in err and err.count('\n') == 1, (argv, err)


def test_the_progress_log_drops_library_chatter_but_not_warnings():
  """Every run on a machine without a TPU began with JAX's INFO line "Unable to initialize
  backend 'tpu'", orbax logs INFO lines at every save, and TFDS four at every start on a
  prepared dataset; their warnings, and the simulator's own INFO lines, still show."""
  import logging as pylogging
  from launch import cli

  def record(path, level):
    return pylogging.LogRecord('absl', level, path, 1, 'message', None, None)

  jax_probe = '/venv/lib/python3.11/site-packages/jax/_src/xla_bridge.py'
  orbax_save = '/venv/lib/python3.11/site-packages/orbax/checkpoint/_src/checkpointer.py'
  tfds_open = '/venv/lib/python3.11/site-packages/tensorflow_datasets/core/dataset_info.py'
  ours = os.path.join(ROOT, 'fathom_sim', 'train.py')
  for library in (jax_probe, orbax_save, tfds_open):
    assert not cli._quiet_libraries(record(library, pylogging.INFO))
    assert cli._quiet_libraries(record(library, pylogging.WARNING))
  assert cli._quiet_libraries(record(ours, pylogging.INFO))
  # orbax's ERROR records (a failed background save, with its traceback; asyncio's for its
  # tasks) say what the simulator's own error line says: orbax's keep their first line alone,
  # asyncio's are dropped; others' errors show whole.
  orbax_future = '/venv/lib/python3.11/site-packages/orbax/checkpoint/_src/futures/future.py'
  asyncio_loop = '/usr/lib/python3.11/asyncio/base_events.py'
  try:
    raise ValueError('RESOURCE_EXHAUSTED: Error writing')
  except ValueError:
    failed = pylogging.LogRecord('absl', pylogging.ERROR, orbax_future, 1, '%s raised: %s\n%s',
                                 ('Thread', 'x' * 300, 'spec'), sys.exc_info())
  assert cli._quiet_libraries(failed)
  assert failed.getMessage() == 'Thread raised: ' + 'x' * 185 and failed.exc_info is None
  task = pylogging.LogRecord('asyncio', pylogging.ERROR, asyncio_loop, 1,
                             'Task exception was never retrieved\nfuture: <Task coro=<f() '
                             'defined at /venv/lib/orbax/checkpoint/x.py:1>>', None, None)
  assert not cli._quiet_libraries(task)
  future = pylogging.LogRecord('asyncio', pylogging.ERROR, asyncio_loop, 1,
                               'Future exception was never retrieved\nfuture: <Future finished '
                               'exception=ValueError(\'RESOURCE_EXHAUSTED: Error writing "/w/'
                               'checkpoints/12.orbax-checkpoint-tmp/x"\')>', None, None)
  assert not cli._quiet_libraries(future)
  assert cli._quiet_libraries(record(asyncio_loop, pylogging.ERROR))
  assert cli._quiet_libraries(record(ours, pylogging.ERROR))
  assert cli._quiet_libraries(record(jax_probe, pylogging.ERROR))


def test_a_coordinator_address_is_checked_for_its_form_and_port_and_warned_if_unresolved(
    caplog):
  """Before JAX joins: a bad port or form made it wait 5 minutes, then abort. A host that does
  not resolve is only warned of (a Kubernetes service's name appears once process 0 is up)."""
  from fathom_sim.distributed import check_address
  for good in ('localhost:1234', '[::1]:80', '10.0.0.2:65535'):
    assert check_address(good) is None, good
  for bad, said in (('x', 'not of the form host:port'), (':12', 'not of the form host:port'),
                    ('[::1]', 'not of the form host:port'), ('[::1:80', 'not of the form'),
                    ('h:0', "got '0'"), ('h:65536', "got '65536'"), ('h:', "got ''"),
                    ('h:\u0661\u0662', 'the port must be a number in [1, 65535]')):
    assert said in (check_address(bad) or ''), bad
  assert check_address('nohost.invalid:1234') is None
  assert "the host 'nohost.invalid' does not resolve now" in caplog.text

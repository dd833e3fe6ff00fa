"""Bad input to the sweep, report, benchmark and prepare_data commands: one `error:` line,
exit status 2, no traceback, and nothing overwritten."""

import json
import os
import re
import subprocess
import sys

import pytest

from fathom_sim import metrics, report, results, sweep, sweep_def
from fathom_sim.config import ConfigError
from fathom_sim.data import DataError
from tests.common import run_python, uncreatable_path

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICKSTART = os.path.join(ROOT, 'configs', 'quickstart.py')
GOOD_SWEEP = f"def get_sweep():\n  return {{'config': {QUICKSTART!r}, 'seeds': 1}}\n"


def _cli(script, *args, timeout=120):
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  env.pop('XLA_FLAGS', None)
  return subprocess.run([sys.executable, os.path.join(ROOT, 'launch', script), *args],
                        cwd=ROOT, env=env, timeout=timeout, capture_output=True, text=True)


def _refused(p, needle):
  """The command ended with exit status 2 and one error line holding `needle`."""
  assert p.returncode == 2, (p.returncode, p.stderr[-2000:])
  errors = [line for line in p.stderr.splitlines() if line.startswith('error:')]
  assert len(errors) == 1 and needle in errors[0], p.stderr[-2000:]
  assert 'Traceback' not in p.stderr
  return errors[0]


def _sweep_returning(value: str) -> str:
  return f'def get_sweep():\n  return {value}\n'


# ---- exit statuses ------------------------------------------------------------------------

def test_each_kind_of_error_has_the_exit_status_the_readme_gives():
  """errors.exit_status, which launch/cli.py ends a command with and a multi-host run's peers
  exit with: 2 for bad input (an out-of-memory config included), 3 for a diverged run, 128 +
  the signal for a stopped one, 1 for a failed save and anything else."""
  from fathom_sim.checkpoint import CheckpointError
  from fathom_sim.errors import OutputError, exit_status
  from fathom_sim.errors import Diverged, Preempted
  from fathom_sim.failures import OutOfMemory
  from fathom_sim.workdir import WorkdirError
  statuses = {ConfigError('c'): 2, DataError('d'): 2, WorkdirError('w'): 2,
              OutOfMemory('o'): 2, MemoryError(): 2, Diverged(['r'], 'x'): 3,
              Preempted(15, 4): 143, Preempted(2, 4): 130, KeyboardInterrupt(): 130,
              CheckpointError('s'): 1, OutputError('w'): 1, RuntimeError('r'): 1,
              ValueError('v'): 1}
  assert {type(e).__name__ + str(getattr(e, 'signum', '')): exit_status(e)
          for e in statuses} == {type(e).__name__ + str(getattr(e, 'signum', '')): status
                                 for e, status in statuses.items()}


def test_a_file_replaced_on_a_full_disk_is_one_output_error_and_the_old_one_stays(tmp_path):
  """summary.json, a sweep's index, metrics.jsonl cut at resume: written beside and moved in,
  so a full disk (/dev/full's ENOSPC here) leaves the old file and no scratch copy."""
  from fathom_sim.errors import OutputError
  path = str(tmp_path / 'summary.json')
  metrics.write_json(path, {'rounds': 1})
  os.symlink('/dev/full', path + '.tmp')  # the scratch copy's writes fail as a full disk's
  with pytest.raises(OutputError) as e:
    metrics.write_json(path, {'rounds': 2})
  assert str(e.value) == (f'{path} could not be rewritten (No space left on device); what it '
                          'held before stays')
  with open(path) as f:
    assert json.load(f) == {'rounds': 1}
  assert os.listdir(tmp_path) == ['summary.json']


# ---- launch/sweep.py ----------------------------------------------------------------------

@pytest.mark.parametrize('text,needle', [
    ('def get_sweep(:\n', 'could not be loaded: invalid syntax (SyntaxError, line 1)'),
    ('import fathom_no_such_module\n', "ModuleNotFoundError: No module named "
                                       "'fathom_no_such_module' (line 1)"),
    ('def get_sweep():\n  return {}["config"]\n', "get_sweep() raised KeyError: 'config' (line 2)"),
    ('x = 1\n', 'defines no get_sweep()'),
    (_sweep_returning('[1]'), 'get_sweep() must return a dict with keys config, overrides, '
                              'seeds, fixed; got list'),
    (_sweep_returning("{'overrides': [{'eta': 0.1}]}"), 'get_sweep() must return a config'),
    (_sweep_returning(f"{{'config': {QUICKSTART!r}, 'seed': 3}}"),
     'unknown key(s) seed; accepted: config, overrides, seeds, fixed'),
    (_sweep_returning('{"config": 3}'), 'config must be a config file path or a ConfigDict'),
    (_sweep_returning(f"{{'config': {QUICKSTART!r}, 'seeds': 'abc'}}"),
     "seeds must be a count n >= 1 (seeds 0..n-1) or a non-empty list of integers in [0, 2^31), "
     "got 'abc'"),
    (_sweep_returning(f"{{'config': {QUICKSTART!r}, 'seeds': 0}}"), 'seeds must be a count'),
    (_sweep_returning(f"{{'config': {QUICKSTART!r}, 'seeds': []}}"), 'seeds must be a count'),
    (_sweep_returning(f"{{'config': {QUICKSTART!r}, 'seeds': [1, 2, 1]}}"),
     'seeds lists 1 more than once'),
    (_sweep_returning(f"{{'config': {QUICKSTART!r}, 'overrides': {{'eta': 0.1}}}}"),
     'overrides must be a list of {field: value} dicts, one per setting, got dict'),
    (_sweep_returning(f"{{'config': {QUICKSTART!r}, 'overrides': [{{1: 2}}]}}"),
     'overrides[0] must be a {field: value} dict'),
    (_sweep_returning(f"{{'config': {QUICKSTART!r}, 'fixed': [1]}}"),
     'fixed must be a {field: value} dict'),
    (_sweep_returning("{'config': 'broken_config.py'}"),
     "config '{dir}/broken_config.py' could not be loaded: NameError: name 'nope' is not "
     'defined (line 1)'),
    # an empty grid ran the config alone, unsaid; a file that exits ended the command with its
    # status (0 for sys.exit(0)) and no word
    (_sweep_returning(f"{{'config': {QUICKSTART!r}, 'overrides': []}}"),
     'overrides is empty; give one {field: value} dict per setting'),
    (_sweep_returning(f"{{'config': {QUICKSTART!r}, 'fixed': {{'eta': 0.3}}, "
                      "'overrides': [{'eta': 0.2}, {'eta': 0.1, 'epochs': 2.0}]}"),
     'eta in both fixed and overrides; a field the sweep varies is set by its settings alone'),
    ('import sys\ndef get_sweep():\n  sys.exit(0)\n', 'get_sweep() raised SystemExit: 0 (line 3)'),
])
def test_a_bad_sweep_file_is_one_config_error_naming_it(tmp_path, text, needle):
  (tmp_path / 'broken_config.py').write_text('nope\n')
  path = tmp_path / 'bad_sweep.py'
  path.write_text(text)
  with pytest.raises(ConfigError) as err:
    sweep_def.load_sweep(str(path))
  message = str(err.value)
  assert needle.replace('{dir}', str(tmp_path)) in message and str(path) in message, message
  assert '\n' not in message


@pytest.mark.parametrize('fields,needle', [
    ("'overrides': [{'eta': 0.1}, {'etaa': 0.2}]", "overrides[1]: unknown config field config.etaa"),
    ("'fixed': {'model.hiden': (8,)}", 'fixed: unknown config field config.model.hiden'),
    # a path through a value, not a group: a TypeError traceback before
    ("'overrides': [{'eta.x': 1}]",
     'overrides[0]: unknown config field config.eta.x (config.eta is a value, not a group'),
    ("'fixed': {'num_rounds.max': 2}", 'fixed: unknown config field config.num_rounds.max'),
    ("'overrides': [{'num_rounds': 'many'}]",
     "overrides[0]: config.num_rounds must be an integer, got 'many' (str)"),
    # a value no run accepts: refused before the first run computes, not as that run's failure
    ("'overrides': [{'eta': 0.1}, {'eta': -1.0}]",
     'run eta=-1/seed=0: config.eta must be > 0, got -1.0'),
    ("'overrides': [{'seed': 3}]", 'overrides[0]: config.seed cannot be set here; a sweep runs '
                                   'the seeds of its seeds list'),
    ("'fixed': {'seed': 3}", 'fixed: config.seed cannot be set here'),
    # ml_collections took True as 1.0, in a folder named eta=True
    ("'overrides': [{'eta': True}]", 'overrides[0]: config.eta must be a number, got True'),
    ("'fixed': {'model.hidden': '64'}", "fixed: config.model.hidden must be a tuple, got '64'"),
    ("'overrides': [{'model': {'name': 'mlp'}}]",
     "overrides[0]: config.model is a group of fields (model.compute_dtype, model.conv, "),
    ("'overrides': [{'eta': 0.1}, {'epochs': 1.0}]",
     "the settings 'eta=0.1' and 'epochs=1' come to the same run (every field it reads alike)"),
    # FedAvg reads no eta_h: both would train one run, twice, and count twice in a report
    ("'fixed': {'algorithm': 'fedavg'}, 'overrides': [{'eta_h': 0.01}, {'eta_h': 0.03}]",
     "the settings 'eta_h=0.01' and 'eta_h=0.03' come to the same run"),
])
def test_a_bad_field_in_a_sweep_names_the_file_and_the_entry(tmp_path, fields, needle):
  path = tmp_path / 'bad_fields.py'
  path.write_text(_sweep_returning(f"{{'config': {QUICKSTART!r}, 'seeds': 1, {fields}}}"))
  with pytest.raises(ConfigError) as err:
    sweep_def.plan_runs(sweep_def.load_sweep(str(path)), str(tmp_path / 'out'))
  assert f'--sweep {str(path)!r}: {needle}' in str(err.value), str(err.value)


@pytest.mark.parametrize('text,args,needle', [
    ('def get_sweep(:\n', [], 'could not be loaded: invalid syntax (SyntaxError, line 1)'),
    (_sweep_returning("{'overrides': [{'eta': 0.1}]}"), [], 'get_sweep() must return a config'),
    (_sweep_returning(f"{{'config': {QUICKSTART!r}, 'seeds': 'abc'}}"), [],
     'seeds must be a count'),
    (_sweep_returning(f"{{'config': {QUICKSTART!r}, 'seeds': [-1]}}"), [],
     'seeds must be a count n >= 1 (seeds 0..n-1) or a non-empty list of integers in [0, 2^31), '
     'got [-1]'),
    (_sweep_returning(f"{{'config': {QUICKSTART!r}, 'overrides': [{{'eta': -1.0}}]}}"), [],
     'run eta=-1/seed=0: config.eta must be > 0'),
    (GOOD_SWEEP, ['--config.seed=9'], 'command line: config.seed cannot be set here'),
    (GOOD_SWEEP, ['--seeds=0'], '--seeds must be in [1, 100000] (it runs seeds 0..N-1), got 0'),
    (GOOD_SWEEP, ['--seeds=-1'], '--seeds must be in [1, 100000] (it runs seeds 0..N-1), got -1'),
    # (3e9 seeds: a MemoryError traceback, planning ~100 GB of runs)
    (GOOD_SWEEP, ['--seeds=3000000000'], '--seeds must be in [1, 100000] (it runs seeds '
                                         '0..N-1), got 3000000000'),
    (_sweep_returning(f"{{'config': {QUICKSTART!r}, 'seeds': 3000000000}}"), [],
     'seeds asks for 3000000000 seeds; a sweep runs at most 100,000 (one workdir each)'),
    (GOOD_SWEEP, ['seeds=3'], "unexpected argument(s) 'seeds=3': give settings as flags"),
    (GOOD_SWEEP, [f'--config={QUICKSTART}'], "a sweep takes its config file from the sweep "
                                             "file's 'config' key"),
])
def test_sweep_command_refuses_a_bad_sweep_file_or_seeds(tmp_path, text, args, needle):
  path = tmp_path / 'bad_sweep.py'
  path.write_text(text)
  out = tmp_path / 'out'
  _refused(_cli('sweep.py', f'--sweep={path}', f'--out={out}', '--dry_run', *args), needle)
  assert not out.exists()


@pytest.mark.parametrize('dry_run', [[], ['--dry_run']])
@pytest.mark.parametrize('below', [False, True])
def test_sweep_command_refuses_an_out_that_is_a_file(tmp_path, dry_run, below):
  """--dry_run says what the sweep would do: it listed the runs as 'to run' and exited 0 (for
  a folder below a file too, which the sweep then could not make)."""
  path = tmp_path / 'sweep.py'
  path.write_text(GOOD_SWEEP)
  mine = tmp_path / 'out'
  mine.write_text('mine')
  out = mine / 'sweep' / 'x' if below else mine
  said = (f"--out '{out}': '{mine}' on its path is a file, not a folder; give a folder for the "
          'runs and sweep.json' if below else f"--out '{out}' is a file, not a folder")
  _refused(_cli('sweep.py', f'--sweep={path}', f'--out={out}', '--config.num_rounds=1',
                *dry_run), said)
  assert mine.read_text() == 'mine'


def test_every_output_folder_below_a_file_is_refused_before_anything_is_made(tmp_path):
  """main.py's makedirs failed on its own words; prepare_data claimed its --out's lock first."""
  from fathom_sim import workdir as workdir_lib
  from fathom_sim.data import DataError
  from fathom_sim.data import prepare as prepare_lib
  from tests.common import tiny_config
  mine = tmp_path / 'notes.txt'
  mine.write_text('mine')
  with pytest.raises(workdir_lib.WorkdirError,
                     match=f"--workdir '{mine}/run': '{mine}' on its path is a file, not a "
                           "folder; give a folder for the run's files"):
    workdir_lib.prepare(str(mine / 'run'), tiny_config())
  with pytest.raises(DataError, match=f"'{mine}' on its path is a file, not a folder; give a "
                                      'folder for the prepared dataset'):
    prepare_lib.prepare(os.path.join(ROOT, 'tests', 'data', 'femnist_leaf_sample'),
                        str(mine / 'data'), fmt='leaf_json', task='emnist')
  (tmp_path / 'run').mkdir()
  _refused(_cli('report.py', str(tmp_path / 'run'), f'--out={mine}/report'),
           f"'{mine}' on its path is a file, not a folder; give a folder for report.md")
  assert sorted(os.listdir(tmp_path)) == ['notes.txt', 'run'] and mine.read_text() == 'mine'


def test_sweep_command_refuses_an_empty_out_dry_or_not(tmp_path):
  """--out= : --dry_run listed every run 'to run', and the sweep itself then failed."""
  path = tmp_path / 'sweep.py'
  path.write_text(GOOD_SWEEP)
  for dry_run in ([], ['--dry_run']):
    _refused(_cli('sweep.py', f'--sweep={path}', '--out=', *dry_run),
             "--out '' names no folder; give one for the runs and sweep.json")


def test_a_dry_run_says_a_run_fails_where_its_workdir_cannot_hold_it(tmp_path):
  """A run's workdir that is a file, or holds a run's file of the wrong kind: --dry_run said
  'to run', and the sweep then marked the run failed."""
  from fathom_sim import workdir as workdir_lib
  path = tmp_path / 'sweep.py'
  path.write_text(f"def get_sweep():\n  return {{'config': {QUICKSTART!r}, 'seeds': 2}}\n")
  out = tmp_path / 'out'
  out.mkdir()
  (out / 'base').mkdir()
  (out / 'base' / 'seed=0').write_text('mine')
  (out / 'base' / 'seed=1').mkdir()
  (out / 'base' / 'seed=1' / workdir_lib.CONFIG_FILE).write_text('{}')
  (out / 'base' / 'seed=1' / 'checkpoints').write_text('x')
  p = _cli('sweep.py', f'--sweep={path}', f'--out={out}', '--dry_run')
  assert p.returncode == 0, p.stderr[-2000:]
  lines = p.stdout.strip().splitlines()
  assert lines[0].startswith('base/seed=0: fails: ') and 'is a file, not a folder' in lines[0]
  assert lines[1].startswith('base/seed=1: fails: ') and 'checkpoints is a file' in lines[1]
  assert (out / 'base' / 'seed=0').read_text() == 'mine'


def test_a_sweep_and_a_run_do_not_share_a_folder(tmp_path):
  """A run inside a sweep's folder, a sweep inside a run's, or a second sweep over a first
  would hide runs from report.py or replace the first sweep's index: each is refused, and
  nothing in the folder changes."""
  from fathom_sim import workdir as workdir_lib
  from tests.common import tiny_config
  first, second = tmp_path / 'first.py', tmp_path / 'second.py'
  for path in (first, second):
    path.write_text("from tests.common import tiny_config\n"
                    "def get_sweep():\n"
                    "  return {'config': tiny_config(num_rounds=1, num_devices=1), 'seeds': 1}\n")
  out = tmp_path / 'out'
  entries = sweep.run_sweep(sweep_def.load_sweep(str(first)), str(out), log=lambda _: None)
  assert [e['status'] for e in entries] == ['done']
  index, lock = (out / 'sweep.json').read_text(), (out / '.lock').read_text()
  with pytest.raises(workdir_lib.WorkdirError, match="--out '.*' holds the runs of another "
                     r"sweep \(first.py\).* set \"sweep\" in .*sweep.json to its new name"):
    sweep.run_sweep(sweep_def.load_sweep(str(second)), str(out), log=lambda _: None)
  with pytest.raises(workdir_lib.WorkdirError,
                     match=f"--workdir '{out}' is a sweep's folder") as e:
    workdir_lib.prepare(str(out), tiny_config())
  # a folder beside it: one inside would be taken by report.py for one of the sweep's runs
  assert str(e.value).endswith(f"give a folder of its own, e.g. '{out}_run'")
  assert (out / 'sweep.json').read_text() == index and sorted(os.listdir(out)) == [
      '.lock', 'base', 'sweep.json'] and (out / '.lock').read_text() == lock
  # the same sweep again: its runs are done, and its index is its own
  again = sweep.run_sweep(sweep_def.load_sweep(str(first)), str(out), log=lambda _: None)
  assert [(e['name'], e['status']) for e in again] == [('base/seed=0', 'done')]
  run = out / 'base' / 'seed=0'
  before = sorted(os.listdir(run))
  with pytest.raises(workdir_lib.WorkdirError, match=f"--out '{run}' is a run's workdir"):
    sweep.run_sweep(sweep_def.load_sweep(str(second)), str(run), log=lambda _: None)
  assert sorted(os.listdir(run)) == before


def test_a_run_inside_or_above_another_run_is_refused(tmp_path, caplog):
  """report.py takes a folder holding metrics.jsonl as one run and does not look below it: a
  run made in a sweep's setting folder hid that setting's seeds, one made in a run's folder
  (its checkpoints/, say) was hidden, and a run above another hid the one below. A folder that
  holds only one of a run's files (another tool's config.json) is no run."""
  from fathom_sim import workdir as workdir_lib
  from tests.common import tiny_config
  out = tmp_path / 'out'
  definition = sweep_def.SweepDef(tiny_config(num_rounds=1, num_devices=1), '<inline>',
                              [{'eta': 0.1}], [0, 1], {})
  assert [e['status'] for e in sweep.run_sweep(definition, str(out), log=lambda _: None)] == [
      'done', 'done']
  setting, run = out / 'eta=0.1', out / 'eta=0.1' / 'seed=0'
  before = {p: sorted(os.listdir(p)) for p in (out, setting, run)}
  with pytest.raises(workdir_lib.WorkdirError, match=f"--workdir '{setting}' holds another run "
                     f"below it \\('{setting}/seed=0'\\): report.py would show this run alone"):
    workdir_lib.prepare(str(setting), tiny_config())
  for inside in (run / 'checkpoints', run / 'sub' / 'x'):
    with pytest.raises(workdir_lib.WorkdirError, match=f"--workdir '{inside}' is inside the "
                       f"folder of another run \\('{run}' holds its config.json and "
                       "metrics.jsonl\\): report.py would show that run alone; use another"):
      workdir_lib.prepare(str(inside), tiny_config())
  with pytest.raises(workdir_lib.WorkdirError, match=f"--out '{run}/sweeps' is inside the "
                     "folder of a run"):
    sweep.check_out(definition, str(run / 'sweeps'))
  assert {p: sorted(os.listdir(p)) for p in (out, setting, run)} == before
  # In a sweep, a new run folder refused is said as the sweep's, and the sweep goes on.
  workdir_lib.save_config(str(setting), tiny_config())
  (setting / 'metrics.jsonl').write_text('')
  entries = sweep.run_sweep(sweep_def.SweepDef(tiny_config(num_rounds=1, num_devices=1),
                                           '<inline>', [{'eta': 0.1}], [2], {}),
                            str(out), log=lambda _: None)
  assert entries[0]['status'] == 'failed' and entries[0]['error'].startswith(
      f"the sweep's run folder '{setting}/seed=2' is inside the folder of another run")
  # A run made inside another before this rule resumes, with a warning (refused, it could
  # only start again elsewhere).
  from fathom_sim.train import train_and_evaluate
  inside = run / 'legacy'
  with pytest.MonkeyPatch.context() as m:
    m.setattr(workdir_lib, '_check_not_nested', lambda workdir: None)
    train_and_evaluate(tiny_config(num_rounds=1, num_devices=1), str(inside))
  with caplog.at_level('WARNING'):
    assert train_and_evaluate(tiny_config(num_rounds=2, num_devices=1),
                              str(inside))['resumed_from'] == 1
  assert caplog.text.count(f"--workdir '{inside}' is inside the folder of another run") == 1
  assert 'move one of the two runs out, then give its new path' in caplog.text
  # Another tool's config.json above is not a run's folder.
  mine = tmp_path / 'mine'
  mine.mkdir()
  (mine / 'config.json').write_text('{}')
  workdir_lib.prepare(str(mine / 'run'), tiny_config())


@pytest.mark.parametrize('args', [['--config.model.hidden={1: 2}'],
                                  ['--config.model.hidden', '{64}']])
def test_a_dict_or_set_for_a_tuple_field_is_refused_before_the_run(tmp_path, args):
  """config_flags made a tuple of the dict's keys (or the set's elements, in hash order) and
  the run trained widths (1,)."""
  p = _cli('main.py', f'--config={QUICKSTART}', f'--workdir={tmp_path / "run"}', *args)
  _refused(p, 'config.model.hidden must be a tuple, e.g. --config.model.hidden="(64,)", got a')
  assert not (tmp_path / 'run').exists()


def test_an_override_without_config_says_config_is_missing(tmp_path):
  """It said "Unknown command line flag 'config.num_rounds'", as if the field did not exist."""
  p = _cli('main.py', f'--workdir={tmp_path / "run"}', '--config.num_rounds=2')
  _refused(p, 'error: --config.num_rounds sets a field of --config, which is not given: add '
              '--config=configs/NAME.py (e.g. configs/quickstart.py)')
  assert not (tmp_path / 'run').exists()


def test_a_run_is_refused_in_a_prepared_dataset(tmp_path):
  from fathom_sim import workdir as workdir_lib
  from tests.common import tiny_config
  (tmp_path / 'meta.json').write_text('{}')
  with pytest.raises(workdir_lib.WorkdirError, match='is a prepared dataset'):
    workdir_lib.prepare(str(tmp_path), tiny_config())
  assert os.listdir(tmp_path) == ['meta.json']


def test_a_folder_starting_with_a_tilde_the_shell_left_is_refused(tmp_path, monkeypatch):
  """--workdir=~/runs/x: the shell expands ~ only at a word's start, and the run went into a
  folder named ~ in the current one."""
  from fathom_sim import workdir as workdir_lib
  from tests.common import tiny_config
  monkeypatch.chdir(tmp_path)
  with pytest.raises(workdir_lib.WorkdirError,
                     match=r"--workdir '~/runs/x' starts with ~, which the shell leaves as it "
                           r"is after '=': .* give --workdir ~/runs/x \(a space, not =\) or "
                           r"\$HOME/runs/x"):
    workdir_lib.prepare('~/runs/x', tiny_config())
  definition = sweep_def.SweepDef(tiny_config(), '<inline>', [{}], [0], {})
  with pytest.raises(workdir_lib.WorkdirError, match="--out '~/sweep' starts with ~"):
    sweep.check_out(definition, '~/sweep')
  assert os.listdir(tmp_path) == []


def test_a_tilde_the_shell_left_is_said_for_every_path_flag(tmp_path, monkeypatch):
  """The same ~ in prepare_data's and report's --out made a folder named ~; in an input path
  it was a bare 'no such file', the ~ unmentioned."""
  from fathom_sim.data import DataError, load_npz, load_prepared
  from fathom_sim.data import prepare as prepare_lib
  monkeypatch.chdir(tmp_path)
  with pytest.raises(DataError, match="--out '~/data' starts with ~.* give --out ~/data "):
    prepare_lib.prepare(os.path.join(ROOT, 'tests', 'data', 'femnist_leaf_sample'), '~/data',
                        fmt='leaf_json', task='emnist')
  with pytest.raises(DataError, match=r"--source '~/posts.xml': no such file or directory; the "
                                      r"shell leaves a ~ after '=' as it is: give --source "
                                      r"~/posts.xml \(a space, not =\) or \$HOME/posts.xml"):
    prepare_lib.prepare('~/posts.xml', 'data', fmt='stackexchange_xml', task='stackoverflow')
  with pytest.raises(DataError, match=r"data.path '~/c.npz': no such file .*\$HOME/c.npz"):
    load_npz('~/c.npz')
  with pytest.raises(DataError, match=r"data.data_dir '~/so': no such folder; .*\$HOME/so$"):
    load_prepared('stackoverflow', '~/so')
  run = tmp_path / 'run'
  run.mkdir()
  _refused(_cli('report.py', str(run), '--out=~/report'), "--out '~/report' starts with ~")
  assert sorted(os.listdir(tmp_path)) == ['run']
  assert not os.path.exists(os.path.join(ROOT, '~'))  # (report.py ran in the repository)


def test_a_sweep_is_refused_in_a_prepared_dataset_its_dry_run_too(tmp_path):
  """launch/main.py refused such a folder, but a sweep wrote sweep.json, its lock and its runs'
  folders among the dataset's files (and --dry_run listed them as to run)."""
  (tmp_path / 'data').mkdir()
  (tmp_path / 'data' / 'meta.json').write_text('{}')
  sweep_file = tmp_path / 'sweep.py'
  sweep_file.write_text('from fathom_sim.config import base_config\n'
                        'def get_sweep():\n  return {"config": base_config()}\n')
  for dry in ([], ['--dry_run']):
    _refused(_cli('sweep.py', f'--sweep={sweep_file}', f'--out={tmp_path / "data"}', *dry),
             f"--out '{tmp_path / 'data'}' is a prepared dataset")
    assert os.listdir(tmp_path / 'data') == ['meta.json']


# ---- launch/report.py ---------------------------------------------------------------------

ROW = ('{"round": 1, "examples": 10, "local_steps": 1, "wall_s": 0.5, "eta": 0.1, "epochs": 1.0, '
       '"batch_size": 20.0, "h_glob": 0.0, "h_local": 0.1, "test_accuracy": 0.5}\n')


def test_metrics_that_are_not_utf8_are_one_data_error_and_are_kept(tmp_path):
  path = tmp_path / metrics.METRICS_FILE
  data = ROW.encode() + b'\xff\xfe not text\n'
  path.write_bytes(data)
  with pytest.raises(DataError, match=f'{path}: not UTF-8 text'):
    metrics.read_rows(str(path))
  with pytest.raises(DataError, match=f'{path}: not UTF-8 text'):  # a resume would cut it
    metrics.keep_rows(str(tmp_path), 1)
  assert path.read_bytes() == data and os.listdir(tmp_path) == [metrics.METRICS_FILE]


@pytest.mark.parametrize('damage', ['not_gzip', 'cut'])
def test_a_damaged_gzipped_metrics_copy_is_one_data_error(tmp_path, damage):
  import gzip
  path = tmp_path / (metrics.METRICS_FILE + '.gz')
  whole = gzip.compress(((ROW + '\n') * 200).encode())
  path.write_bytes(b'plain text, not gzip\n' if damage == 'not_gzip' else whole[:len(whole) // 2])
  with pytest.raises(DataError, match=f'{path}: not a whole gzip file'):
    metrics.read_rows(str(path))


def _run_dir(tmp_path, content: bytes):
  run = tmp_path / 'run'
  run.mkdir()
  (run / metrics.METRICS_FILE).write_bytes(content)
  return run


def test_report_names_a_metrics_file_that_is_not_utf8(tmp_path):
  run = _run_dir(tmp_path, ROW.encode() + b'\xff\xfe\n')
  out = tmp_path / 'report'
  _refused(_cli('report.py', str(run), f'--out={out}'),
           f'{run / metrics.METRICS_FILE}: not UTF-8 text')
  assert not out.exists()


@pytest.mark.parametrize('args,needle', [
    ([], 'Flag --out must have a value other than None'),
    (['--target=0.3'], "Unknown command line flag 'target'. Did you mean: targets ?"),
    (['--targets=40'], "--targets must be test accuracies in (0, 1], got '40'"),
    (['--targets=0.3,0'], "--targets must be test accuracies in (0, 1], got '0.3,0'"),
    (['--targets=abc'], "--targets must be test accuracies in (0, 1], got 'abc'"),
    (['--targets=0.3,0.30'], "--targets names a target twice ('0.3,0.30'); give each once"),
    # both columns were headed 'rounds to 0.162557'
    (['--targets=0.1625571,0.16255712'], "--targets '0.1625571,0.16255712': two targets share "
                                        "their first 6 digits, the columns' names"),
])
def test_report_refuses_bad_flags_in_one_line(tmp_path, args, needle):
  run = _run_dir(tmp_path, ROW.encode())
  out = tmp_path / 'report'
  _refused(_cli('report.py', str(run), *([f'--out={out}'] if args else []), *args), needle)
  assert not out.exists()


@pytest.mark.parametrize('damage', ['[1, 2]\n', 'xx\n' + ROW])
def test_report_names_a_metrics_line_that_is_not_a_row(tmp_path, damage):
  run = _run_dir(tmp_path, (ROW + damage).encode())
  _refused(_cli('report.py', str(run), f'--out={tmp_path / "report"}'),
           f'{run / metrics.METRICS_FILE}: line 2 is not a row of a run')


def test_report_refuses_a_folder_whose_metrics_hold_no_rows_and_no_config_beside_them(tmp_path):
  """No run writes a row before its config.json: such a folder is not a run's, where it was
  listed as a run of algorithm '?'. A run killed before its first row is still a run."""
  run = _run_dir(tmp_path, b'not json at all\n')
  _refused(_cli('report.py', str(tmp_path), f'--out={tmp_path / "report"}'),
           f"{run / metrics.METRICS_FILE}: no rows of a run, and no readable config.json")
  (run / 'config.json').write_text('{"algorithm": "fathom", "num_rounds": 5}')
  [listed] = results.find_runs([str(tmp_path)])
  assert (listed.algorithm, len(listed.rows)) == ('fathom', 0)
  assert '`run`' in report.markdown(results.group_runs([listed]), [0.3])


def test_report_refuses_folders_that_overlap_and_reads_odd_json_as_missing(tmp_path):
  """A sweep given with a folder inside it listed its runs twice: each seed counted twice in
  every mean and std. A config.json or summary.json that is JSON but not an object was a
  traceback; it reads as a torn one does (absent)."""
  run = _run_dir(tmp_path, ROW.encode())
  out = tmp_path / 'report'
  _refused(_cli('report.py', str(tmp_path), str(run), f'--out={out}'),
           f"{run} is a run under both '{tmp_path}' and '{run}': give each run or sweep "
           'folder once')
  assert not out.exists()
  (run / 'config.json').write_text('[1]')
  (run / 'summary.json').write_text('"x"')
  [listed] = results.find_runs([str(run)])
  assert (listed.config, listed.summary, len(listed.rows)) == ({}, None, 1)


def test_report_refuses_an_out_it_cannot_write(tmp_path):
  run = _run_dir(tmp_path, ROW.encode())
  afile = tmp_path / 'afile'
  afile.write_text('mine')
  _refused(_cli('report.py', str(run), f'--out={afile}'), f"--out '{afile}' is a file")
  assert afile.read_text() == 'mine'
  target = uncreatable_path(tmp_path, 'report')
  _refused(_cli('report.py', str(run), f'--out={target}'),
           f"--out '{target}': cannot write the report there")


@pytest.mark.parametrize('folder', ['report.md', 'hparams.png'])
def test_report_refuses_a_folder_in_a_report_file_s_place_before_writing_any(tmp_path, folder):
  """A folder named report.md was a traceback once the plots had been replaced; one named
  hparams.png, one line after accuracy.png had been."""
  run = _run_dir(tmp_path, ROW.encode())
  out = tmp_path / 'report'
  (out / folder).mkdir(parents=True)
  (out / 'accuracy.png').write_bytes(b'an earlier report')
  _refused(_cli('report.py', str(run), f'--out={out}'),
           f"--out '{out}': {folder} is a folder, where the report writes a file")
  assert (out / 'accuracy.png').read_bytes() == b'an earlier report'
  assert sorted(os.listdir(out)) == sorted(['accuracy.png', folder])


# ---- launch/benchmark.py ------------------------------------------------------------------

# Small enough that a benchmark not refusing the flag ends within seconds.
SMALL = ['--tasks=mlp', '--num_clients=20', '--cohort_sizes=2', '--noisolate_rows']


@pytest.mark.parametrize('flag,needle', [
    ('--rounds=0', '--rounds must be >= 1, got 0'),
    ('--rounds=-2', '--rounds must be >= 1, got -2'),
    ('--warmup=-1', '--warmup must be >= 0, got -1'),
    ('--num_clients=-5', '--num_clients must be >= 1, got -5'),
    ('--cohort_sizes=2,-1', "--cohort_sizes must be integers >= 1, got '2,-1'"),
    ('--cohort_sizes=0', "--cohort_sizes must be integers >= 1, got '0'"),
    ('--tasks=', '--tasks must name at least one task among mlp, cnn, lstm'),
    # Measured twice, two rows of one key in --json:
    ('--cohort_sizes=2,3,2', '--cohort_sizes names 2 twice; give each once'),
    ('--tasks=mlp,mlp', '--tasks names mlp twice; give each once'),
    # Found by its row, after the rows before it were measured:
    ('--cohort_sizes=2,21', '--cohort_sizes: a cohort of 21 is more clients than --num_clients '
                            '(20) generates; raise --num_clients or lower the cohort'),
    # Named as the field it sets, "(from benchmark.py's flags)":
    ('--conv=bogus', "got 'bogus' (set by benchmark.py's --conv)"),
    # absl's own refusals were "FATAL Flags parsing error" with exit status 1:
    ('--rounds=abc', "flag --rounds=abc: invalid literal for int() with base 10: 'abc'"),
    ('--task=mlp', "Unknown command line flag 'task'. Did you mean: tasks ?"),
])
def test_benchmark_refuses_out_of_range_counts_before_any_row(tmp_path, flag, needle):
  out = tmp_path / 'bench.json'
  _refused(_cli('benchmark.py', *SMALL, flag, f'--json={out}', timeout=300), needle)
  assert not out.exists()


def test_benchmark_refuses_a_json_it_cannot_write_before_measuring(tmp_path):
  target = uncreatable_path(tmp_path, 'bench.json')
  p = _cli('benchmark.py', *SMALL, '--rounds=1', f'--json={target}', timeout=300)
  _refused(p, f"--json '{target}' cannot be written")
  assert 'mlp ' not in p.stdout  # no row was measured
  _refused(_cli('benchmark.py', *SMALL, f'--json={tmp_path}'), f"--json '{tmp_path}' is a folder")
  # The check leaves an existing file as it was, here when a later check refuses a flag.
  kept = tmp_path / 'kept.json'
  kept.write_text('[1]')
  _refused(_cli('benchmark.py', *SMALL, '--cohort_sizes=50', f'--json={kept}'),
           '--cohort_sizes: a cohort of 50 is more clients than --num_clients (20)')
  assert kept.read_text() == '[1]'
  # Each row's write replaces the file: a link became a file, a device node (/dev/null, as
  # root) a file, and a FIFO was opened for a reader that never came.
  link = tmp_path / 'link.json'
  link.symlink_to(kept)
  _refused(_cli('benchmark.py', *SMALL, f'--json={link}'),
           f"--json '{link}' is a link, which each row's write would replace with a file; give "
           f"its target, '{kept}'")
  assert link.is_symlink() and kept.read_text() == '[1]'
  fifo = tmp_path / 'fifo'
  os.mkfifo(fifo)
  _refused(_cli('benchmark.py', *SMALL, f'--json={fifo}'),
           f"--json '{fifo}' is not a regular file (a FIFO, a device)")


# ---- launch/prepare_data.py ---------------------------------------------------------------

POSTS = """<?xml version="1.0" encoding="utf-8"?>
<posts>
  <row Id="1" PostTypeId="1" CreationDate="2015-01-01T10:00:00.000" OwnerUserId="7" Body="&lt;p&gt;The beer is good. Hops!&lt;/p&gt;" />
  <row Id="2" PostTypeId="2" CreationDate="2015-02-01T10:00:00.000" OwnerUserId="3" Body="&lt;p&gt;It is good.&lt;/p&gt;" />
  <row Id="3" PostTypeId="2" CreationDate="2016-03-01T10:00:00.000" OwnerUserId="7" Body="&lt;p&gt;Hops is the beer.&lt;/p&gt;" />
</posts>
"""


@pytest.mark.parametrize('flag,needle', [
    ('--split_date=notadate', "--split_date 'notadate' is not a date; expected YYYY-MM-DD"),
    ('--split_date=2015-1-1', "--split_date '2015-1-1' is not a date; expected YYYY-MM-DD"),
    ('--split_date=2030-01-01', '--split_date 2030-01-01 leaves the test split empty: 4 examples '
                                '(sentences) fall before it, 0 on or after it; give a '
                                '--split_date between 2015-01-01 and 2016-03-01'),
    ('--split_date=2015-01-01', '--split_date 2015-01-01 leaves the train split empty: 0 '
                                'examples (sentences) fall before it, 4 on or after it'),
])
def test_prepare_refuses_a_bad_or_emptying_split_date(tmp_path, flag, needle):
  (tmp_path / 'Posts.xml').write_text(POSTS)
  out = tmp_path / 'out'
  _refused(_cli('prepare_data.py', '--format=stackexchange_xml', '--task=stackoverflow',
                f'--source={tmp_path / "Posts.xml"}', f'--out={out}', flag), needle)
  assert not out.exists() and not (tmp_path / 'out.partial').exists()


@pytest.mark.parametrize('flag,needle', [
    ('--sequence_length=100000000', '--sequence_length must be in [2, 1024] (20 in the paper), '
                                    'got 100000000'),
    ('--vocab_size=0', '--vocab_size must be >= 1, got 0'),
    ('--test_fraction=1', '--test_fraction must be in (0, 1), got 1.0'),
    ('stray', "unexpected argument(s) 'stray'"),
])
def test_prepare_refuses_out_of_range_flags_naming_each(tmp_path, flag, needle):
  """--sequence_length 1e8 was taken: the process was killed for memory, leaving OUT.partial;
  the others were named together in one message."""
  (tmp_path / 'Posts.xml').write_text(POSTS)
  out = tmp_path / 'out'
  _refused(_cli('prepare_data.py', '--format=stackexchange_xml', '--task=stackoverflow',
                f'--source={tmp_path / "Posts.xml"}', f'--out={out}', flag), needle)
  assert not out.exists() and not (tmp_path / 'out.partial').exists()


@pytest.mark.parametrize('given,needle', [
    ({'vocab_size': 0}, '--vocab_size must be >= 1, got 0'),
    ({'sequence_length': 1}, '--sequence_length must be in [2, 1024]'),
    ({'test_fraction': 0.0}, '--test_fraction must be in (0, 1), got 0.0'),
])
def test_prepare_called_from_python_refuses_the_same_ranges(tmp_path, given, needle):
  """The checks were the command's only: prepare(vocab_size=0) took every word of the
  word-count file (read_word_counts' 0), a vocabulary of another size than asked."""
  from fathom_sim.data import DataError
  from fathom_sim.data.prepare import prepare
  (tmp_path / 'Posts.xml').write_text(POSTS)
  (tmp_path / 'counts.txt').write_text('the 5\nbeer 4\n')
  with pytest.raises(DataError, match=re.escape(needle)):
    prepare(str(tmp_path / 'Posts.xml'), str(tmp_path / 'out'), fmt='stackexchange_xml',
            task='stackoverflow', vocab_path=str(tmp_path / 'counts.txt'), **given)
  assert not (tmp_path / 'out').exists()


def test_prepare_refuses_a_split_date_for_a_format_with_its_own_splits(tmp_path):
  out = tmp_path / 'out'
  _refused(_cli('prepare_data.py', '--format=leaf_json', '--task=emnist',
                f'--source={tmp_path}', f'--out={out}', '--split_date=2016-01-01'),
           '--split_date applies to --format=stackexchange_xml only; leaf_json files hold '
           'their own train and test splits')
  assert not out.exists()


def test_prepare_refuses_a_split_date_and_a_test_fraction_together(tmp_path):
  """--test_fraction was not read beside --split_date, without a word."""
  (tmp_path / 'Posts.xml').write_text(POSTS)
  out = tmp_path / 'out'
  _refused(_cli('prepare_data.py', '--format=stackexchange_xml', '--task=stackoverflow',
                f'--source={tmp_path / "Posts.xml"}', f'--out={out}', '--split_date=2016-01-01',
                '--test_fraction=0.2'),  # (its default, given: as unread)
           '--split_date (2016-01-01) and --test_fraction (0.2) each choose the test split: '
           'give one of them')
  assert not out.exists()


@pytest.mark.parametrize('flags,needle', [
    (['--test_fraction=0.5'], '--test_fraction applies to --format=stackexchange_xml only'),
    (['--vocab_size=10000', '--sequence_length=7'],  # (the vocabulary's default, given)
     '--vocab_size, --sequence_length apply to --task=stackoverflow only'),
    (['--vocab=/nonexistent'], '--vocab applies to --task=stackoverflow only'),
])
def test_prepare_refuses_flags_that_do_not_apply_to_the_format_or_task(tmp_path, flags, needle):
  """A mixed-up command was converted without a word, the flags unread."""
  out = tmp_path / 'out'
  _refused(_cli('prepare_data.py', '--format=leaf_json', '--task=emnist',
                f'--source={tmp_path}', f'--out={out}', *flags), needle)
  assert not out.exists()


@pytest.mark.parametrize('stop, status', [
    ('raise KeyboardInterrupt', 130),  # Ctrl-C
    ('os.kill(os.getpid(), signal.SIGTERM); time.sleep(60)', 143),  # `kill`, a time limit
    ('raise MemoryError', 2),
])
def test_prepare_stopped_or_out_of_memory_says_so_in_its_own_words(tmp_path, stop, status):
  """It said a training run's line: 'stopped by a second Ctrl-C; the same command resumes
  the run from its last checkpoint', or for the host's memory 'the host ran out of memory
  making the run (); ... lower ... data.num_clients, ... model widths'. SIGTERM ended it at
  once, with no line, and left its scratch folder (<out>.partial). (In a process of its own:
  absl's flags, parsed, would change the logging of the tests after it.)"""
  out = str(tmp_path / 'out')
  # Stopped while the first split is written: its scratch folder is removed too.
  leaf = os.path.join(ROOT, 'tests', 'data', 'femnist_leaf_sample')
  code = ('import os, runpy, signal, sys, time\n'
          'from fathom_sim.data import tfds_store\n'
          'def interrupted(*args, **kwargs):\n'
          f'  {stop}\n'
          'tfds_store._write_split = interrupted\n'
          f"sys.argv = ['prepare_data.py', '--source={leaf}', '--out={out}', "
          "'--format=leaf_json', '--task=emnist']\n"
          "runpy.run_path('launch/prepare_data.py', run_name='__main__')\n")
  p = run_python(code)
  assert p.returncode == status, p.stderr[-2000:]
  said = ('interrupted' if status != 2 else
          f'the host ran out of memory preparing --source {leaf!r}: e.g. a client or file '
          'larger than this machine holds, or a damaged file that claims one')
  assert p.stderr.splitlines()[-1] == f'error: {said}; nothing was left at --out {out!r}'
  assert os.listdir(tmp_path) == []  # no --out, no <out>.partial


@pytest.mark.parametrize('script, flags, said', [
    ('benchmark.py', ['--tasks=mlp', '--cohort_sizes=3', '--rounds=2', '--num_clients=30'],
     'error: stopped by SIGTERM'),
    ('prepare_data.py', ['--format=leaf_json', '--task=emnist'],
     "error: interrupted; nothing was left at --out '{out}'"),
])
def test_a_sigterm_as_soon_as_the_command_takes_it_is_said_in_its_one_line(
    tmp_path, script, flags, said):
  """The checks and imports before the work (a second or two) were outside the handler: a
  SIGTERM there printed a Terminated traceback, and the exit status was not 143. Here the
  signal arrives the moment the command's handler is in place."""
  out = str(tmp_path / 'out')
  leaf = os.path.join(ROOT, 'tests', 'data', 'femnist_leaf_sample')
  argv = [script, *flags] + ([f'--json={out}'] if script == 'benchmark.py' else
                             [f'--source={leaf}', f'--out={out}'])
  code = ('import os, runpy, signal, sys\n'
          'from launch import cli\n'
          'take = cli.terminate_as_interrupt\n'
          'def taken():\n'
          '  take()\n'
          '  os.kill(os.getpid(), signal.SIGTERM)\n'
          'cli.terminate_as_interrupt = taken\n'
          f'sys.argv = {argv!r}\n'
          f"runpy.run_path('launch/{script}', run_name='__main__')\n")
  p = run_python(code)
  assert p.returncode == 143, p.stderr[-2000:]
  assert 'Traceback' not in p.stderr and 'Terminated' not in p.stderr, p.stderr[-2000:]
  assert p.stderr.splitlines()[-1] == said.format(out=out), p.stderr[-2000:]
  assert os.listdir(tmp_path) == []  # no --json, no --out, no <out>.partial


def test_prepare_refuses_an_out_that_is_a_file_and_keeps_it(tmp_path):
  (tmp_path / 'Posts.xml').write_text(POSTS)
  out = tmp_path / 'afile'
  out.write_text('mine')
  _refused(_cli('prepare_data.py', '--format=stackexchange_xml', '--task=stackoverflow',
                f'--source={tmp_path / "Posts.xml"}', f'--out={out}', '--split_date=2016-01-01'),
           f"--out '{out}' is a file, not a directory")
  assert out.read_text() == 'mine' and not (tmp_path / 'afile.partial').exists()


@pytest.mark.parametrize('script', ['main.py', 'sweep.py'])
def test_help_lists_the_compilation_cache_flag_defined_in_cli(script):
  p = _cli(script, '--help')  # absl's --help exits with status 1
  assert '--compilation_cache: Folder of JAX' in p.stdout, p.stdout[-2000:]


# ---- a URL where a folder is expected -----------------------------------------------------
# Runs, sweeps, datasets and reports are written through the filesystem: given gs://bucket/run,
# a run made a local folder named 'gs:' in the current folder and crashed in orbax's first save.

def test_a_url_workdir_is_refused_before_the_data_load_and_makes_no_folder(tmp_path):
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  env.pop('XLA_FLAGS', None)
  p = subprocess.run([sys.executable, os.path.join(ROOT, 'launch', 'main.py'),
                      f'--config={QUICKSTART}', '--workdir=gs://bucket/run',
                      '--config.data.num_clients=100000000'],  # a load that would not end soon
                     cwd=tmp_path, env=env, timeout=120, capture_output=True, text=True)
  _refused(p, "--workdir 'gs://bucket/run' is a URL")
  assert 'gcsfuse' in p.stderr and os.listdir(tmp_path) == []


def test_a_bracketed_workdir_or_sweep_folder_is_refused_before_anything_is_made(tmp_path):
  """A run in run[1] saved its checkpoints (orbax's warning: "Skipping merge of OCDBT
  checkpoints"), exited 0, and its resume found no checkpoint that reads back."""
  from fathom_sim import workdir as workdir_lib
  from fathom_sim.train import train_and_evaluate
  from tests.common import tiny_config
  with pytest.raises(workdir_lib.WorkdirError, match=r"--workdir '.*/run\[1\]': '\[1\]' in "
                     "its path '/.*/run\\[1\\]', which orbax reads as a glob pattern"):
    train_and_evaluate(tiny_config(), str(tmp_path / 'run[1]'))
  sweep_file = tmp_path / 'sweep.py'
  sweep_file.write_text(GOOD_SWEEP)
  with pytest.raises(workdir_lib.WorkdirError, match=r"--out '.*/sw\[a\]/x': '\[a\]' in its"):
    sweep.run_sweep(sweep_def.load_sweep(str(sweep_file)), str(tmp_path / 'sw[a]' / 'x'),
                    log=lambda _: None)
  assert os.listdir(tmp_path) == ['sweep.py']
  for fine in ('run[1', 'run]1', 'a?b*c{d}', 'e[]'):  # no character class: saved and read back
    workdir_lib.check_local(str(tmp_path / fine), '--workdir')
  with pytest.raises(workdir_lib.WorkdirError, match=r"'\[\]y\]' in its path"):
    workdir_lib.check_local(str(tmp_path / 'x[]y]'), '--workdir')  # the class of ] and y


def test_url_folders_are_refused_by_sweep_prepare_report_and_the_config(tmp_path, monkeypatch):
  from fathom_sim import workdir as workdir_lib
  from fathom_sim.config import check_config
  from fathom_sim.data import tfds_store
  from tests.common import tiny_config
  monkeypatch.chdir(tmp_path)
  with pytest.raises(workdir_lib.WorkdirError, match="--workdir 's3://b/run' is a URL"):
    workdir_lib.prepare('s3://b/run', tiny_config())
  sweep_file = tmp_path / 'sweep.py'
  sweep_file.write_text(GOOD_SWEEP)
  with pytest.raises(workdir_lib.WorkdirError, match="--out 'gs://b/sweep' is a URL"):
    sweep.run_sweep(sweep_def.load_sweep(str(sweep_file)), 'gs://b/sweep', log=lambda _: None)
  with pytest.raises(DataError, match="--out 'gs://b/data' is a URL"):
    tfds_store.check_out('gs://b/data')
  from fathom_sim.data.prepare import prepare
  with pytest.raises(DataError, match="--source 'gs://b/src': no such file or directory; for a "
                                      'URL, mount the bucket'):
    prepare('gs://b/src', str(tmp_path / 'prepared'), fmt='leaf_json', task='emnist')
  for name, field in (('npz', 'path'), ('femnist', 'data_dir'), ('stackoverflow', 'data_dir')):
    with pytest.raises(ConfigError, match=f"config.data.{field} must be a local path.*gcsfuse"):
      check_config(tiny_config(**{'data.name': name, f'data.{field}': 'gs://b/d'}))
  assert os.listdir(tmp_path) == ['sweep.py']
  run = _run_dir(tmp_path, ROW.encode())
  p = _cli('report.py', str(run), '--out=gs://b/report')
  _refused(p, "--out 'gs://b/report' is a URL")
  _refused(_cli('report.py', 'gs://b/runs', f'--out={tmp_path / "report"}'),
           'no such folder: gs://b/runs; for a URL, mount the bucket')
  _refused(_cli('sweep.py', f'--sweep={sweep_file}', '--out=gs://b/sweep', '--dry_run'),
           "--out 'gs://b/sweep' is a URL")
  # a local name that merely holds '://' is a folder like any other
  from fathom_sim.errors import is_url
  assert not is_url('runs/a://b') and is_url('gs://b') and is_url('s3+x.y-z://b')


def test_report_prepare_and_a_config_file_start_no_jax():
  """The report and prepare_data commands, and reading a config file (a misspelt flag, a file
  that does not load), need no JAX, whose import is ~2 s of each start: a module-level
  `import jax` on their path (metrics, workdir, the data package, config) would bring it
  back without a word."""
  code = ('import sys; sys.path.insert(0, "."); '
          'from launch import cli; '
          'import fathom_sim.report, fathom_sim.results, fathom_sim.plots, fathom_sim.sweep; '
          'import fathom_sim.workdir; '
          'import fathom_sim.data.prepare, fathom_sim.data.prepared, fathom_sim.config; '
          'from configs import quickstart; quickstart.get_config(); '
          'print(sorted(m for m in sys.modules if m == "jax" or m.startswith(("flax", "optax", '
          '"orbax"))))')
  p = subprocess.run([sys.executable, '-c', code], cwd=ROOT, capture_output=True, text=True,
                     timeout=120)
  assert p.returncode == 0, p.stderr[-2000:]
  assert p.stdout.strip() == '[]'

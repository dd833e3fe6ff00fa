"""Sweeps (runs, index, restart skipping finished runs) and reports (plots, hand-checked tables)."""

import dataclasses
import json
import math
import os
import random
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest

from fathom_sim import plots, report, results, sweep, sweep_def
from fathom_sim.train import train_and_evaluate
from fathom_sim.workdir import WorkdirError
from tests.common import run_python, tiny_config


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SWEEP_FILE = '''
from tests.common import tiny_config

def get_sweep():
  return {'config': tiny_config(num_rounds=3, eval_every=1, num_devices=1),
          'overrides': [{'algorithm': 'fathom'}, {'algorithm': 'fedavg', 'eta': 0.1}],
          'seeds': [0, 1]}
'''


def _cli(script, *args):
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  env.pop('XLA_FLAGS', None)
  return subprocess.run([sys.executable, os.path.join(ROOT, 'launch', script), *args],
                        cwd=ROOT, env=env, timeout=300, capture_output=True, text=True)


def test_setting_names_are_deterministic_and_path_safe():
  assert sweep_def.setting_name({}) == 'base'
  assert sweep_def.setting_name({'eta': 0.05, 'batch_size': 8.0}) == 'eta=0.05,batch_size=8'
  assert (sweep_def.setting_name({'model.hidden': (64, 32), 'data.path': '/a b'})
          == 'model.hidden=64-32,data.path=_a_b')


@pytest.mark.parametrize('second,needle', [
    ({'eta': 0.1}, 'the sweep lists the same setting twice: eta=0.1'),
    # It said "the same setting twice" too: the folder names round floats to 6 digits.
    ({'eta': 0.1000001}, "the sweep's settings {'eta': 0.1} and {'eta': 0.1000001} would share "
                         "the folder 'eta=0.1' (a folder is named by the values"),
])
def test_settings_that_would_share_a_folder_are_refused_saying_why(tmp_path, second, needle):
  from fathom_sim.config import ConfigError
  sweep_file = tmp_path / 'twice.py'
  sweep_file.write_text(SWEEP_FILE.replace("[{'algorithm': 'fathom'}, {'algorithm': 'fedavg', "
                                           "'eta': 0.1}]", f"[{{'eta': 0.1}}, {second!r}]"))
  with pytest.raises(ConfigError) as e:
    sweep_def.plan_runs(sweep_def.load_sweep(str(sweep_file)), str(tmp_path / 'out'))
  assert needle in str(e.value)


def test_overriding_a_swept_field_from_the_command_line_is_refused(tmp_path):
  sweep_file = tmp_path / 'tiny_sweep.py'
  sweep_file.write_text(SWEEP_FILE)
  out = tmp_path / 'sweep'
  p = _cli('sweep.py', f'--sweep={sweep_file}', f'--out={out}', '--config.eta=0.2')
  assert p.returncode == 2 and p.stderr.count('\n') == 1, p.stderr
  assert '--config.eta is a field the sweep varies' in p.stderr
  assert not out.exists()
  # A field the sweep leaves alone may be overridden.
  runs = sweep_def.plan_runs(sweep_def.load_sweep(str(sweep_file)), str(out), {'num_rounds': 1})
  assert {r.config.num_rounds for r in runs} == {1} and len(runs) == 4


def test_a_field_the_sweep_sets_that_its_runs_do_not_read_is_said_once_per_setting(tmp_path):
  sweep_file = tmp_path / 'unread_sweep.py'
  sweep_file.write_text(SWEEP_FILE.replace("'eta': 0.1", "'eta': 0.1, 'eta_h': 0.5"))
  lines = []
  sweep.run_sweep(sweep_def.load_sweep(str(sweep_file)), str(tmp_path / 'sweep'),
                  extra={'server_b1': 0.5}, train=lambda c, w: {'final': {}},
                  log=lines.append)
  unread = [line for line in lines if 'not read' in line]
  assert unread == [
      '[1/4] algorithm=fathom: set by the sweep but not read by its runs: server_b1=0.5 '
      '(server_optimizer is sgd)',
      '[3/4] algorithm=fedavg,eta=0.1,eta_h=0.5: set by the sweep but not read by its runs: '
      'eta_h=0.5 (algorithm is fedavg); server_b1=0.5 (server_optimizer is sgd)'], lines


def test_a_second_sweep_on_a_live_sweeps_folder_is_refused_and_changes_nothing(tmp_path):
  """It rewrote sweep.json and took the runs the first had not reached yet."""
  import fcntl
  sweep_file = tmp_path / 'tiny_sweep.py'
  sweep_file.write_text(SWEEP_FILE)
  out = tmp_path / 'sweep'
  out.mkdir()
  calls = []
  with open(out / '.lock', 'a+') as live:  # the first sweep's, still running
    fcntl.flock(live, fcntl.LOCK_EX | fcntl.LOCK_NB)
    with pytest.raises(WorkdirError, match=f"--out '{out}' is in use by a running command"):
      sweep.run_sweep(sweep_def.load_sweep(str(sweep_file)), str(out),
                      train=lambda c, w: calls.append(w), log=lambda _: None)
  assert os.listdir(out) == ['.lock'] and not calls


def test_overrides_no_run_got_as_far_as_its_workdir_with_may_be_corrected(tmp_path):
  """A typo in an override that failed every run before its workdir held a config: the rerun
  with the corrected value was refused, though no run holds the old one."""
  from fathom_sim.data import DatasetError
  sweep_file = tmp_path / 'tiny_sweep.py'
  sweep_file.write_text(SWEEP_FILE)
  definition, out = sweep_def.load_sweep(str(sweep_file)), str(tmp_path / 'sweep')

  def missing(config, workdir):
    raise DatasetError('data.path: no such file')

  npz = {'data.name': 'npz', 'data.num_classes': 10}
  entries = sweep.run_sweep(definition, out, extra={**npz, 'data.path': 'typo.npz'},
                            train=missing, log=lambda _: None)
  assert {e['status'] for e in entries} == {'failed'}
  done = []
  right = {**npz, 'data.path': 'right.npz'}
  entries = sweep.run_sweep(definition, out, extra=right,
                            train=lambda c, w: done.append(w) or {'final': {}},
                            log=lambda _: None)
  assert len(done) == 4
  # A workdir holding a config but no result (its run out of memory at init, or killed in
  # its first compile: an empty metrics.jsonl) holds nothing to keep: corrected again.
  workdir = os.path.join(out, entries[0]['workdir'])
  os.makedirs(workdir, exist_ok=True)
  open(os.path.join(workdir, 'config.json'), 'w').write('{}')
  open(os.path.join(workdir, 'metrics.jsonl'), 'w').close()
  sweep.check_out(definition, out, {**npz, 'data.path': 'other.npz'})
  # Once a run's workdir holds a result, other overrides are refused before any run.
  open(os.path.join(workdir, 'metrics.jsonl'), 'w').write('{"round": 1}\n')
  with pytest.raises(WorkdirError, match="holds this sweep run with the overrides "
                     "--config.data.name=npz --config.data.num_classes=10 "
                     "--config.data.path=right.npz, and this command gives none: data.name "
                     "would change"):
    sweep.run_sweep(definition, out, train=lambda c, w: done.append(w), log=lambda _: None)
  assert len(done) == 4
  with pytest.raises(WorkdirError, match="gives --config.data.name=npz "
                     "--config.data.num_classes=10 --config.data.path=right.npz "
                     "--config.eta_h=0.5: eta_h would change"):
    sweep.check_out(definition, out, {**right, 'eta_h': 0.5})
  # Values the runs had anyway, or those they do not read, are no change: they were refused,
  # said as changing the runs' results (their workdirs take them).
  sweep.check_out(definition, out, {**right, 'server_lr': 1.0, 'data.path': './right.npz',
                                    'data.size_log_mean': 9.0})


def test_runs_no_longer_asked_for_stay_listed_while_their_folders_are_there(tmp_path):
  """Run again with fewer seeds (or a setting taken out), the sweep rewrote sweep.json with
  the runs it planned alone: the others' status and results were lost, while report.py still
  counted their folders."""
  sweep_file = tmp_path / 'tiny_sweep.py'
  sweep_file.write_text(SWEEP_FILE)
  definition, out = sweep_def.load_sweep(str(sweep_file)), str(tmp_path / 'sweep')

  def train(config, workdir):
    os.makedirs(workdir, exist_ok=True)
    open(os.path.join(workdir, 'metrics.jsonl'), 'w').close()
    return {'final': {'test_accuracy': 0.5 + config.seed / 10}}

  first = sweep.run_sweep(definition, out, train=train, log=lambda _: None)
  assert [e['status'] for e in first] == ['done'] * 4
  fewer = dataclasses.replace(definition, seeds=[0])
  entries = sweep.run_sweep(fewer, out, train=train, log=lambda _: None)
  assert [e['name'] for e in entries] == ['algorithm=fathom/seed=0',
                                          'algorithm=fedavg,eta=0.1/seed=0']
  with open(os.path.join(out, 'sweep.json')) as f:
    index = json.load(f)
  assert index['seeds'] == [0]
  assert index['runs'][2:] == [e for e in first if e['seed'] == 1]  # as they were
  # A folder gone, or one that holds no run for report.py (no metrics.jsonl), is not listed.
  shutil.rmtree(os.path.join(out, 'algorithm=fathom', 'seed=1'))
  os.remove(os.path.join(out, 'algorithm=fedavg,eta=0.1', 'seed=1', 'metrics.jsonl'))
  sweep.run_sweep(fewer, out, train=train, log=lambda _: None)
  with open(os.path.join(out, 'sweep.json')) as f:
    assert [e['name'] for e in json.load(f)['runs']] == [
        'algorithm=fathom/seed=0', 'algorithm=fedavg,eta=0.1/seed=0']
  # One a killed sweep left 'running' is listed as pending: no sweep runs it now.
  sweep.run_sweep(definition, out, train=train, log=lambda _: None)
  with open(os.path.join(out, 'sweep.json')) as f:
    index = json.load(f)
  assert index['runs'][1]['name'] == 'algorithm=fathom/seed=1'
  index['runs'][1]['status'] = 'running'
  with open(os.path.join(out, 'sweep.json'), 'w') as f:
    json.dump(index, f)
  sweep.run_sweep(fewer, out, train=train, log=lambda _: None)
  with open(os.path.join(out, 'sweep.json')) as f:
    assert [(e['name'], e['status']) for e in json.load(f)['runs']][2:] == [
        ('algorithm=fathom/seed=1', 'pending'), ('algorithm=fedavg,eta=0.1/seed=1', 'done')]


def test_sweep_runs_every_setting_and_seed_once_and_reports(tmp_path):
  sweep_file = tmp_path / 'tiny_sweep.py'
  sweep_file.write_text(SWEEP_FILE)
  out = str(tmp_path / 'sweep')
  calls = []

  def counting_train(config, workdir):
    calls.append(workdir)
    return train_and_evaluate(config, workdir)

  definition = sweep_def.load_sweep(str(sweep_file))
  entries = sweep.run_sweep(definition, out, train=counting_train, log=lambda _: None)
  names = ['algorithm=fathom/seed=0', 'algorithm=fathom/seed=1',
           'algorithm=fedavg,eta=0.1/seed=0', 'algorithm=fedavg,eta=0.1/seed=1']
  assert [e['name'] for e in entries] == names and len(calls) == 4
  assert all(e['status'] == 'done' for e in entries)
  with open(os.path.join(out, 'sweep.json')) as f:
    index = json.load(f)
  assert [(r['name'], r['seed'], r['status'], r['workdir']) for r in index['runs']] == [
      (n, int(n[-1]), 'done', n) for n in names]
  for n in names:
    with open(os.path.join(out, n, 'config.json')) as f:
      config = json.load(f)
    assert config['seed'] == int(n[-1]) and config['algorithm'] in n
  summaries = [os.path.join(out, n, 'summary.json') for n in names]
  mtimes = [os.stat(p).st_mtime_ns for p in summaries]

  # Restarted from the command line: nothing reruns, nothing is rewritten, and sweep.json
  # keeps each run's result and the seconds the first sweep spent on it.
  p = _cli('sweep.py', f'--sweep={sweep_file}', f'--out={out}')
  assert p.returncode == 0, p.stderr[-3000:]
  assert p.stdout.count('finished already, skipped') == 4
  assert [os.stat(p).st_mtime_ns for p in summaries] == mtimes
  with open(os.path.join(out, 'sweep.json')) as f:
    assert json.load(f)['runs'] == index['runs']
  assert all(isinstance(r['final_test_accuracy'], float) and r['sweep_wall_s'] > 0
             for r in index['runs'])
  # Restarted with an override that changes every run's result: refused before any run, and
  # nothing written (each finished run was marked failed, and sweep.json lost the overrides
  # it was run with), --dry_run too. One a resumed run may change is no change of the sweep.
  index_text = (tmp_path / 'sweep' / 'sweep.json').read_text()
  for dry in ([], ['--dry_run']):
    p = _cli('sweep.py', f'--sweep={sweep_file}', f'--out={out}', '--config.cohort_size=4', *dry)
    assert p.returncode == 2 and p.stderr.count('\n') == 1, p.stderr
    assert (f"error: --out '{out}' holds this sweep run with the overrides none, and this "
            "command gives --config.cohort_size=4: cohort_size would change its runs' results"
            ) in p.stderr, p.stderr
  assert (tmp_path / 'sweep' / 'sweep.json').read_text() == index_text
  assert [os.stat(p).st_mtime_ns for p in summaries] == mtimes
  p = _cli('sweep.py', f'--sweep={sweep_file}', f'--out={out}', '--config.log_every=2')
  assert p.returncode == 0 and p.stdout.count('finished already, skipped') == 4, p.stderr
  # Fewer rounds than the runs hold: refused as launch/main.py refuses it, not skipped as done
  # (sweep.json would have said 2 rounds of runs that ran 3).
  entries = sweep.run_sweep(definition, out, extra={'num_rounds': 2}, train=counting_train,
                            log=lambda _: None)
  assert len(calls) == 4 and [e['status'] for e in entries] == ['failed'] * 4
  assert all('holds a run already at round 3; config.num_rounds must be at least that, got 2'
             in e['error'] for e in entries), entries
  # Said in the sweep's terms: its runs' folders are not given by a --workdir.
  assert all(e['error'].startswith(f"the sweep's run folder {os.path.join(out, e['workdir'])!r}")
             for e in entries), entries
  # The sweep file edited so that every run's result changes: each run is reported as failed
  # (its workdir holds another config), none is skipped as done or retrained.
  sweep_file.write_text(SWEEP_FILE.replace('num_devices=1', 'num_devices=1, cohort_size=4'))
  p = _cli('sweep.py', f'--sweep={sweep_file}', f'--out={out}')
  assert p.returncode == 1 and p.stderr.startswith('error: 4 of 4 run(s) failed: '), p.stderr
  assert 'cohort_size (5 -> 4)' in p.stderr.splitlines()[-1], p.stderr
  assert p.stdout.count('fields that change the result differ: cohort_size (5 -> 4); give the '
                        "sweep another --out, or move this run's folder away") == 4, p.stdout
  assert '--workdir' not in p.stdout + p.stderr
  assert [os.stat(p).st_mtime_ns for p in summaries] == mtimes
  # --dry_run says what the sweep would do: these fail (it said "done" before), those done.
  p = _cli('sweep.py', f'--sweep={sweep_file}', f'--out={out}', '--dry_run')
  assert p.returncode == 0 and p.stdout.count(': fails: ') == 4, p.stdout
  assert 'cohort_size (5 -> 4)' in p.stdout.splitlines()[0]
  sweep_file.write_text(SWEEP_FILE)
  p = _cli('sweep.py', f'--sweep={sweep_file}', f'--out={out}', '--dry_run')
  assert p.stdout.splitlines() == [f'{n}: done' for n in names], p.stdout

  # A run without its summary is unfinished: only that one goes through train_and_evaluate
  # again (which resumes from its final checkpoint).
  os.remove(summaries[1])
  calls.clear()
  sweep.run_sweep(definition, out, train=counting_train, log=lambda _: None)
  assert calls == [os.path.join(out, names[1])] and os.path.exists(summaries[1])

  p = _cli('report.py', out, f'--out={tmp_path / "report"}', '--targets=0.05,0.99')
  assert p.returncode == 0, p.stderr[-3000:]
  files = sorted(os.listdir(tmp_path / 'report'))
  assert files == ['accuracy.png', 'fathom_vs_fedavg.png', 'hparams.png', 'report.md']
  for f in files[:3]:
    assert (tmp_path / 'report' / f).read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
  table = (tmp_path / 'report' / 'report.md').read_text()
  assert '`algorithm=fathom`' in table and '`algorithm=fedavg,eta=0.1`' in table
  assert 'FedAvg grid search: 2 runs' in table
  # No FedAvg setting reaches 0.99: the comparison is not drawn (the last one removed), said.
  p = _cli('report.py', out, f'--out={tmp_path / "report"}', '--targets=0.99')
  assert p.returncode == 0, p.stderr[-3000:]
  assert 'fathom_vs_fedavg.png' not in os.listdir(tmp_path / 'report')
  assert p.stdout.splitlines()[-1] == (
      'no fathom_vs_fedavg.png: no FedAvg grid run alike with a FATHOM setting reached one of '
      'the targets (0.99); lower --targets to compare them')


def _write_run(workdir, algorithm, acc_by_round, examples_per_round, rounds, *,
               shared_until=0, shared=1):
  """Rows of `rounds` rounds, 0.5 s apart; those of rounds 1..`shared_until` 2 s apart and
  logged by a program of `shared` seeds at once."""
  os.makedirs(workdir)
  with open(os.path.join(workdir, 'config.json'), 'w') as f:
    json.dump({'algorithm': algorithm}, f)
  with open(os.path.join(workdir, 'metrics.jsonl'), 'w') as f:
    for t in range(1, rounds + 1):
      row = {'round': t, 'examples': examples_per_round * t, 'local_steps': 10 * t,
             'wall_s': 2.0 * min(t, shared_until) + 0.5 * max(t - shared_until, 0), 'eta': 0.1,
             'epochs': 1.0, 'batch_size': 20.0, 'h_glob': 0.0, 'h_local': 0.1}
      if t <= shared_until:
        row['vectorized_seeds'] = shared
      if t in acc_by_round:
        row['test_accuracy'] = acc_by_round[t]
      f.write(json.dumps(row) + '\n')


def test_a_folder_the_report_cannot_list_is_named_not_left_out(tmp_path, monkeypatch):
  """An unreadable seed folder was passed over without a word: its setting's mean was over
  the seeds left, and a sweep.json counted the seed 'done but its folder gone'."""
  from fathom_sim.data import DataError
  root = tmp_path / 'sweep'
  for seed in (0, 1):
    _write_run(root / 'eta=0.1' / f'seed={seed}', 'fedavg', {2: 0.3}, 50, 2)
  (root / 'sweep.json').write_text(json.dumps({'sweep': 's.py', 'runs': [
      {'name': f'eta=0.1/seed={i}', 'setting': 'eta=0.1', 'workdir': f'eta=0.1/seed={i}',
       'status': 'done'} for i in (0, 1)]}))
  locked, scandir = str(root / 'eta=0.1' / 'seed=1'), os.scandir

  def unreadable(path='.'):  # (as root, chmod 000 locks nothing out)
    if os.fspath(path) == locked:
      raise PermissionError(13, 'Permission denied', locked)
    return scandir(path)

  monkeypatch.setattr(os, 'scandir', unreadable)
  for find in (results.find_runs, results.find_listed, results.unreadable_indexes):
    with pytest.raises(DataError, match=re.escape(f'{locked}: cannot list its runs (Permission '
                                                  'denied); make it readable')):
      find([str(root)])


def test_the_report_follows_links_to_runs_and_refuses_one_run_reached_twice(tmp_path):
  """A seed moved to another disk and linked back was left out without a word (its setting
  '1 of 2 (1 not started)'), and a folder of links to runs gave 'no runs'. A link back up
  the tree must not make the walk endless, an alias inside the sweep (best -> eta=0.1) is
  not a setting of its own, and two links to one run would count it twice."""
  from fathom_sim.data import DataError
  root = tmp_path / 'sweep'
  _write_run(root / 'eta=0.1' / 'seed=0', 'fedavg', {2: 0.3}, 50, 2)
  _write_run(tmp_path / 'disk' / 's1', 'fedavg', {2: 0.5}, 50, 2)
  os.symlink(tmp_path / 'disk' / 's1', root / 'eta=0.1' / 'seed=1')
  os.symlink(root, root / 'eta=0.1' / 'up')  # a cycle
  os.symlink(root / 'eta=0.1', root / 'best')  # an alias inside the sweep: not a setting
  [group] = results.group_runs(results.find_runs([str(root)]))
  assert (group.setting, len(group.runs)) == ('eta=0.1', 2)
  assert report.final_accuracy(group)[0] == pytest.approx(0.4)
  links = tmp_path / 'links'
  links.mkdir()
  os.symlink(root / 'eta=0.1', links / 'a')
  assert [len(g.runs) for g in results.group_runs(results.find_runs([str(links)]))] == [2]
  os.symlink(tmp_path / 'disk' / 's1', links / 'b')
  with pytest.raises(DataError, match=f"{links / 'b'} is {links / 'a' / 'seed=1'} again, "
                                      'reached through a link: its runs would count twice'):
    results.find_runs([str(links)])


def test_the_report_warns_of_runs_of_one_config_and_seed_counted_apart(tmp_path):
  """Three seed folders whose commands left out --config.seed: '3 seeds', std 0, and no word.
  A copy of a sweep given beside it: each FedAvg run twice in the grid's cost."""
  root = tmp_path / 'runs'

  def run(path, seed, **fields):
    _write_run(path, 'fedavg', {2: 0.3}, 50, 2)
    with open(path / 'config.json', 'w') as f:
      json.dump({'algorithm': 'fedavg', 'seed': seed, 'num_rounds': 2, **fields}, f)

  for seed in (0, 1):
    run(root / 'fedavg' / f'seed={seed}', 0)
  run(root / 'fedavg' / 'seed=2', 2)
  run(root / 'other' / 'seed=0', 0, eta=0.5)
  text = report.markdown(results.group_runs(results.find_runs([str(root)])), [0.2])
  assert ('Warning: runs of one config and seed, each counted as a run of its own (a copy, or '
          f"`--config.seed` left out of a seed's command): `{root / 'fedavg' / 'seed=0'}`, "
          f"`{root / 'fedavg' / 'seed=1'}`. Each copy counts") in text, text
  # Seeds apart, or any field the run reads apart, as a sweep tells its runs apart (eta; the
  # rounds, the lanes of a timing sweep, max_rejected_rounds): no word.
  run(tmp_path / 'fine' / 'a' / 'seed=0', 0)
  run(tmp_path / 'fine' / 'a' / 'seed=1', 1)
  for setting, field in (('b', {'eta': 0.5}), ('c', {'num_rounds': 3}),
                         ('d', {'lanes_per_device': 2}), ('e', {'max_rejected_rounds': 5})):
    run(tmp_path / 'fine' / setting / 'seed=0', 0, **field)
  assert 'Warning: runs of one config' not in report.markdown(
      results.group_runs(results.find_runs([str(tmp_path / 'fine')])), [0.2])


def test_a_run_stopped_by_max_rejected_rounds_is_said_diverged_not_unfinished(tmp_path):
  """Outside a sweep (which marks it failed), a run stopped for good by max_rejected_rounds
  was 'unfinished', as if running it again would go on; it stops again."""
  root = tmp_path / 'runs'
  for seed, rejected in ((0, 3), (1, 2)):  # seed 1: two rounds rejected, still going
    path = root / 'fedavg' / f'seed={seed}'
    _write_run(path, 'fedavg', {2: 0.3}, 50, 6)
    rows = [json.loads(line) for line in (path / 'metrics.jsonl').read_text().splitlines()]
    for i, row in enumerate(rows):
      row['accepted'] = i < len(rows) - rejected
    rows.append({'round': 6, 'test_accuracy': 0.3})  # a row without 'accepted': no change
    (path / 'metrics.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in rows))
    (path / 'config.json').write_text(json.dumps(
        {'algorithm': 'fedavg', 'seed': seed, 'num_rounds': 10, 'max_rejected_rounds': 3}))
  runs = results.find_runs([str(root)])
  assert [r.rows.rejected_at_end for r in runs] == [3, 2]
  assert [r.diverged for r in runs] == [True, False]
  table = report.markdown(results.group_runs(runs), [0.2])
  assert '| `fedavg` | fedavg | 2 (1 unfinished, 1 diverged: stopped by max_rejected_rounds) |' in (
      table), table


def test_report_says_the_comparison_is_missing_for_settings_run_unlike(tmp_path):
  """A FedAvg grid of another cohort size reached the target: the figure is not drawn, and the
  advice to lower the targets (which cannot help) was given all the same."""
  root = tmp_path / 'runs'
  _write_run(root / 'fathom', 'fathom', {2: 0.5}, 100, 2)
  _write_run(root / 'fedavg', 'fedavg', {2: 0.5}, 100, 2)
  with open(root / 'fedavg' / 'config.json', 'w') as f:
    json.dump({'algorithm': 'fedavg', 'cohort_size': 99}, f)
  p = _cli('report.py', str(root), f'--out={tmp_path / "report"}', '--targets=0.3')
  assert p.returncode == 0, p.stderr[-3000:]
  assert 'fathom_vs_fedavg.png' not in os.listdir(tmp_path / 'report')
  assert p.stdout.splitlines()[-1] == (
      'no fathom_vs_fedavg.png: no FedAvg grid is run alike with a FATHOM setting (the same '
      'fields but eta, E and B: cohort size, model, data, ...); report.md says which differ')
  # ... and it does (it named the settings only).
  with open(tmp_path / 'report' / 'report.md') as f:
    assert ('compared with none: `fathom` (cohort_size 10, the grid\'s 99).'
            in f.read())


def test_tables_match_hand_computed_values(tmp_path):
  root = tmp_path / 'sweep'
  _write_run(root / 'fathom' / 'seed=0', 'fathom', {2: 0.2, 4: 0.5}, 100, 4)
  _write_run(root / 'fathom' / 'seed=1', 'fathom', {2: 0.35, 4: 0.45}, 100, 4)
  _write_run(root / 'fathom' / 'seed=2', 'fathom', {2: 0.1, 4: 0.2}, 100, 4)
  _write_run(root / 'eta=0.1' / 'seed=0', 'fedavg', {2: 0.3, 4: 0.31}, 50, 4)
  _write_run(root / 'eta=0.1' / 'seed=1', 'fedavg', {2: 0.4}, 50, 4)
  _write_run(root / 'eta=0.3' / 'seed=0', 'fedavg', {3: 0.1}, 70, 3)
  groups = results.group_runs(results.find_runs([str(root)]))
  by = {g.setting: g for g in groups}
  assert sorted(by) == ['eta=0.1', 'eta=0.3', 'fathom']
  assert [len(by[s].runs) for s in sorted(by)] == [2, 1, 3]

  # Seeds 0 and 1 reach 0.3 at rounds 4 and 2 (400 and 200 examples); seed 2 never does.
  t = report.to_target(by['fathom'], 0.3)
  assert (t['reached'], t['seeds']) == (2, 3)
  assert t['rounds'] == pytest.approx((3.0, math.sqrt(2)))
  assert t['examples'] == pytest.approx((300.0, 100 * math.sqrt(2)))
  assert t['local_steps'] == pytest.approx((30.0, 10 * math.sqrt(2)))
  assert report.to_target(by['fathom'], 0.6)['rounds'] == (None, None)
  assert report.to_target(by['eta=0.1'], 0.3)['rounds'] == (2.0, 0.0)
  assert report.to_target(by['eta=0.3'], 0.05)['rounds'] == (3.0, None)  # one seed: no std
  mean, std = report.final_accuracy(by['fathom'])  # last eval rows: 0.5, 0.45, 0.2
  assert mean == pytest.approx(0.38333333) and std == pytest.approx(0.16072751)
  assert report.seconds_per_round(by['fathom']) == {1: pytest.approx(0.5)}
  assert report.best_fedavg(groups, 0.3).setting == 'eta=0.1'
  assert report.best_fedavg(groups, 0.9) is None
  assert report.grid_cost(groups) == (200 + 200 + 210, 40 + 40 + 30, 3)

  table = report.markdown(groups, [0.3, 0.6])
  fathom_row = next(line for line in table.splitlines() if line.startswith('| `fathom`'))
  assert '3.0 ± 1.4 (2/3) | 300 ± 141 | 30 ± 14 | — | — | —' in fathom_row
  assert 'FedAvg grid search: 3 runs, 610 examples and 110 local steps in all.' in table
  assert ('| 0.3 | `eta=0.1` | 2.0 ± 0.0 | 100 ± 0 | 20 ± 0 | 3.0 ± 1.4 (2/3) | 300 ± 141 | '
          '30 ± 14 |') in table
  assert '| 0.6 | none reached it |' in table
  untimed = report.markdown(groups, [0.3, 0.6], timing=False)
  assert 's/round' not in untimed and '0.500' not in untimed  # fathom's 0.5 s per round
  assert untimed.splitlines()[1].count('---') == table.splitlines()[1].count('---') - 1

  # A run folder given directly is its setting's run.
  single = results.find_runs([str(root / 'fathom' / 'seed=1')])
  assert [r.setting for r in single] == ['fathom']
  # Given one by one, one setting's seed folders group together; two sweeps' settings of the
  # same name, given directly or as sweeps whose folders share a name, stay apart.
  other = tmp_path / 'other' / 'sweep'
  _write_run(other / 'eta=0.1' / 'seed=0', 'fedavg', {2: 0.9}, 50, 4)
  seeds = results.group_runs(results.find_runs([str(root / 'eta=0.1' / 'seed=0'),
                                              str(root / 'eta=0.1' / 'seed=1')]))
  assert [len(g.runs) for g in seeds] == [2]
  for paths in ([root / 'eta=0.1', other / 'eta=0.1'], [root, other]):
    apart = results.group_runs(results.find_runs([str(p) for p in paths]))
    setting = {g.setting: len(g.runs) for g in apart if g.setting.endswith('eta=0.1')}
    assert sorted(setting.values()) == [1, 2], setting


def _slow_tables(rows_by_seed, field, target):
  """The report's figures computed over the rows' dicts, one by one (the reference)."""
  hits = [next((r for r in rows if r.get('test_accuracy') is not None
                and r['test_accuracy'] >= target), None) for rows in rows_by_seed]
  gaps = sorted(b['wall_s'] - a['wall_s'] for rows in rows_by_seed
                for a, b in zip(rows, rows[1:]) if b['round'] == a['round'] + 1
                and isinstance(a.get('wall_s'), float) and isinstance(b.get('wall_s'), float))
  per_run = [{r['round']: r[field] for r in rows if isinstance(r.get(field), float)}
             for rows in rows_by_seed]
  common = sorted(set.intersection(*(set(d) for d in per_run)))
  lasts = [[r['test_accuracy'] for r in rows if r.get('test_accuracy') is not None][-1:]
           for rows in rows_by_seed]
  return ([None if h is None else (h['round'], h['examples'], h['local_steps']) for h in hits],
          (gaps[(len(gaps) - 1) // 2] + gaps[len(gaps) // 2]) / 2, common,
          [[d[t] for t in common] for d in per_run], [v for last in lasts for v in last])


def test_the_report_reads_rows_as_columns_with_the_rows_own_figures(tmp_path):
  """Runs are read as columns (a week-long run's rows as dicts do not fit in memory): the
  rounds to a target, seconds per round, last evaluations and curves equal a slow reading of
  the rows' dicts, with gaps in the rounds, rounds logged twice, null and missing fields, and
  a torn last line."""
  rng = random.Random(0)
  root = tmp_path / 'sweep' / 'fathom'
  rows_by_seed = []
  for seed in range(3):
    rows, wall = [], 0.0
    # Rounds 38-39 logged twice on seed 0 (a resumed run of older code, rows not cut).
    for t in [*range(1, 40), *([38, 39] if seed == 0 else []), *range(45, 90)]:
      wall += rng.uniform(0.1, 0.9)
      row = {'round': t, 'examples': 100 * t + seed, 'local_steps': 7 * t, 'wall_s': wall,
             'eta': rng.uniform(0.01, 1), 'epochs': 1.0, 'batch_size': 20.0, 'h_glob': 0.0,
             'h_local': 0.1, 'accepted': True}
      if t % 5 == seed:
        row['test_accuracy'] = rng.uniform(0, 0.8)
      if t % 11 == seed:
        row['eta'] = None  # a non-finite value as the writer logs it
      if t % 13 == seed:
        del row['wall_s']
      rows.append(row)
    rows_by_seed.append(rows)
    os.makedirs(root / f'seed={seed}')
    (root / f'seed={seed}' / 'config.json').write_text('{"algorithm": "fathom"}')
    (root / f'seed={seed}' / 'metrics.jsonl').write_text(
        ''.join(json.dumps(r) + '\n' for r in rows) + '{"round": 90, "exa')
  [group] = results.group_runs(results.find_runs([str(tmp_path / 'sweep')]))
  for target in (0.3, 0.6, 0.79):
    hits, median, common, etas, lasts = _slow_tables(rows_by_seed, 'eta', target)
    got = [report.first_reaching(run.rows, target) for run in group.runs]
    assert [None if h is None else (h['round'], h['examples'], h['local_steps'])
            for h in got] == hits
  assert report.seconds_per_round(group) == {1: pytest.approx(median, rel=1e-12)}
  assert report.last_evaluated(group) == pytest.approx(report.mean_std(lasts))
  x, mean, lo, hi, n = plots.curve(group, 'eta')
  assert n == 3
  assert list(x) == common and 0 < len(common) < 84
  assert mean == pytest.approx([sum(v) / 3 for v in zip(*etas)])
  assert list(lo) == [min(v) for v in zip(*etas)] and list(hi) == [max(v) for v in zip(*etas)]
  assert group.runs[0].total_examples == 8900 and group.num_rounds == 89


def test_a_long_runs_curve_draws_at_most_max_points_rounds(tmp_path, monkeypatch):
  _write_run(tmp_path / 'run', 'fathom', {t: t / 1000 for t in range(1, 1001, 10)}, 100, 1000)
  [group] = results.group_runs(results.find_runs([str(tmp_path / 'run')]))
  full = plots.curve(group, 'h_local')
  monkeypatch.setattr(plots, 'MAX_POINTS', 7)
  x, mean, _, _, _ = plots.curve(group, 'h_local')
  assert len(full[0]) == 1000 and list(mean) == [0.1] * 7
  evals = plots.curve(group, 'test_accuracy')[0]
  for drawn, step, last in ((x, 1, 1000), (evals, 10, 991)):
    gaps = np.diff(drawn)
    # The first and last rounds, and the rest evenly spread among the rounds logged.
    assert len(drawn) == 7 and (drawn[0], drawn[-1]) == (1, last)
    assert all(g % step == 0 for g in gaps) and gaps.max() - gaps.min() <= step


def test_a_summary_left_by_a_run_since_extended_does_not_make_it_finished(tmp_path):
  """num_rounds raised on a finished run, which then stops at round 5 of 6: its summary.json
  is the old run's (4 rounds, fewer examples). The report counts the run as unfinished, with
  the rows it has, not as finished with the old summary's figures."""
  workdir = tmp_path / 'sweep' / 'fedavg' / 'seed=0'
  _write_run(workdir, 'fedavg', {2: 0.3, 4: 0.4}, 50, 5)
  (workdir / 'config.json').write_text(json.dumps({'algorithm': 'fedavg', 'num_rounds': 6}))
  (workdir / 'summary.json').write_text(json.dumps({
      'rounds': 4, 'total_examples': 200, 'total_local_steps': 40,
      'final': {'test_accuracy': 0.4}}))
  [run] = results.find_runs([str(tmp_path / 'sweep')])
  assert run.summary is None and run.total_examples == 250
  assert '1 (1 unfinished)' in report.markdown(results.group_runs([run]), [0.3])
  (workdir / 'config.json').write_text(json.dumps({'algorithm': 'fedavg', 'num_rounds': 5}))
  (workdir / 'summary.json').write_text(json.dumps({
      'rounds': 5, 'total_examples': 250, 'total_local_steps': 50,
      'final': {'test_accuracy': 0.4}}))
  [run] = results.find_runs([str(tmp_path / 'sweep')])
  assert run.summary is not None  # the summary of the rounds it has: finished


def _finish(workdir, rounds, final, **config):
  (workdir / 'config.json').write_text(json.dumps({'algorithm': 'fathom', 'num_rounds': rounds,
                                                   **config}))
  (workdir / 'summary.json').write_text(json.dumps({
      'rounds': rounds, 'total_examples': 100 * rounds, 'total_local_steps': 10 * rounds,
      'final': {'test_accuracy': final}}))


def test_seeds_behind_their_setting_are_unfinished_in_tables_and_plots(tmp_path):
  """A sweep rerun with num_rounds 4 -> 6 and stopped part-way: seed 2, not yet resumed, still
  has its 4-round summary, and seed 3 has just started. The table averaged 4- and 6-round
  models as 3 finished seeds, mixed whole-test finals with sampled last evaluations, and the
  plots kept only the rounds every seed had logged (seed 3's one round)."""
  root = tmp_path / 'sweep' / 'fathom'
  for seed, acc in ((0, 0.5), (1, 0.6), (2, 0.2)):
    _write_run(root / f'seed={seed}', 'fathom', {2: acc - 0.1, 4: acc}, 100, 6 if seed < 2 else 4)
    _finish(root / f'seed={seed}', 6 if seed < 2 else 4, acc)
  _write_run(root / 'seed=3', 'fathom', {}, 100, 1)
  (root / 'seed=3' / 'config.json').write_text(json.dumps({'algorithm': 'fathom',
                                                            'num_rounds': 6}))
  [group] = results.group_runs(results.find_runs([str(tmp_path / 'sweep')]))
  assert group.num_rounds == 6 and len(group.finished) == 2
  assert report.final_accuracy(group) == pytest.approx((0.55, math.sqrt(0.005)))
  row = next(line for line in report.markdown([group], [0.3]).splitlines()
             if line.startswith('| `fathom`'))
  assert '| 4 (2 unfinished) | 0.550 ± 0.071 (2 finished) |' in row
  x, mean, _, _, n = plots.curve(group, 'test_accuracy')
  assert n == 2 and list(x) == [2, 4] and mean == pytest.approx([0.45, 0.55])
  assert list(plots.curve(group, 'eta')[0]) == [1, 2, 3, 4, 5, 6]
  # While no seed has finished: every seed's last evaluation, said as such.
  for seed in (0, 1):
    os.remove(root / f'seed={seed}' / 'summary.json')
  [group] = results.group_runs(results.find_runs([str(tmp_path / 'sweep')]))
  assert not group.finished and report.final_accuracy(group) == pytest.approx(
      (0.433333, 0.208167), rel=1e-4)
  assert '(last evals)' in report.markdown([group], [0.3])
  # A seed without rows (started, killed before round 1) leaves the others' curves.
  (root / 'seed=3' / 'metrics.jsonl').write_text('')
  [group] = results.group_runs(results.find_runs([str(tmp_path / 'sweep')]))
  assert list(plots.curve(group, 'test_accuracy')[0]) == [2, 4]


def test_the_best_fedavg_is_plotted_against_any_number_of_fathom_settings(tmp_path, monkeypatch):
  root = tmp_path / 'sweep'
  for i in range(plots.MAX_CURVES + 2):
    _write_run(root / f'f{i:02d}' / 'seed=0', 'fathom', {2: 0.1}, 100, 2)
  _write_run(root / 'zfedavg' / 'seed=0', 'fedavg', {2: 0.5}, 100, 2)
  groups = results.group_runs(results.find_runs([str(root)]))
  drawn, real = {}, plots.accuracy_plot

  def recorded(gs, path, *args):
    drawn[os.path.basename(path)] = [g.setting for g in gs]
    return real(gs, path, *args)

  monkeypatch.setattr(plots, 'accuracy_plot', recorded)
  plots.write_plots(groups, str(tmp_path / 'report'), [0.3])
  assert drawn['fathom_vs_fedavg.png'][-1] == 'zfedavg'
  assert len(drawn['fathom_vs_fedavg.png']) == plots.MAX_CURVES


def test_runs_of_one_setting_whose_configs_differ_are_flagged(tmp_path):
  root = tmp_path / 'sweep' / 'fathom'
  for seed, eta in ((0, 0.1), (1, 0.2)):
    _write_run(root / f'seed={seed}', 'fathom', {2: 0.3}, 100, 2)
    _finish(root / f'seed={seed}', 2, 0.3, eta=eta, seed=seed, log_every=seed + 1)
  table = report.markdown(results.group_runs(results.find_runs([str(tmp_path / 'sweep')])), [0.3])
  assert ('Warning: the runs of `fathom` differ in eta (0.1, 0.2): they are not seeds of one '
          'setting measured alike.') in table  # (log_every, which a resume may change, is not)
  # Fields a resume may change that change what is compared are named: rounds to a target
  # counted every 1 or every 5 rounds, a sampled evaluation against the whole test set.
  alike = tmp_path / 'measured' / 'fathom'
  for seed in (0, 1):
    _write_run(alike / f'seed={seed}', 'fathom', {2: 0.3}, 100, 2)
    _finish(alike / f'seed={seed}', 2, 0.3, seed=seed, eval_every=1 + 4 * seed,
            eval_clients=5 * seed)
  table = report.markdown(results.group_runs(results.find_runs([str(tmp_path / 'measured')])),
                          [0.3])
  assert 'differ in eval_clients (0, 5); eval_every (1, 5): they are' in table, table
  # A seed written before a field existed, or without its config.json, differs in nothing.
  _write_run(root / 'seed=2', 'fathom', {2: 0.3}, 100, 2)
  _finish(root / 'seed=2', 2, 0.3, seed=2)
  (root / 'seed=1' / 'config.json').unlink()
  table = report.markdown(results.group_runs(results.find_runs([str(tmp_path / 'sweep')])), [0.3])
  assert 'Warning' not in table, table
  # A field no seed reads (eta_h under FedAvg, a resume may change it) is no difference
  # either; under FATHOM it is.
  for algorithm in ('fedavg', 'fathom'):
    other = tmp_path / algorithm / 'fedavg'
    for seed in (0, 1):
      _write_run(other / f'seed={seed}', algorithm, {2: 0.3}, 100, 2)
      _finish(other / f'seed={seed}', 2, 0.3, seed=seed, eta_h=0.01 * (seed + 1),
              algorithm=algorithm)
    table = report.markdown(results.group_runs(results.find_runs([str(tmp_path / algorithm)])),
                            [0.3])
    assert ('differ in eta_h (0.01, 0.02)' in table) == (algorithm == 'fathom'), table
  # A field older code did not write is at its default, as a resume reads it: a seed from
  # before model.init started from flax's values, not the same setting as a 'fedjax' seed.
  newer = tmp_path / 'init' / 'fathom'
  for seed, fields in ((0, {}), (1, {'model': {'init': 'fedjax'}})):
    _write_run(newer / f'seed={seed}', 'fathom', {2: 0.3}, 100, 2)
    _finish(newer / f'seed={seed}', 2, 0.3, seed=seed, **fields)
  table = report.markdown(results.group_runs(results.find_runs([str(tmp_path / 'init')])), [0.3])
  assert 'differ in model.init ("fedjax", "flax")' in table, table


def test_seconds_per_round_of_seeds_run_as_one_program_say_so(tmp_path):
  """--vmap_seeds: each seed's wall_s is the group's clock, so s/round is a round of all the
  seeds together; the cell says how many, where a solo setting's says nothing. The rows say
  it: a group stopped before its summary went unlabelled, and seeds finished alone after a
  group (the last summary says 0) gave the median of both clocks, unlabelled."""
  # (name, summary's vectorized_seeds or None for no summary, rows' (shared_until, shared))
  cases = (('vec', 3, (0, 1)), ('solo', 0, (0, 1)), ('stopped', None, (6, 3)),
           ('then_alone', 0, (3, 3)))
  for name, summary_says, (until, shared) in cases:
    for seed in (0, 1):
      workdir = tmp_path / 'sweep' / name / f'seed={seed}'
      _write_run(workdir, 'fathom', {2: 0.3}, 100, 6, shared_until=until, shared=shared)
      if summary_says is not None:
        _finish(workdir, 6, 0.3, seed=seed)
        summary = json.loads((workdir / 'summary.json').read_text())
        (workdir / 'summary.json').write_text(
            json.dumps({**summary, 'vectorized_seeds': summary_says}))
  groups = results.group_runs(results.find_runs([str(tmp_path / 'sweep')]))
  assert {g.setting: report.seconds_per_round(g) for g in groups} == {
      'vec': {3: 0.5},  # (rows from before the rows said it: the summary's count)
      'solo': {1: 0.5}, 'stopped': {3: 2.0}, 'then_alone': {1: 0.5, 3: 2.0}}
  table = report.markdown(groups, [0.3])
  cells = {line.split(' | ')[0][3:-1]: line.split(' | ')[4] for line in table.splitlines()
           if line.startswith('| `')}
  odd = tmp_path / 'sweep' / 'solo' / 'seed=0' / 'metrics.jsonl'  # (a hand-edited count)
  odd.write_text(odd.read_text().replace('"round": 2,', '"vectorized_seeds": Infinity, '
                                         '"round": 2,'))
  [solo] = [g for g in results.group_runs(results.find_runs([str(tmp_path / 'sweep')]))
            if g.setting == 'solo']
  assert report.seconds_per_round(solo) == {1: 0.5}
  assert cells == {'vec': '0.500 (3 seeds at once)', 'solo': '0.500',
                   'stopped': '2.000 (3 seeds at once)',
                   'then_alone': '0.500; 2.000 (3 seeds at once)'}, table


def test_a_finished_run_without_test_examples_is_reported(tmp_path):
  """data.test_fraction 0: the summary's final test_accuracy is null, and report.py ended in
  a TypeError traceback on it."""
  workdir = tmp_path / 'sweep' / 'fathom' / 'seed=0'
  _write_run(workdir, 'fathom', {}, 50, 2)
  (workdir / 'summary.json').write_text(json.dumps({
      'rounds': 2, 'total_examples': 100, 'total_local_steps': 20,
      'final': {'test_accuracy': None}}))
  groups = results.group_runs(results.find_runs([str(tmp_path / 'sweep')]))
  assert report.final_accuracy(groups[0]) == (None, None)
  assert '| `fathom` |' in report.markdown(groups, [0.3])


def test_a_torn_config_or_summary_is_named_in_the_report_not_silently_taken_as_missing(
    tmp_path):
  """A killed copy or a full disk can leave config.json or summary.json torn: the run then
  counts as of algorithm '?' or unfinished, and the report says which files it could not read
  (a missing summary.json, an unfinished run's, is not named)."""
  root = tmp_path / 'sweep'
  for seed in (0, 1, 2):
    _write_run(root / 'fathom' / f'seed={seed}', 'fathom', {2: 0.3}, 100, 2)
  _finish(root / 'fathom' / 'seed=0', 2, 0.3)
  (root / 'fathom' / 'seed=1' / 'summary.json').write_text('{"rounds": 2, "fin')
  (root / 'fathom' / 'seed=2' / 'config.json').write_text('[1, 2]')
  runs = results.find_runs([str(root)])
  assert [r.unreadable for r in runs] == [(), ('summary.json',), ('config.json',)]
  assert runs[1].summary is None and runs[2].algorithm == '?'
  table = report.markdown(results.group_runs(runs), [0.3])
  [line] = [x for x in table.splitlines() if 'not readable as a JSON object' in x]
  assert (f'`{root / "fathom" / "seed=1" / "summary.json"}`, '
          f'`{root / "fathom" / "seed=2" / "config.json"}`.') in line
  assert 'seed=0' not in line


@pytest.mark.parametrize('torn', [0, 1])
def test_a_seed_s_torn_config_leaves_its_setting_in_the_fedavg_grid(tmp_path, torn):
  """The setting's algorithm and grid came from its first seed alone: with seed 0's config.json
  torn, the best FedAvg setting left the grid, and another was compared with FATHOM."""
  root = tmp_path / 'sweep'
  for seed in (0, 1):
    _write_run(root / 'eta=0.1' / f'seed={seed}', 'fedavg', {2: 0.5}, 50, 2)
    _write_run(root / 'eta=0.2' / f'seed={seed}', 'fedavg', {2: 0.2, 3: 0.5}, 50, 3)
    _write_run(root / 'fathom' / f'seed={seed}', 'fathom', {2: 0.5}, 100, 2)
  (root / 'eta=0.1' / f'seed={torn}' / 'config.json').write_text('{"algorithm": "fed')
  groups = results.group_runs(results.find_runs([str(root)]))
  by = {g.setting: g for g in groups}
  assert by['eta=0.1'].algorithm == 'fedavg'
  assert report.best_fedavg(groups, 0.5) is by['eta=0.1']
  [(_, fedavg, fathom)], alone = report.grids(groups)
  assert [g.setting for g in fedavg] == ['eta=0.1', 'eta=0.2'] and fathom == [by['fathom']]
  assert alone == [] and report.grid_cost(groups)[2] == 4


def test_fathom_at_another_alpha_is_compared_with_the_fedavg_grid(tmp_path):
  """FedAvg reads alpha only for the h_glob it logs: a FATHOM setting at alpha 0.9 was left
  out of the comparison ("run unlike every FedAvg grid") with a grid run at the default."""
  root = tmp_path / 'sweep'
  _write_run(root / 'eta=0.1' / 'seed=0', 'fedavg', {2: 0.5}, 50, 2)
  for alpha in (0.5, 0.9):
    _write_run(root / f'alpha={alpha}' / 'seed=0', 'fathom', {2: 0.5}, 100, 2)
    path = root / f'alpha={alpha}' / 'seed=0' / 'config.json'
    path.write_text(json.dumps({'algorithm': 'fathom', 'alpha': alpha}))
  groups = results.group_runs(results.find_runs([str(root)]))
  [(_, fedavg, fathom)], alone = report.grids(groups)
  assert [g.setting for g in fedavg] == ['eta=0.1'] and alone == []
  assert sorted(g.setting for g in fathom) == ['alpha=0.5', 'alpha=0.9']
  # Another cohort size is another grid's comparison all the same.
  (root / 'alpha=0.9' / 'seed=0' / 'config.json').write_text(
      json.dumps({'algorithm': 'fathom', 'alpha': 0.9, 'cohort_size': 3}))
  groups = results.group_runs(results.find_runs([str(root)]))
  assert [g.setting for g in report.grids(groups)[1]] == ['alpha=0.9']


@pytest.mark.parametrize('file, content', [
    ('config.json', {'num_rounds': 'abc'}), ('config.json', {'algorithm': ['x']}),
    ('config.json', {'model': 5}), ('config.json', {'model': {'name': {'x': 1}}}),
    ('config.json', {'eta': True}),
    ('summary.json', {'rounds': 2, 'total_examples': None}),
    ('summary.json', {'rounds': 2, 'final': 'x'}),
    ('summary.json', {'rounds': 2, 'final': {'test_accuracy': '0.5'}}),
    ('summary.json', {'rounds': '2'})])
def test_a_config_or_summary_with_a_field_of_another_type_is_named_not_a_traceback(
    tmp_path, file, content):
  """JSON that parses but holds a field of another type than a run writes (an edited file)
  ended report.py in a ValueError, TypeError or AttributeError traceback, exit 1."""
  root = tmp_path / 'sweep'
  for seed in (0, 1):
    _write_run(root / 'fathom' / f'seed={seed}', 'fathom', {2: 0.3}, 100, 2)
    _finish(root / 'fathom' / f'seed={seed}', 2, 0.3)
  path = root / 'fathom' / 'seed=1' / file
  path.write_text(json.dumps({**json.loads(path.read_text()), **content}))
  runs = results.find_runs([str(root)])
  assert [r.unreadable for r in runs] == [(), (file,)]
  table = report.markdown(results.group_runs(runs), [0.3])
  [line] = [x for x in table.splitlines() if 'not readable as a JSON object' in x]
  assert f'`{path}`.' in line


def test_a_config_saved_with_ints_for_floats_or_unknown_fields_is_read(tmp_path):
  """The type check takes a number for a number (eta saved as 1), null for an unset path, and
  passes over fields the simulator does not define (an older or newer version's)."""
  workdir = tmp_path / 'sweep' / 'fathom' / 'seed=0'
  _write_run(workdir, 'fathom', {2: 0.3}, 100, 2)
  _finish(workdir, 2, 0.3)
  path = workdir / 'config.json'
  path.write_text(json.dumps({**json.loads(path.read_text()), 'eta': 1, 'retired_field': 'x',
                              'model': {'name': 'mlp', 'retired': [1]},
                              'data': {'path': None, 'data_dir': None}}))
  [run] = results.find_runs([str(tmp_path / 'sweep')])
  assert run.unreadable == () and run.config['eta'] == 1


def test_every_shipped_sweep_loads_and_plans_valid_configs(tmp_path):
  from fathom_sim.config import check_config, unread_fields
  files = sorted(f for f in os.listdir(os.path.join(ROOT, 'sweeps'))
                 if f.endswith('.py') and f != 'claim_grid.py')
  assert 'claim_quickstart.py' in files and 'claim_stackoverflow_real.py' in files
  for f in files:
    definition = sweep_def.load_sweep(os.path.join(ROOT, 'sweeps', f))
    runs = sweep_def.plan_runs(definition, str(tmp_path / f))
    assert runs, f
    for run in runs:
      check_config(run.config)
      # Every field the sweep sets is one its runs read.
      assert unread_fields(run.config, [*definition.fixed, *run.overrides]) == [], run.name
  claim = sweep_def.load_sweep(os.path.join(ROOT, 'sweeps', 'claim_quickstart.py'))
  fedavg = [o for o in claim.overrides if o['algorithm'] == 'fedavg']
  assert len(fedavg) == 27 and len(claim.seeds) == 5
  assert claim.overrides[0] == {'algorithm': 'fathom'}


def test_a_sweep_whose_data_is_missing_tries_it_once_and_marks_every_run_failed(tmp_path):
  """As claim.sh on real data not downloaded: one attempt and one message, not one per run;
  a setting with other data is still tried."""
  from fathom_sim.config import base_config
  config = base_config()
  config.data.name, config.data.data_dir = 'femnist', str(tmp_path / 'no_such_data')
  config.model.name = 'emnist_cnn'
  definition = sweep_def.SweepDef(config, '<inline>', [{'eta': 0.1}, {'eta': 0.05},
                                                   {'data.data_dir': str(tmp_path / 'other')}],
                              [0, 1], {})
  tried, logs = [], []

  def train(c, workdir):
    tried.append(workdir)
    return train_and_evaluate(c, workdir)

  entries = sweep.run_sweep(definition, str(tmp_path / 'out'), train=train, log=logs.append)
  assert [e['status'] for e in entries] == ['failed'] * 6
  assert len(tried) == 2  # the first run of each data folder
  assert len({e['error'] for e in entries[:4]}) == 1 and 'no_such_data' in entries[0]['error']
  assert 'other' in entries[4]['error']
  assert sum('not tried: the same data as a run that failed' in line for line in logs) == 4


def test_a_run_out_of_memory_fails_alone_and_the_sweep_goes_on(tmp_path, monkeypatch):
  """A setting too large for the device is that run's failure, not the sweep's end."""
  import jax
  from fathom_sim.driver import Rounds
  definition = sweep_def.SweepDef(tiny_config(num_rounds=2, num_devices=1), '<inline>',
                              [{'cohort_size': 6}, {}], [0], {})
  real_round = Rounds.__call__

  def round_or_out_of_memory(self, state, t, hp):
    if self.run.config.cohort_size == 6:
      raise jax.errors.JaxRuntimeError('RESOURCE_EXHAUSTED: Out of memory allocating 9 bytes.')
    return real_round(self, state, t, hp)

  monkeypatch.setattr(Rounds, '__call__', round_or_out_of_memory)
  entries = sweep.run_sweep(definition, str(tmp_path / 'out'), log=lambda _: None)
  assert [e['status'] for e in entries] == ['failed', 'done']
  assert entries[0]['error'].startswith('round 1 ran out of memory on 1 cpu device(s)')


def test_a_data_error_in_a_round_fails_that_run_alone(tmp_path):
  """A damaged record is met by the seeds whose cohorts draw it: the other runs on the same
  data are still tried."""
  from fathom_sim.data import DataError
  definition = sweep_def.SweepDef(tiny_config(num_rounds=2, num_devices=1), '<inline>', [{}],
                              [0, 1], {})
  tried = []

  def train(c, workdir):
    tried.append(c.seed)
    if c.seed == 0:
      raise DataError('record 7 of train.array_record-00000 cannot be read')
    return train_and_evaluate(c, workdir)

  entries = sweep.run_sweep(definition, str(tmp_path / 'out'), train=train, log=lambda _: None)
  assert tried == [0, 1] and [e['status'] for e in entries] == ['failed', 'done']


def test_a_diverged_run_fails_alone_and_the_sweep_goes_on(tmp_path):
  """A run that stops itself after max_rejected_rounds rejected rounds is a failed run, with
  its message, not the end of the sweep (it was a traceback out of the sweep)."""
  from fathom_sim.train import Diverged
  definition = sweep_def.SweepDef(tiny_config(num_rounds=2, num_devices=1), '<inline>', [{}],
                              [0, 1], {})

  def train(c, workdir):
    if c.seed == 0:
      raise Diverged([workdir], 'rounds 1..2 were all rejected')
    return train_and_evaluate(c, workdir)

  entries = sweep.run_sweep(definition, str(tmp_path / 'out'), train=train, log=lambda _: None)
  assert [e['status'] for e in entries] == ['failed', 'done']
  assert entries[0]['error'] == 'rounds 1..2 were all rejected'


def test_a_seed_diverging_in_a_group_run_one_by_one_fails_alone(tmp_path):
  """A vectorised group whose seeds' checkpoints stand at different rounds runs them one by
  one; one diverging there failed the whole batch with its message, finished and untried
  seeds alike."""
  from fathom_sim.train import Diverged
  definition = sweep_def.SweepDef(tiny_config(num_rounds=2, num_devices=1), '<inline>', [{}],
                              [0, 1, 2], {})
  out = str(tmp_path / 'out')
  runs = sweep_def.plan_runs(definition, out)
  calls = []

  def group(configs, workdirs):  # seed 0 finishes, seed 1 diverges, seed 2 is not reached
    calls.append([c.seed for c in configs])
    train_and_evaluate(configs[0], workdirs[0])
    raise Diverged([workdirs[1]], 'rounds 1..2 were all rejected')

  entries = sweep.run_sweep(definition, out, train_group=group, vmap_seeds=True,
                            train=lambda c, w: calls.append([c.seed]) or train_and_evaluate(c, w),
                            log=lambda _: None)
  assert calls == [[0, 1, 2], [2]]
  assert [e['status'] for e in entries] == ['done', 'failed', 'done']
  assert entries[1]['error'] == 'rounds 1..2 were all rejected'
  # The seed the group finished has its result in sweep.json, as one finished alone.
  with open(os.path.join(runs[0].workdir, 'summary.json')) as f:
    acc = json.load(f)['final']['test_accuracy']
  assert entries[0]['final_test_accuracy'] == acc and 'sweep_wall_s' in entries[0]
  assert runs[1].workdir.endswith(entries[1]['workdir'])


@pytest.mark.parametrize('args,out,rest', [
    (['femnist_real', '--config.data.data_dir=/d'], 'runs/claim_femnist_real',
     ['--config.data.data_dir=/d']),
    (['femnist_real', '/tmp/o', '--config.data.data_dir=/d'], '/tmp/o',
     ['--config.data.data_dir=/d']),
    (['quickstart'], 'runs/claim_quickstart', []),
    (['quickstart', '', '-v'], 'runs/claim_quickstart', ['-v']),
])
def test_claim_script_takes_out_only_where_given(tmp_path, args, out, rest):
  """OUT is optional: an override given in its place was taken for the output folder, and so
  reached no run."""
  calls = tmp_path / 'calls'
  fake = tmp_path / 'python'
  fake.write_text(f'#!/bin/sh\nprintf "%s\\n" "$@" >> {calls}\necho END >> {calls}\n')
  fake.chmod(0o755)
  subprocess.run(['bash', os.path.join(ROOT, 'experiments', 'claim.sh'), *args], check=True,
                 capture_output=True, env={**os.environ, 'PYTHON': str(fake)})
  sweep_call, report_call = [c.split('\n') for c in calls.read_text().split('END\n')[:2]]
  sweep_call, report_call = [a for a in sweep_call if a], [a for a in report_call if a]
  assert sweep_call == ['launch/sweep.py', f'--sweep=sweeps/claim_{args[0]}.py', f'--out={out}',
                        '--vmap_seeds', *rest]
  assert report_call[:2] == ['launch/report.py', out]


def test_a_curve_of_seeds_none_finished_says_so_in_its_label(tmp_path):
  """Two of three seeds with rows, none finished: the label said 'n=2: the finished of 3
  seeds' (and 'n=3' for three seeds with rows, as if finished)."""
  import matplotlib.pyplot as plt
  root = tmp_path / 'sweep'
  for seed, rounds in ((0, 4), (1, 3), (2, 0)):
    _write_run(root / 'eta=0.1' / f'seed={seed}', 'fedavg', {2: 0.3}, 50, rounds)
  [group] = results.group_runs(results.find_runs([str(root)]))
  fig, ax = plt.subplots()
  plots._draw(ax, [group], 'test_accuracy', 'round')
  assert ax.get_legend_handles_labels()[1] == ['eta=0.1 (n=2 of 3 seeds, none finished)']
  plt.close(fig)
  # A seed with rows but no evaluation yet (diverged before it) leaves the others' curve,
  # which vanished: no round was evaluated by every seed.
  _write_run(root / 'eta=0.1' / 'seed=3', 'fedavg', {}, 50, 1)
  [group] = results.group_runs(results.find_runs([str(root)]))
  fig, ax = plt.subplots()
  plots._draw(ax, [group], 'test_accuracy', 'round')
  assert ax.get_legend_handles_labels()[1] == ['eta=0.1 (n=2 of 4 seeds, none finished)']
  plt.close(fig)
  assert plots.curve(group, 'eta')[4] == 3  # seed 2 has no rows


def test_a_plot_of_runs_with_nothing_logged_says_so_without_a_legend_warning(tmp_path):
  """Runs stopped before their first row: matplotlib warned "No artists with labels found to
  put in legend" on the report's output, and the panels were blank without a word."""
  import warnings
  import matplotlib.pyplot as plt
  root = tmp_path / 'sweep'
  _write_run(root / 'eta=0.1' / 'seed=0', 'fathom', {}, 50, 0)
  _write_run(root / 'eta=0.2' / 'seed=0', 'fathom', {}, 50, 0)
  groups = results.group_runs(results.find_runs([str(root)]))
  with warnings.catch_warnings():
    warnings.simplefilter('error')
    plots.write_plots(groups, str(tmp_path / 'report'), [0.3])
  fig, ax = plt.subplots()
  plots._draw(ax, groups, 'test_accuracy', 'round')
  assert [t.get_text() for t in ax.texts] == ['no run has logged test_accuracy']
  plt.close(fig)
  # One setting with rows: its curve and legend, and no such text.
  _write_run(root / 'eta=0.3' / 'seed=0', 'fathom', {2: 0.4}, 50, 2)
  groups = results.group_runs(results.find_runs([str(root)]))
  fig, ax = plt.subplots()
  plots._draw(ax, groups, 'test_accuracy', 'round')
  assert not ax.texts and ax.get_legend_handles_labels()[1] == [
      'eta=0.3 (n=1 of 1 seeds, none finished)']
  plt.close(fig)


def test_a_report_rewritten_keeps_no_plot_of_the_last_and_labels_every_setting(tmp_path):
  """fathom_vs_fedavg.png was left from a last report whose targets some FedAvg setting
  reached, beside a report.md that had no such comparison; matplotlib left out of the legend
  a setting whose name starts with '_'; a reached row without local_steps was a KeyError."""
  import matplotlib.pyplot as plt
  from fathom_sim import plots
  root = tmp_path / 'sweep'
  _write_run(root / '_base' / 'seed=0', 'fathom', {2: 0.5}, 100, 2)
  _write_run(root / 'eta=0.1' / 'seed=0', 'fedavg', {2: 0.4}, 50, 2)
  groups = results.group_runs(results.find_runs([str(root)]))
  out = str(tmp_path / 'report')
  assert any(p.endswith('fathom_vs_fedavg.png') for p in plots.write_plots(groups, out, [0.3]))
  plots.write_plots(groups, out, [])
  assert sorted(os.listdir(out)) == ['accuracy.png', 'hparams.png']
  fig, ax = plt.subplots()
  plots._draw(ax, groups, 'test_accuracy', 'round')
  assert [label.lstrip('\u200b') for label in ax.get_legend_handles_labels()[1]] == [
      '_base (n=1 of 1 seeds, none finished)', 'eta=0.1 (n=1 of 1 seeds, none finished)']
  plt.close(fig)
  lines = (root / '_base' / 'seed=0' / 'metrics.jsonl').read_text().splitlines()
  last = json.loads(lines[-1])
  del last['local_steps']
  (root / '_base' / 'seed=0' / 'metrics.jsonl').write_text('\n'.join(lines[:-1] + [
      json.dumps(last)]) + '\n')
  [fathom] = [g for g in results.group_runs(results.find_runs([str(root)])) if g.setting == '_base']
  t = report.to_target(fathom, 0.3)
  assert (t['reached'], t['rounds'], t['local_steps']) == (1, (2.0, None), (None, None))


def test_a_sweeps_seeds_not_started_or_failed_are_said_in_the_tables(tmp_path):
  """The report counted seeds from the folders alone: a seed not yet started (or whose folder
  is gone) vanished, a setting with none started had no line, and seeds the sweep marked
  failed read as still running."""
  root = tmp_path / 'sweep'
  for seed in (0, 1):
    _write_run(root / 'eta=0.1' / f'seed={seed}', 'fedavg', {2: 0.4}, 50, 4)
    (root / 'eta=0.1' / f'seed={seed}' / 'config.json').write_text(
        json.dumps({'algorithm': 'fedavg', 'num_rounds': 4}))
    (root / 'eta=0.1' / f'seed={seed}' / 'summary.json').write_text(json.dumps(
        {'rounds': 4, 'final': {'test_accuracy': 0.4}}))
  _write_run(root / 'fathom' / 'seed=0', 'fathom', {}, 100, 1)  # diverged in round 1
  _write_run(root / 'fathom' / 'seed=2', 'fathom', {}, 100, 1)  # running
  runs = [{'name': f'{s}/seed={i}', 'setting': s, 'workdir': f'{s}/seed={i}', 'status': st}
          for s, sts in (('eta=0.1', ['done', 'done', 'pending', 'done']),  # seed 3: gone
                         # seed 1: failed before its first row (no run folder)
                         ('fathom', ['failed', 'failed', 'running', 'pending']),
                         ('eta=1.0', ['pending', 'failed', 'done']))
          for i, st in enumerate(sts)]
  (root / 'sweep.json').write_text(json.dumps({'sweep': 's.py', 'runs': runs}))
  listed = results.find_listed([str(root)])
  groups = results.group_runs(results.find_runs([str(root)]), listed)
  table = report.markdown(groups, [0.3], not_started=results.not_started(groups, listed))
  row = {line.split(' | ')[0]: line for line in table.splitlines() if line.startswith('| `')}
  # A seed done whose folder was since moved or deleted was said 'not started'.
  assert ('| 2 of 4 (1 not started, 1 done but its folder gone) | 0.400 ± 0.000 (2 finished) |'
          in row['| `eta=0.1`']), table
  assert '| 2.0 ± 0.0 (2/4) |' in row['| `eta=0.1`']  # the seed not started has not reached it
  assert '| 2 of 4 (1 unfinished, 2 failed, 1 not started) |' in row['| `fathom`'], table
  assert ('No run folder (listed in sweep.json): `eta=1.0` (3 seeds, 1 failed, 1 done but its '
          'folder gone).') in table
  # The same counts from a folder holding the sweep, and from a setting's folder given alone:
  # only the folder given's own sweep.json was read, and the failed and gone seeds vanished.
  assert results.find_listed([str(tmp_path)]) == {f'sweep/{k}': v for k, v in listed.items()}
  assert results.find_listed([str(root / 'eta=0.1')]) == {'eta=0.1': listed['eta=0.1']}
  assert results.find_listed([str(root / 'fathom' / 'seed=0')]) == {
      'fathom': {'seeds': 1, 'failed': 1, 'failed_unstarted': 0, 'gone': 0}}
  assert results.find_listed([str(root / 'eta=0.1'), str(root / 'fathom')]) == {
      str(root / s): listed[s] for s in ('eta=0.1', 'fathom')}
  # A seed moved to another disk and linked back is still the setting's.
  shutil.move(root / 'eta=0.1' / 'seed=1', tmp_path / 'disk')
  os.symlink(tmp_path / 'disk', root / 'eta=0.1' / 'seed=1')
  assert results.find_listed([str(root / 'eta=0.1')]) == {'eta=0.1': listed['eta=0.1']}
  # A sweep given with a folder inside it is read once (its settings were listed twice).
  (root / 'eta=1.0').mkdir()
  assert results.find_listed([str(root), str(root / 'eta=1.0')]) == {
      f'sweep/{k}': v for k, v in listed.items()}
  (root / 'eta=1.0').rmdir()
  os.unlink(root / 'eta=0.1' / 'seed=1')
  shutil.move(tmp_path / 'disk', root / 'eta=0.1' / 'seed=1')
  # A torn sweep.json counts nothing, and is named (it was passed over without a word).
  (root / 'sweep.json').write_text('{"sweep": "s.py", "ru')
  assert results.find_listed([str(root)]) == {}
  table = report.markdown(results.group_runs(results.find_runs([str(root)])), [0.3],
                          unread_indexes=results.unreadable_indexes([str(root)]))
  [line] = [x for x in table.splitlines() if 'not readable as a JSON object' in x]
  assert line.endswith(f'`{root / "sweep.json"}`.') and 'Not started' not in table
  # By the rule a sweep run again reads it by (workdir.sweep_index_problem): an entry that is
  # not a named object was passed over without a word, and no 'runs' was said unreadable.
  for text in ('{"sweep": "s.py", "runs": [3]}', '{"sweep": "s.py"}'):
    (root / 'sweep.json').write_text(text)
    assert results.find_listed([str(root)]) == {}
    assert results.unreadable_indexes([str(root)]) == [str(root / 'sweep.json')]
  # Without a sweep.json, the folders are all there is to count.
  (root / 'sweep.json').unlink()
  assert results.unreadable_indexes([str(root)]) == []
  assert results.find_listed([str(root)]) == {}
  table = report.markdown(results.group_runs(results.find_runs([str(root)])), [0.3])
  assert '| `eta=0.1` | fedavg | 2 | 0.400 ± 0.000 |' in table and 'Not started' not in table


def test_fedavg_grids_are_compared_with_the_fathom_settings_run_alike(tmp_path):
  """A sweep over cohort sizes made every FedAvg setting one grid search: the best of them
  (at another cohort size) stood against FATHOM at each size. Settings differing in eta, E
  and B alone are one grid; rounds ties go to fewer examples; settings in numeric order."""
  root = tmp_path / 'sweep'

  def run(name, algorithm, acc, examples, cohort, eta=0.1, rounds=4):
    _write_run(root / name / 'seed=0', algorithm, acc, examples, rounds)
    (root / name / 'seed=0' / 'config.json').write_text(json.dumps(
        {'algorithm': algorithm, 'cohort_size': cohort, 'eta': eta, 'num_rounds': rounds}))

  run('cohort_size=100,fedavg,eta=0.1', 'fedavg', {2: 0.5}, 500, 100)
  run('cohort_size=100,fedavg,eta=0.3', 'fedavg', {2: 0.5}, 400, 100, eta=0.3)  # fewer examples
  run('cohort_size=20,fedavg,eta=0.1', 'fedavg', {4: 0.5}, 50, 20)
  run('cohort_size=20,fathom', 'fathom', {2: 0.5}, 60, 20)
  run('cohort_size=100,fathom', 'fathom', {4: 0.5}, 700, 100)
  run('cohort_size=100,fathom,server_lr=0.5', 'fathom', {2: 0.5}, 700, 100)
  (root / 'cohort_size=100,fathom,server_lr=0.5' / 'seed=0' / 'config.json').write_text(
      json.dumps({'algorithm': 'fathom', 'cohort_size': 100, 'server_lr': 0.5, 'num_rounds': 4}))
  groups = results.group_runs(results.find_runs([str(root)]))
  assert [g.setting for g in groups] == [
      'cohort_size=20,fathom', 'cohort_size=20,fedavg,eta=0.1', 'cohort_size=100,fathom',
      'cohort_size=100,fathom,server_lr=0.5', 'cohort_size=100,fedavg,eta=0.1',
      'cohort_size=100,fedavg,eta=0.3']
  assert sorted(['eta=0.1', 'eta=1', 'eta=1e-05', 'eta=0.0001', 'b=100', 'b=20'],
                key=results.natural_key) == ['b=20', 'b=100', 'eta=1e-05', 'eta=0.0001',
                                            'eta=0.1', 'eta=1']  # (:g's exponents too)
  found, alone = report.grids(groups)
  assert [(label, [g.setting for g in f], [g.setting for g in a]) for label, f, a in found] == [
      ('cohort_size=20', ['cohort_size=20,fedavg,eta=0.1'], ['cohort_size=20,fathom']),
      ('cohort_size=100', ['cohort_size=100,fedavg,eta=0.1', 'cohort_size=100,fedavg,eta=0.3'],
       ['cohort_size=100,fathom'])]
  assert [g.setting for g in alone] == ['cohort_size=100,fathom,server_lr=0.5']
  assert report.best_fedavg(found[1][1], 0.3).setting == 'cohort_size=100,fedavg,eta=0.3'
  table = report.markdown(groups, [0.3])
  assert 'FedAvg grid search (cohort_size=20): 1 runs' in table
  assert 'FedAvg grid search (cohort_size=100): 2 runs, 3,600 examples' in table
  assert ('| 0.3 | `cohort_size=100,fedavg,eta=0.3` | 2.0 | 800 | 20 | 4.0 | 2,800 | 40 |'
          in table), table
  assert ('compared with none: `cohort_size=100,fathom,server_lr=0.5` (server_lr 0.5, the '
          "grid's 1.0).") in table
  assert 'different numbers of rounds' not in table
  out = str(tmp_path / 'report')
  assert any(p.endswith('fathom_vs_fedavg.png') for p in plots.write_plots(groups, out, [0.3]))
  # A grid with no FATHOM setting beside it reaching a harder target does not take the plot's
  # target: each grid's is the hardest its own best reached (0.9 gave no plot at all).
  run('cohort_size=50,fedavg,eta=0.1', 'fedavg', {2: 0.95}, 50, 50)
  groups = results.group_runs(results.find_runs([str(root)]))
  assert any(p.endswith('fathom_vs_fedavg.png')
             for p in plots.write_plots(groups, out, [0.3, 0.9]))
  # A setting run to fewer rounds is said: its target not reached may be one not reached yet.
  run('cohort_size=20,fedavg,eta=0.3', 'fedavg', {}, 50, 20, eta=0.3, rounds=2)
  table = report.markdown(results.group_runs(results.find_runs([str(root)])), [0.3])
  assert ('Warning: the settings run to different numbers of rounds (2: '
          '`cohort_size=20,fedavg,eta=0.3`; 4: `cohort_size=20,fathom`, ') in table, table


def test_a_damaged_sweep_json_or_an_out_that_cannot_be_made_is_refused_before_any_run(tmp_path):
  from fathom_sim.workdir import WorkdirError
  from tests.common import uncreatable_path
  sweep_file = tmp_path / 'tiny_sweep.py'
  sweep_file.write_text(SWEEP_FILE)
  definition = sweep_def.load_sweep(str(sweep_file))
  calls = []
  out = tmp_path / 'sweep'
  out.mkdir()
  # Cut short; then shapes a hand edit leaves, which ended in a traceback ('runs' not a list,
  # a name not a string) or were taken for no earlier entries (their seconds dropped).
  for text, why in (('{"sweep": ', 'not JSON'), ('[]', 'not a JSON object'),
                    ('{"runs": 5}', '"runs" is not a list'),
                    ('{"runs": {"a": 1}}', '"runs" is not a list'),
                    ('{"runs": [{"name": "x"}, {"name": ["x"]}]}',
                     'runs\\[1\\] is not an entry with a "name"'),
                    ('{"runs": [3]}', 'runs\\[0\\] is not an entry with a "name"'),
                    ('{"sweep": "tiny_sweep.py"}', '"runs" is not a list')):
    (out / 'sweep.json').write_text(text)
    with pytest.raises(WorkdirError, match=(
        rf"^--out '.*sweep': its sweep.json cannot be read as a sweep's index \({why}\); "
        r"repair it, or move it aside to start the index afresh \(finished runs are found in "
        r"their folders; the seconds it recorded are lost\), or give another folder$")):
      sweep.run_sweep(definition, str(out), train=lambda c, w: calls.append(w), log=print)
    assert calls == [] and os.listdir(out) == ['sweep.json']
    assert (out / 'sweep.json').read_text() == text
  target = uncreatable_path(tmp_path, 'out')
  with pytest.raises(WorkdirError, match=r"the sweep's folder cannot be made there \(.+\); "
                                         'give a writable place$'):
    sweep.run_sweep(definition, target, train=lambda c, w: calls.append(w), log=print)
  assert calls == [] and not os.path.exists(target)


@pytest.mark.parametrize('stopped_at,status', [(4, 'failed'), (2, 'pending'), (None, 'done')])
def test_a_finished_run_taken_further_is_not_skipped_as_done(tmp_path, stopped_at, status):
  """A run finished at 2 rounds, then run with num_rounds=5 and stopped (at its checkpoint of
  round 4, or before its next one), keeps its summary.json of 2 rounds: the sweep skipped it
  as done, its sweep.json entry saying 2 rounds of a run at round 4, where launch/main.py
  refuses it (4) or puts its files back to round 2 by running it (2)."""
  from fathom_sim import metrics
  from fathom_sim import workdir as workdir_lib
  from tests.common import tiny_config
  definition = sweep_def.SweepDef(tiny_config(num_rounds=2), '<inline>', [{}], [0], {})
  run, = sweep_def.plan_runs(definition, str(tmp_path / 'out'))
  os.makedirs(os.path.join(run.workdir, workdir_lib.CHECKPOINTS, '2'))
  metrics.write_json(os.path.join(run.workdir, metrics.SUMMARY_FILE), {'rounds': 2})
  further = run.config.copy_and_resolve_references()
  further.num_rounds = 5 if stopped_at else 2
  workdir_lib.save_config(run.workdir, further)
  if stopped_at == 4:
    os.makedirs(os.path.join(run.workdir, workdir_lib.CHECKPOINTS, '4'))
  got, error = sweep.run_status(run)
  assert got == status, (got, error)
  if stopped_at == 2:  # (a run with no results and a torn config.json: training's to start)
    fresh = sweep_def.plan_runs(sweep_def.SweepDef(tiny_config(num_rounds=2), '<inline>', [{}], [1],
                                           {}), str(tmp_path / 'out'))[0]
    os.makedirs(fresh.workdir)
    (open(os.path.join(fresh.workdir, workdir_lib.CONFIG_FILE), 'w')).write('[')
    assert sweep.run_status(fresh) == ('pending', None)
  if status == 'failed':
    assert 'holds a run already at round 4; config.num_rounds must be at least that, got 2' in (
        error)
  trained = []
  entry, = sweep.run_sweep(definition, str(tmp_path / 'out'), log=lambda _: None,
                           train=lambda c, w: trained.append(w) or {'rounds': 2, 'final': {}})
  assert entry['status'] == status.replace('pending', 'done')
  assert trained == ([run.workdir] if status == 'pending' else [])  # (not "finished already")


def test_a_sigterm_outside_a_runs_rounds_stops_the_sweep_in_one_line_leaving_none_running(
    tmp_path):
  """A SIGTERM while the sweep started a run (its data loading, before its rounds) ended the
  sweep at once, with no line and status -15, and sweep.json said that run was 'running'."""
  out = str(tmp_path / 'out')
  sweep_file = tmp_path / 'two.py'
  sweep_file.write_text(SWEEP_FILE.replace("'seeds': [0, 1]", "'seeds': [0]"))
  code = ('import os, runpy, signal, sys, time\n'
          'from fathom_sim import train\n'
          'calls = []\n'
          'def second_stopped(config, workdir):\n'
          '  calls.append(workdir)\n'
          '  if len(calls) == 2:\n'
          '    os.kill(os.getpid(), signal.SIGTERM)\n'
          '    time.sleep(60)\n'
          "  return {'rounds': 3, 'final': {'test_accuracy': 0.5}}\n"
          'train.train_and_evaluate = second_stopped\n'
          f"sys.argv = ['sweep.py', '--sweep={sweep_file}', '--out={out}', "
          "'--compilation_cache=']\n"
          "runpy.run_path('launch/sweep.py', run_name='__main__')\n")
  p = run_python(code)
  assert p.returncode == 143, p.stderr[-2000:]
  assert 'Traceback' not in p.stderr, p.stderr[-2000:]
  assert p.stderr.splitlines()[-1] == (
      'error: stopped by SIGTERM; the same command resumes the sweep: finished runs are '
      'skipped, started ones resume from their last checkpoint')
  with open(os.path.join(out, 'sweep.json')) as f:
    assert [r['status'] for r in json.load(f)['runs']] == ['done', 'interrupted']


def test_a_stop_just_after_a_run_is_marked_running_marks_it_interrupted(tmp_path, monkeypatch):
  """The signal could land between sweep.json's save of 'running' and the handler that marks
  a stopped run: 'running' stayed."""
  from fathom_sim import metrics
  from tests.common import tiny_config
  definition = sweep_def.SweepDef(tiny_config(num_rounds=2), '<inline>', [{}], [0], {})
  write_json = metrics.write_json

  def stopped_after_running(path, value):
    write_json(path, value)
    if any(r['status'] == 'running' for r in value['runs']):
      raise KeyboardInterrupt

  monkeypatch.setattr(sweep.metrics, 'write_json', stopped_after_running)
  with pytest.raises(KeyboardInterrupt):
    sweep.run_sweep(definition, str(tmp_path / 'out'), log=lambda _: None,
                    train=lambda c, w: pytest.fail('trained'))
  with open(tmp_path / 'out' / 'sweep.json') as f:
    assert [r['status'] for r in json.load(f)['runs']] == ['interrupted']
  monkeypatch.undo()
  # ... and between a run's end and the save that says it is done: 'running' stayed.
  from fathom_sim import workdir as workdir_lib

  def finished(config, workdir):
    os.makedirs(workdir, exist_ok=True)
    workdir_lib.save_config(workdir, config)
    metrics.write_json(os.path.join(workdir, metrics.SUMMARY_FILE),
                       {'rounds': 2, 'final': {'test_accuracy': 0.5}})
    return {'rounds': 2, 'final': {'test_accuracy': 0.5}}

  stops = [KeyboardInterrupt]

  def stopped_on_done(line):  # (one signal)
    if ': done' in line and stops:
      raise stops.pop()

  with pytest.raises(KeyboardInterrupt):
    sweep.run_sweep(definition, str(tmp_path / 'out2'), log=stopped_on_done, train=finished)
  with open(tmp_path / 'out2' / 'sweep.json') as f:
    [entry] = json.load(f)['runs']
  assert (entry['status'], entry['final_test_accuracy']) == ('done', 0.5)


def test_sweep_wall_s_sums_the_commands_that_ran_a_run_and_splits_a_group(tmp_path,
                                                                          monkeypatch):
  """A run stopped and resumed, or extended, had the last command's seconds alone; the seeds
  of a vectorised group each had the whole group's, so that their sum was n times the time."""
  from fathom_sim import metrics
  from fathom_sim import workdir as workdir_lib
  from tests.common import tiny_config
  clock = [1000.0]
  monkeypatch.setattr(sweep, 'time', type('Clock', (), {'time': staticmethod(lambda: clock[0])}))

  def trained(config, workdir, seconds, stop=False):
    clock[0] += seconds
    os.makedirs(workdir, exist_ok=True)
    workdir_lib.save_config(workdir, config)
    if stop:
      raise KeyboardInterrupt
    metrics.write_json(os.path.join(workdir, metrics.SUMMARY_FILE),
                       {'rounds': config.num_rounds, 'final': {'test_accuracy': 0.5}})
    return {'final': {'test_accuracy': 0.5}}

  definition = sweep_def.SweepDef(tiny_config(num_rounds=2), '<inline>', [{}], [0], {})
  out = str(tmp_path / 'out')
  with pytest.raises(KeyboardInterrupt):
    sweep.run_sweep(definition, out, train=lambda c, w: trained(c, w, 30.0, stop=True),
                    log=lambda _: None)
  [entry] = sweep.run_sweep(definition, out, train=lambda c, w: trained(c, w, 12.0),
                            log=lambda _: None)
  assert entry['sweep_wall_s'] == 42.0
  definition.config.num_rounds = 3  # extended: its seconds go on from there
  [entry] = sweep.run_sweep(definition, out, train=lambda c, w: trained(c, w, 8.0),
                            log=lambda _: None)
  assert (entry['status'], entry['sweep_wall_s']) == ('done', 50.0)
  # A run started afresh (its folder deleted) owes nothing to the seconds its entry recorded.
  shutil.rmtree(os.path.join(out, entry['workdir']))
  [entry] = sweep.run_sweep(definition, out, train=lambda c, w: trained(c, w, 5.0),
                            log=lambda _: None)
  assert entry['sweep_wall_s'] == 5.0

  group = sweep_def.SweepDef(tiny_config(num_rounds=2), '<inline>', [{}], [0, 1, 2], {})
  entries = sweep.run_sweep(group, str(tmp_path / 'group'), vmap_seeds=True, log=lambda _: None,
                            train_group=lambda cs, ws: [trained(c, w, 10.0 * (c.seed == 0))
                                                        for c, w in zip(cs, ws)])
  assert [e['sweep_wall_s'] for e in entries] == [pytest.approx(10 / 3)] * 3


def test_a_run_finished_as_the_sweep_is_stopped_keeps_its_result_in_sweep_json(tmp_path):
  """SIGTERM in a run's last round: it finishes, and the sweep stops. Its entry said 'done'
  with neither final_test_accuracy nor sweep_wall_s, and a rerun never gave the seconds back."""
  from fathom_sim import metrics
  from fathom_sim import workdir as workdir_lib
  from tests.common import tiny_config
  definition = sweep_def.SweepDef(tiny_config(num_rounds=2), '<inline>', [{}], [0, 1], {})
  out = str(tmp_path / 'out')

  def finish_then_stop(config, workdir):
    os.makedirs(workdir, exist_ok=True)
    workdir_lib.save_config(workdir, config)
    metrics.write_json(os.path.join(workdir, metrics.SUMMARY_FILE),
                       {'rounds': 2, 'final': {'test_accuracy': 0.25}})
    raise KeyboardInterrupt

  with pytest.raises(KeyboardInterrupt):
    sweep.run_sweep(definition, out, train=finish_then_stop, log=lambda _: None)
  with open(os.path.join(out, 'sweep.json')) as f:
    first, second = json.load(f)['runs']
  assert first['status'] == 'done' and first['final_test_accuracy'] == 0.25
  assert first['sweep_wall_s'] >= 0 and second['status'] == 'pending'
  # run again: the finished run is skipped with its seconds kept, the other one runs
  trained = []
  entries = sweep.run_sweep(definition, out, log=lambda _: None,
                            train=lambda c, w: trained.append(w) or {'final': {}})
  assert entries[0]['sweep_wall_s'] == first['sweep_wall_s'] and len(trained) == 1


def test_a_finished_run_s_damaged_summary_is_a_missing_accuracy_not_a_traceback(tmp_path):
  """A summary.json of a finished run edited by hand ("final" a list) ended every later sweep
  command in a traceback; a string accuracy went into sweep.json as the run's result."""
  from fathom_sim import metrics
  from fathom_sim import workdir as workdir_lib
  from tests.common import tiny_config
  definition = sweep_def.SweepDef(tiny_config(num_rounds=2), '<inline>', [{}], [0], {})

  def finished(config, workdir):
    os.makedirs(workdir, exist_ok=True)
    workdir_lib.save_config(workdir, config)
    metrics.write_json(os.path.join(workdir, metrics.SUMMARY_FILE), summary)
    return summary

  for summary, want in (({'rounds': 2, 'final': [0.5]}, None),
                        ({'rounds': 2, 'final': {'test_accuracy': 'hi'}}, None),
                        ({'rounds': 2, 'final': {'test_accuracy': 1}}, 1.0)):
    out = tmp_path / f'out{len(os.listdir(tmp_path))}'
    sweep.run_sweep(definition, str(out), log=lambda _: None, train=finished)
    # Run again: the run is found finished, and its result read back from its summary.
    entries = sweep.run_sweep(definition, str(out), log=lambda _: None,
                              train=lambda c, w: pytest.fail('trained'))
    with open(out / 'sweep.json') as f:
      [entry] = json.load(f)['runs']  # (NaN is written as JSON's null)
    assert entry['status'] == 'done' and entries[0]['status'] == 'done'
    assert entry['final_test_accuracy'] == want, summary


def test_a_run_stopped_by_an_error_not_a_signal_is_failed_with_it_and_the_sweep_stops(tmp_path):
  """A full disk (OutputError) or an error of the simulator's own stopped the sweep with the
  run marked 'interrupted', as if a signal had stopped it, and no word of why."""
  from fathom_sim.errors import OutputError
  from tests.common import tiny_config
  definition = sweep_def.SweepDef(tiny_config(num_rounds=2), '<inline>', [{}, {'eta': 0.07}], [0],
                              {})
  for error, said in ((OutputError('/x/metrics.jsonl cannot be written (No space left on '
                                   'device)\nmore'),
                       '/x/metrics.jsonl cannot be written (No space left on device)'),
                      (ZeroDivisionError('division by zero'),
                       'ZeroDivisionError: division by zero'), (ZeroDivisionError(),
                                                                'ZeroDivisionError')):
    out = tmp_path / type(error).__name__

    def broken(config, workdir, error=error):
      raise error

    with pytest.raises(type(error)):
      sweep.run_sweep(definition, str(out), log=lambda _: None, train=broken)
    with open(out / 'sweep.json') as f:
      runs = json.load(f)['runs']
    assert [(r['status'], r.get('error')) for r in runs] == [('failed', said),
                                                              ('pending', None)]


def test_a_signal_while_a_failed_run_is_said_leaves_no_run_running(tmp_path):
  """The handlers of a diverged run and of bad input were not under the one that marks the
  runs a signal stopped: a signal landing in them left 'running' in sweep.json, and the
  seconds charged unsaved."""
  from fathom_sim.data import DataError
  from fathom_sim.errors import Diverged
  from tests.common import tiny_config
  definition = sweep_def.SweepDef(tiny_config(num_rounds=2), '<inline>', [{}], [0, 1], {})
  for error in (lambda workdirs: Diverged(workdirs, 'diverged'),
                lambda workdirs: DataError('a bad record')):
    out = tmp_path / f'out{len(os.listdir(tmp_path))}'

    def failing(configs, workdirs, error=error):
      raise error(workdirs)

    def stopped_on_failed(line):
      if 'failed' in line:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
      sweep.run_sweep(definition, str(out), log=stopped_on_failed, vmap_seeds=True,
                      train=lambda c, w: pytest.fail('trained alone'), train_group=failing)
    with open(out / 'sweep.json') as f:
      runs = json.load(f)['runs']
    statuses = [r['status'] for r in runs]
    assert 'running' not in statuses and len(runs) == 2, statuses
    assert all(isinstance(r.get('sweep_wall_s'), float) for r in runs), runs

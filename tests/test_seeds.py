"""Vectorised seeds: S seeds in one program give each seed its solo run's result."""

import functools
import json
import os
import shutil

import numpy as np
import pytest

from fathom_sim import sweep, sweep_def
from fathom_sim.config import ConfigError
from fathom_sim.data import DataError
from fathom_sim.train import train_and_evaluate, train_seeds
from tests.common import tiny_config

SEEDS = (0, 1, 2)
COMPARED = ('eta', 'epochs', 'batch_size', 'h_glob', 'h_local', 'train_loss', 'test_accuracy',
            'test_loss')
EXACT = ('batch_size_int', 'examples', 'local_steps', 'accepted', 'dropped_clients')


def _config(seed, **overrides):
  # A fast-moving B (eta_h2) so the seeds' B_int, and with it their B_pad, part ways.
  fields = dict(algorithm='fathom', num_rounds=4, eval_every=2, num_devices=2, eta_h2=30.0,
                batch_size=2.9,
                checkpoint_every=1)
  fields.update(overrides)
  c = tiny_config(**fields)
  c.seed = seed
  return c


def _rows(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [json.loads(line) for line in f]


def _summary(workdir):
  with open(os.path.join(workdir, 'summary.json')) as f:
    return json.load(f)


def _assert_same_run(got_dir, want_dir):
  got, want = _rows(got_dir), _rows(want_dir)
  assert [r['round'] for r in got] == [r['round'] for r in want]
  for g, w in zip(got, want):
    for k in EXACT:
      assert g[k] == w[k], (k, g['round'])
    for k in COMPARED:  # every row's, but the evaluation's (on evaluated rows only)
      assert k in g and k in w or k.startswith('test_') and k not in g and k not in w, (
          k, g['round'])
      if k in w:
        np.testing.assert_allclose(g[k], w[k], rtol=2e-4, atol=1e-5, err_msg=k)
  gs, ws = _summary(got_dir), _summary(want_dir)
  np.testing.assert_allclose(gs['final']['params_l2'], ws['final']['params_l2'], rtol=1e-5)
  np.testing.assert_allclose(gs['final']['test_loss'], ws['final']['test_loss'], rtol=1e-4)


@pytest.mark.parametrize('data_on_device,local_loop,chunk,lanes', [
    ('yes', 'device', 0, 0), ('no', 'host', 0, 2), ('yes', 'device', 3, 0)])
def test_each_vectorised_seed_equals_its_solo_run(tmp_path, data_on_device, local_loop, chunk,
                                                  lanes):
  # chunk: the seeds' device loops, vmapped, check their bounds every 3 steps. lanes: a
  # device's 2 lanes share each seed's example buffer.
  configs = [_config(s, data_on_device=data_on_device, local_loop=local_loop, loop_chunk=chunk,
                     lanes_per_device=lanes) for s in SEEDS]
  vec = [str(tmp_path / f'vec{s}') for s in SEEDS]
  summaries = train_seeds(configs, vec)
  assert all(s['vectorized_seeds'] == 3 for s in summaries)
  # each row says its clock is the group's (report.py's s/round), a solo run's says nothing
  assert all(r['vectorized_seeds'] == 3 for w in vec for r in _rows(w))
  # Some round planned ahead kept a seed's plan while another seed planned again: the solo
  # runs below must equal that path too.
  assert summaries[0]['replanned_seeds'] < 3 * summaries[0]['replanned'], summaries[0]
  for s, c in zip(SEEDS, configs):
    solo = str(tmp_path / f'solo{s}')
    train_and_evaluate(c, solo)
    _assert_same_run(str(tmp_path / f'vec{s}'), solo)
    assert not any('vectorized_seeds' in r for r in _rows(solo))
  # The stacking pads seeds to a common B_pad: make sure this test meets that case.
  b_int = {s: [r['batch_size_int'] for r in _rows(str(tmp_path / f'vec{s}'))] for s in SEEDS}
  assert len({tuple(v) for v in b_int.values()}) > 1, b_int
  # One program computes the same rows for every seed (the longest lane and the largest B_pad
  # of any), so a round's real examples over its padding efficiency agree across seeds; a solo
  # run computes no more than that, and less in some round here. (Each seed reported its solo
  # figure before.)
  def computed(workdir):
    rows = [r for r in _rows(workdir) if 'padding_efficiency' in r]
    real = np.diff([0] + [r['examples'] for r in rows])
    return real / np.array([r['padding_efficiency'] for r in rows])
  shared = [computed(str(tmp_path / f'vec{s}')) for s in SEEDS]
  alone = [computed(str(tmp_path / f'solo{s}')) for s in SEEDS]
  for s in SEEDS:
    np.testing.assert_allclose(shared[s], shared[0], rtol=1e-9)
    assert (np.round(alone[s]) <= np.round(shared[s])).all()
  assert any((np.round(a) < np.round(v)).any() for a, v in zip(alone, shared))
  for s in SEEDS:  # the summary's total counts the same rows
    summary = _summary(str(tmp_path / f'vec{s}'))
    np.testing.assert_allclose(summary['padding_efficiency'],
                               summary['total_examples'] / shared[s].sum(), rtol=1e-9)


def test_vectorised_seeds_resume_together_or_one_by_one(tmp_path, monkeypatch):
  from fathom_sim import run as run_lib
  seeds = (0, 1, 2)
  for s in seeds:
    train_and_evaluate(_config(s), str(tmp_path / f'solo{s}'))
  # Stopped after round 2 and continued to 4, as one vectorised group.
  together = [str(tmp_path / f'together{s}') for s in seeds]
  train_seeds([_config(s, num_rounds=2) for s in seeds], together)
  summaries = train_seeds([_config(s) for s in seeds], together)
  assert [s['resumed_from'] for s in summaries] == [2, 2, 2]
  # Seed 0 already at round 2, seeds 1 and 2 not started: seed 0 cannot share their program
  # and runs alone; they run together (they ran one by one too).
  apart = [str(tmp_path / f'apart{s}') for s in seeds]
  train_and_evaluate(_config(0, num_rounds=2), apart[0])
  loads, load = [], run_lib.load_task
  monkeypatch.setattr(run_lib, 'load_task', lambda data: loads.append(1) or load(data))
  summaries = train_seeds([_config(s) for s in seeds], apart)
  monkeypatch.setattr(run_lib, 'load_task', load)
  assert len(loads) == 1  # the data once, for both groups
  assert [s['resumed_from'] for s in summaries] == [2, 0, 0]
  assert [s['vectorized_seeds'] for s in summaries] == [0, 2, 2]
  for s in seeds:
    _assert_same_run(together[s], str(tmp_path / f'solo{s}'))
    _assert_same_run(apart[s], str(tmp_path / f'solo{s}'))
  # Both at round 4, seed 1 killed before its summary.json was written: seed 0's summary was
  # written again too, its compiles, wall_s and resumed_from those of a command that ran none.
  os.remove(os.path.join(together[1], 'summary.json'))
  with open(os.path.join(together[0], 'summary.json')) as f:
    before = f.read()
  summaries = train_seeds([_config(s) for s in seeds], together)
  with open(os.path.join(together[0], 'summary.json')) as f:
    assert f.read() == before
  assert summaries[0] == json.loads(before) and summaries[1] == _summary(together[1])
  _assert_same_run(together[1], str(tmp_path / 'solo1'))


def test_vectorised_seeds_whose_checkpoints_stand_apart_resume_together_bit_for_bit(tmp_path):
  """A kill between the seeds' saves of one round left seed 0 at round 4 and seeds 1 and 2 at
  round 2: run apart, each group's program padded to its own seeds, and the resumed run's
  parameters were not the uninterrupted run's. Seed 0 now goes back to round 2 with the
  others, its checkpoint of round 4 dropped, and all run on together."""
  seeds = (0, 1, 2)
  config = functools.partial(_config, num_rounds=6, checkpoint_every=2)
  straight = [str(tmp_path / f'straight{s}') for s in seeds]
  train_seeds([config(s) for s in seeds], straight)
  cut = [str(tmp_path / f'cut{s}') for s in seeds]
  train_seeds([config(s, num_rounds=4) for s in seeds], cut)
  for s in seeds:  # as the kill left them: no summary, seeds 1 and 2 without round 4
    os.remove(os.path.join(cut[s], 'summary.json'))
    if s:
      shutil.rmtree(os.path.join(cut[s], 'checkpoints', '4'))
  summaries = train_seeds([config(s) for s in seeds], cut)
  assert [s['resumed_from'] for s in summaries] == [2, 2, 2]
  assert [s['vectorized_seeds'] for s in summaries] == [3, 3, 3]
  for s in seeds:
    assert summaries[s]['final'] == _summary(straight[s])['final']
    timing = ('wall_s',)
    assert [{k: v for k, v in r.items() if k not in timing} for r in _rows(cut[s])] == [
        {k: v for k, v in r.items() if k not in timing} for r in _rows(straight[s])]
  assert sorted(os.listdir(os.path.join(cut[0], 'checkpoints'))) == ['2', '4', '6']
  # Where seed 0 no longer keeps round 2, nothing is dropped: the seeds run apart, as before.
  apart = [str(tmp_path / f'apart{s}') for s in seeds]
  train_seeds([config(s, num_rounds=4) for s in seeds], apart)
  for s in seeds:
    os.remove(os.path.join(apart[s], 'summary.json'))
    shutil.rmtree(os.path.join(apart[s], 'checkpoints', '2' if s == 0 else '4'))
  summaries = train_seeds([config(s) for s in seeds], apart)
  assert [s['resumed_from'] for s in summaries] == [4, 2, 2]
  assert sorted(os.listdir(os.path.join(apart[0], 'checkpoints'))) == ['4', '6']


def test_seeds_apart_go_back_only_where_none_is_stopped_or_summarised(tmp_path):
  """A seed stopped by max_rejected_rounds ran idle beside the others in the uninterrupted run,
  which it would not from an older round; a finished seed taken back would keep a summary of
  rounds its rows no longer have. Both keep the seeds apart. A summary of the round gone back
  to or fewer (a finished sweep's, since extended by raising num_rounds) does not: it kept
  every extended sweep's seeds apart for good."""
  import types
  from fathom_sim import book as book_lib
  c = _config(0, max_rejected_rounds=3)

  def book(done, rejected=0, limit=None, summary=None):
    workdir = tmp_path / f'b{len(list(tmp_path.iterdir()))}'
    workdir.mkdir()
    if summary is not None:  # (True: one that does not read as a summary)
      (workdir / 'summary.json').write_text('{}' if summary is True
                                            else json.dumps({'rounds': summary}))
    saved = {} if limit is None else {'max_rejected_rounds': limit}
    return types.SimpleNamespace(done=done, workdir=str(workdir),
                                 meta={'rejected_in_a_row': rejected, 'config': saved})

  assert book_lib.may_go_back([book(4), book(2)], c)
  assert not book_lib.may_go_back([book(4), book(0)], c)  # a seed not started
  assert not book_lib.may_go_back([book(4), book(2, rejected=3)], c)  # stopped
  assert book_lib.may_go_back([book(4), book(2, rejected=3, limit=5)], c)  # its own limit
  assert not book_lib.may_go_back([book(4, summary=True), book(2)], c)
  assert not book_lib.may_go_back([book(4, summary=4), book(2)], c)
  assert not book_lib.may_go_back([book(4), book(3), book(5, summary=4)], c)
  assert book_lib.may_go_back([book(4, summary=2), book(2)], c)  # rows 1..2 are kept
  assert book_lib.may_go_back([book(49, summary=10), book(45, summary=10)], c)  # extended


def test_vectorised_seeds_refuse_configs_that_differ_beyond_the_seed(tmp_path, monkeypatch):
  with pytest.raises(ConfigError, match='differ only in config.seed; these differ too: eta'):
    train_seeds([_config(0), _config(1, eta=0.2)], [str(tmp_path / 'a'), str(tmp_path / 'b')])
  with pytest.raises(ConfigError, match='distinct config.seed'):
    train_seeds([_config(0), _config(0)], [str(tmp_path / 'a'), str(tmp_path / 'b')])
  with pytest.raises(ConfigError, match='these differ too: data.path'):
    train_seeds([_config(0, **{'data.path': 'x'}), _config(1, **{'data.path': 'y'})],
                [str(tmp_path / 'a'), str(tmp_path / 'b')])
  assert not os.path.exists(tmp_path / 'a')
  # A workdir given twice, or one inside another's: the locks are this process's, so both
  # were taken, and the two seeds' rows went into one metrics.jsonl, each round twice.
  from fathom_sim.workdir import WorkdirError
  for a, b, said in (('a', 'a', 'is'), ('a', 'a/../a/', 'is'), ('a', 'a/inner', 'is inside')):
    first, second = ((a, b) if said == 'is' else (b, a))
    with pytest.raises(WorkdirError, match=(
        rf"^vectorised seeds need a workdir each: '.*{first}' \(seed (0|1)\) {said} "
        r"'.*', seed [01]'s$")):
      train_seeds([_config(0), _config(1)], [str(tmp_path / a), str(tmp_path / b)])
  assert not os.path.exists(tmp_path / 'a')
  # One folder spelled two ways (seeds resumed keep their runs' spellings) is one value.
  monkeypatch.chdir(tmp_path)
  summaries = train_seeds([_config(0, num_rounds=1, **{'data.path': 'x'}),
                           _config(1, num_rounds=1, **{'data.path': f'{tmp_path}/x/'})],
                          [str(tmp_path / 'a'), str(tmp_path / 'b')])
  assert [s['rounds'] for s in summaries] == [1, 1]


def test_sweep_with_vmap_seeds_runs_each_setting_once_for_all_seeds(tmp_path):
  definition = sweep_def.SweepDef(
      config=_config(0, num_rounds=2), config_source='<inline>',
      overrides=[{'algorithm': 'fathom'}, {'algorithm': 'fedavg', 'eta': 0.1}],
      seeds=[0, 1], fixed={})
  out = str(tmp_path / 'sweep')
  groups = []

  def counting_group(configs, workdirs):
    groups.append([c.seed for c in configs])
    return train_seeds(configs, workdirs)

  entries = sweep.run_sweep(definition, out, train_group=counting_group, vmap_seeds=True,
                            log=lambda _: None)
  assert groups == [[0, 1], [0, 1]] and len(entries) == 4
  assert all(e['status'] == 'done' for e in entries)
  for e in entries:
    assert _summary(os.path.join(out, e['workdir']))['vectorized_seeds'] == 2
  groups.clear()
  sweep.run_sweep(definition, out, train_group=counting_group, vmap_seeds=True,
                  log=lambda _: None)
  assert groups == []


def test_one_seeds_bad_input_fails_that_seed_alone_under_vmap_seeds(tmp_path):
  """A damaged metrics.jsonl in seed 1's workdir failed the whole vectorised group: all three
  seeds were marked failed with seed 1's error. Now the group's seeds run one by one, and
  only seed 1 fails; a seed the group had finished before failing is marked done, not run."""
  from fathom_sim import metrics
  definition = sweep_def.SweepDef(config=_config(0, num_rounds=2), config_source='<inline>',
                              overrides=[{}], seeds=[0, 1, 2], fixed={})
  out = str(tmp_path / 'sweep')
  entries = sweep.run_sweep(definition, out, vmap_seeds=True, log=lambda _: None)
  path = os.path.join(out, entries[1]['workdir'], metrics.METRICS_FILE)
  damaged = 'garbage\n' + open(path).read()
  with open(path, 'w') as f:
    f.write(damaged)
  groups, solo, logs = [], [], []

  def group(configs, workdirs):
    groups.append([c.seed for c in configs])
    return train_seeds(configs, workdirs)

  def train(config, workdir):
    solo.append(config.seed)
    return train_and_evaluate(config, workdir)

  entries = sweep.run_sweep(definition, out, extra={'num_rounds': 3}, vmap_seeds=True,
                            train=train, train_group=group, log=logs.append)
  assert groups == [[0, 1, 2]] and solo == [0, 1, 2]
  assert [e['status'] for e in entries] == ['done', 'failed', 'done']
  assert entries[1]['error'].startswith(f'{path}: line 1 is not a row of a run')
  assert any('failed vectorised' in line for line in logs)
  assert open(path).read() == damaged
  for e in (entries[0], entries[2]):
    assert _summary(os.path.join(out, e['workdir']))['rounds'] == 3

  # The group finished seed 0 before it failed (as its one-by-one fallback does): seed 0 is
  # done, seeds 1 and 2 run alone.
  solo.clear()

  def finishes_seed_0_then_fails(configs, workdirs):
    train_and_evaluate(configs[0], workdirs[0])
    raise DataError('seed 1: record 7 cannot be read')

  entries = sweep.run_sweep(definition, out, extra={'num_rounds': 4}, vmap_seeds=True,
                            train=train, train_group=finishes_seed_0_then_fails,
                            log=lambda _: None)
  assert solo == [1, 2] and [e['status'] for e in entries] == ['done', 'failed', 'done']
  # Seed 0's entry, marked done without running here, says what the others' say.
  assert entries[0]['final_test_accuracy'] == _summary(
      os.path.join(out, entries[0]['workdir']))['final']['test_accuracy']


def test_a_vectorised_seed_that_diverges_stops_where_it_would_alone(tmp_path, monkeypatch):
  """eta 300: seed 1 alone has its round 6 rejected and stops (max_rejected_rounds 1), while
  seeds 0 and 2 finish. In a group it went on (the group stopped only when every seed had),
  and finished with rows, a summary and a final accuracy its solo run never has. Stopped, its
  cohorts run idle, so that it no longer sets the work the others compute."""
  from fathom_sim.driver import Rounds
  from fathom_sim.errors import Diverged

  def config(seed):
    return _config(seed, num_rounds=8, checkpoint_every=2, eta=300.0, upper_eta=1000.0,
                   max_rejected_rounds=1)

  solo = {}
  for s in SEEDS:
    try:
      train_and_evaluate(config(s), str(tmp_path / f'solo{s}'))
      solo[s] = 'done'
    except Diverged:
      solo[s] = 'diverged'
  assert solo == {0: 'done', 1: 'diverged', 2: 'done'}  # the case this test is about
  vec = [str(tmp_path / f'vec{s}') for s in SEEDS]
  idle, call = {}, Rounds.__call__

  def spy(self, state, t, hp):
    out = call(self, state, t, hp)
    idle[t] = [p.idle for p in out[2]]
    return out

  monkeypatch.setattr(Rounds, '__call__', spy)
  with pytest.raises(Diverged, match=r'^rounds 6..6 were all rejected \(1 in a row') as e:
    train_seeds([config(s) for s in SEEDS], vec)
  assert e.value.workdirs == [vec[1]]
  for s in SEEDS:
    got, want = _rows(vec[s]), _rows(str(tmp_path / f'solo{s}'))
    assert [r['round'] for r in got] == [r['round'] for r in want]
    assert [r['accepted'] for r in got] == [r['accepted'] for r in want]
    assert os.path.exists(os.path.join(vec[s], 'summary.json')) == (solo[s] == 'done')
    assert sorted(os.listdir(os.path.join(vec[s], 'checkpoints'))) == sorted(
        os.listdir(tmp_path / f'solo{s}' / 'checkpoints'))
  # Stopped, seed 1's cohorts run idle from round 7 (test_prefetch: what that saves).
  assert idle == {t: [False, t > 6, False] for t in range(1, 9)}


def _final_params(config, workdir):
  import jax
  from fathom_sim.checkpoint import Checkpointer
  from tests.common import build, init_state
  state, _ = Checkpointer(workdir, 3).restore_newest(init_state(build(config)))
  return jax.device_get(state.params)


def test_a_vectorised_seed_of_the_cnn_draws_its_own_dropout_masks(tmp_path):
  """The MLP above has no dropout: seeds in one program all drawing seed 0's masks passed
  every test. The EMNIST CNN has dropout; each seed's whole params must be its solo run's (one
  local step a client, so float rounding cannot send a ReLU unit to its other side)."""
  from tests.common import assert_trees_close
  configs = []
  for s in (0, 1):
    c = tiny_config(algorithm='fedavg', num_devices=2, cohort_size=3, eta=0.1, epochs=0.05,
                    batch_size=20.0, num_rounds=1, eval_every=1)
    c.model.name, c.model.conv = 'emnist_cnn', 'xla'
    c.data.name, c.data.num_clients = 'femnist_synthetic', 8
    c.seed = s
    configs.append(c)
  vec = [str(tmp_path / f'vec{s}') for s in (0, 1)]
  assert [r['vectorized_seeds'] for r in train_seeds(configs, vec)] == [2, 2]
  for c, v in zip(configs, vec):
    solo = str(tmp_path / f'solo{c.seed}')
    train_and_evaluate(c, solo)
    assert_trees_close(_final_params(c, v), _final_params(c, solo))

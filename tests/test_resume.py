"""Checkpoints and resume: kill -9 or SIGTERM mid-run, corrupt checkpoints, config changes,
and divergence that never reaches the params."""

import errno
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fathom_sim import provenance
from fathom_sim.train import train_and_evaluate
from fathom_sim.workdir import WorkdirError
from tests.common import tiny_config
from tests.test_cli import MAIN, QUICKSTART, ROOT, read_rows

# Slow, even rounds (a wide MLP), so that a signal reliably lands between checkpoints.
RUN = [f'--config={QUICKSTART}', '--config.num_rounds=40', '--config.checkpoint_every=10',
       '--config.eval_every=10', '--config.cohort_size=20', '--config.model.hidden=(256,256)',
       '--config.log_every=10']


def _start(workdir):
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  env.pop('XLA_FLAGS', None)
  return subprocess.Popen([sys.executable, MAIN, *RUN, f'--workdir={workdir}'], cwd=ROOT,
                          env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _finish(workdir):
  p = _start(workdir)
  out, _ = p.communicate(timeout=600)
  assert p.returncode == 0, out[-3000:]
  return out


def _without_timing(rows):
  return [{k: v for k, v in r.items() if k != 'wall_s'} for r in rows]


def _summary(workdir):
  with open(os.path.join(workdir, 'summary.json')) as f:
    return json.load(f)


@pytest.fixture(scope='module')
def uninterrupted(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp('uninterrupted'))
  _finish(workdir)
  return workdir


@pytest.mark.parametrize('sig', [signal.SIGKILL, signal.SIGTERM])
def test_killed_then_resumed_run_equals_uninterrupted(tmp_path, uninterrupted, sig):
  workdir = str(tmp_path)
  p = _start(workdir)
  target = os.path.join(workdir, 'checkpoints', '20')
  deadline = time.time() + 300
  while not os.path.isdir(target) and p.poll() is None and time.time() < deadline:
    time.sleep(0.01)
  if not os.path.isdir(target):  # (signalled anyway, the rows' count would be the failure)
    p.kill()
    out = p.communicate()[0]
    pytest.fail(f'no checkpoint of round 20 within 300 s (exit {p.returncode}):\n{out[-2000:]}')
  p.send_signal(sig)
  out, _ = p.communicate(timeout=120)
  assert p.returncode == (-9 if sig == signal.SIGKILL else 128 + signal.SIGTERM), out[-2000:]
  rows_at_stop = read_rows(workdir)
  assert 20 <= len(rows_at_stop) < 40  # stopped mid-way, after a checkpoint
  if sig == signal.SIGTERM:
    assert 'checkpoint saved' in out
    steps = sorted(int(s) for s in os.listdir(os.path.join(workdir, 'checkpoints')))
    assert steps[-1] == rows_at_stop[-1]['round']  # it checkpointed the round it stopped after
  out = _finish(workdir)
  assert 'resuming from the checkpoint of round' in out
  rows = read_rows(workdir)
  assert [r['round'] for r in rows] == list(range(1, 41))  # each round exactly once
  assert _without_timing(rows) == _without_timing(read_rows(uninterrupted))
  assert _summary(workdir)['final'] == _summary(uninterrupted)['final']
  assert _summary(workdir)['resumed_from'] >= 20


def _tiny(**overrides):
  settings = dict(num_rounds=30, checkpoint_every=10, eval_every=10, cohort_size=4,
                  keep_checkpoints=3, num_devices=2)
  return tiny_config(**{**settings, **overrides})


def test_corrupt_newest_checkpoint_falls_back_to_the_previous(tmp_path):
  straight = train_and_evaluate(_tiny(), str(tmp_path / 'straight'))
  workdir = str(tmp_path / 'run')
  train_and_evaluate(_tiny(), workdir)
  newest = os.path.join(workdir, 'checkpoints', '30')
  for root, _, files in os.walk(os.path.join(newest, 'state')):
    for name in files:  # overwrite the array data with garbage
      path = os.path.join(root, name)
      with open(path, 'r+b') as f:
        f.write(b'\x00garbage' * max(1, os.path.getsize(path) // 8))
  resumed = train_and_evaluate(_tiny(), workdir)
  assert resumed['resumed_from'] == 20
  assert os.path.isdir(os.path.join(workdir, 'unreadable_checkpoints', '30'))  # kept, not lost
  assert resumed['final']['params_sha256'] == straight['final']['params_sha256']
  assert [r['round'] for r in read_rows(workdir)] == list(range(1, 31))


def test_a_save_compiles_nothing_and_a_checkpoint_of_orbax_s_standard_handler_still_reads(
    tmp_path):
  """Orbax split each replicated array among the 8 devices to write it, through 24 slicing
  programs compiled on the first save (1.5 s of the quickstart's 4.5 s). Checkpoints written
  that way, by StandardSave, still resume."""
  import orbax.checkpoint as ocp
  from jax import monitoring
  from fathom_sim import checkpoint, run as run_lib
  config = _tiny()
  config.num_devices = 0
  config.model.hidden = (56,)  # shapes of this test alone: no program of theirs is at hand
  state = run_lib.init_state(run_lib.build(config))
  state = state._replace(round=state.round + 2)
  meta = {'round': 2, 'hp': [1.0, 0.1, 4.0], 'total_examples': 7, 'total_steps': 3,
          'computed': 1, 'wall_s': 0.5}
  compiled = []

  def listen(event, seconds, **_):
    if 'backend_compile' in event:
      compiled.append(event)

  monitoring.register_event_duration_secs_listener(listen)
  try:
    saver = checkpoint.Checkpointer(str(tmp_path / 'run'), 3)
    saver.save(state, meta, wait=True)
    saver.close()
  finally:
    monitoring.unregister_event_duration_listener(listen)
  assert compiled == [] and jax.device_count() == 8
  for name in ('run', 'standard'):
    if name == 'standard':  # as every checkpoint before this handler was written
      written = dict(meta, **{checkpoint.DIGEST: checkpoint.state_digest(state)})
      written[checkpoint.META_DIGEST] = checkpoint.meta_digest(written)
      with ocp.CheckpointManager(str(tmp_path / name / 'checkpoints')) as manager:
        manager.save(2, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                meta=ocp.args.JsonSave(written)))
    reader = checkpoint.Checkpointer(str(tmp_path / name), 3)
    restored, got = reader.restore_newest(jax.tree.map(jnp.zeros_like, state))
    reader.close()
    assert got['round'] == 2 and checkpoint.state_digest(restored) == checkpoint.state_digest(
        state)


def test_saves_leave_no_python_objects_behind(tmp_path):
  """Each save left ~24 objects that no collection freed (TensorStore's byte counters, which
  orbax asked for around each array batch): ~30 KB of host memory a checkpoint, for good."""
  import gc
  from fathom_sim import checkpoint, run as run_lib
  state = run_lib.init_state(run_lib.build(_tiny()))
  saver = checkpoint.Checkpointer(str(tmp_path / 'run'), 2)

  def saves(first: int, last: int) -> int:
    for t in range(first, last):
      saver.save(state._replace(round=state.round + t), {'round': t, 'wall_s': 0.0}, wait=True)
    gc.collect()
    return len(gc.get_objects())

  try:
    before = saves(1, 6)  # (orbax's and the first saves' own objects made)
    after = saves(6, 46)
  finally:
    saver.close()
  # ~65 made once here whatever the number of saves (40 or 120); ~24 a save before: 1,025.
  assert after - before < 200, after - before


def test_orbax_resolves_a_local_folder_s_spec_as_tensorstore_does_and_keeps_nothing(tmp_path):
  """TensorStore's to_json kept a reference to each string it made (untracked by gc, so the
  test above missed them): orbax resolves a save's folder 16 times a save, ~5 KB each."""
  import sys
  import tensorstore
  from orbax.checkpoint._src.serialization import tensorstore_utils
  from fathom_sim import checkpoint
  checkpoint.Checkpointer(str(tmp_path / 'run'), 2).close()
  for path in (f'{tmp_path}/a b/ü/', 'relative/x/', f'{tmp_path}/x'):
    spec = {'driver': 'file', 'path': ''.join(path)}  # (a string made here alone)
    resolved = tensorstore_utils.ts.KvStore.Spec(spec).to_json()
    assert resolved == tensorstore.KvStore.Spec(spec).to_json()
    kept = resolved['path']
    del spec, resolved
    assert sys.getrefcount(kept) == 2  # (`kept`'s and the call's: no other holds it)
  with pytest.raises(ValueError, match='Invalid file path'):  # (checked as before)
    tensorstore_utils.ts.KvStore.Spec({'driver': 'file', 'path': '/a//b/'})
  other = {'driver': 'memory', 'path': 'x/'}
  assert tensorstore_utils.ts.KvStore.Spec(other).to_json() == tensorstore.KvStore.Spec(
      other).to_json()


def test_a_checkpoint_whose_arrays_changed_on_disk_is_set_aside(tmp_path, caplog):
  """Orbax reads array bytes without a checksum of its own (a changed byte in a large array's
  data file restores as a wrong number). Here the newest checkpoint's arrays are swapped for
  another run's of the same round and shapes: it reads back whole and holds round 30, and only
  the digest saved with it tells. The run falls back as it does for a torn file."""
  import shutil
  workdir, other = str(tmp_path / 'run'), str(tmp_path / 'other')
  first = train_and_evaluate(_tiny(), workdir)
  train_and_evaluate(_tiny(seed=4), other)
  state = os.path.join(workdir, 'checkpoints', '30', 'state')
  shutil.rmtree(state)
  shutil.copytree(os.path.join(other, 'checkpoints', '30', 'state'), state)
  resumed = train_and_evaluate(_tiny(), workdir)
  assert 'sha256 mismatch' in caplog.text
  assert resumed['resumed_from'] == 20
  assert os.path.isdir(os.path.join(workdir, 'unreadable_checkpoints', '30'))
  assert resumed['final']['params_sha256'] == first['final']['params_sha256']


def test_a_file_in_a_checkpoints_place_is_said_in_the_log(tmp_path, caplog):
  """orbax lists step folders only: the run resumed from round 2 saying nothing of round 3."""
  import shutil
  workdir = tmp_path / 'run'
  train_and_evaluate(_tiny(num_rounds=3, checkpoint_every=1), str(workdir))
  shutil.rmtree(workdir / 'checkpoints' / '3')
  (workdir / 'checkpoints' / '3').write_text('x')
  resumed = train_and_evaluate(_tiny(num_rounds=4, checkpoint_every=1), str(workdir))
  assert resumed['resumed_from'] == 2
  assert '3 is a file in place of checkpoint folders, skipped' in caplog.text


def test_the_temporary_folder_of_a_save_cut_short_is_removed(tmp_path, caplog):
  """A run killed while saving its last round's checkpoint, then extended, never saved that
  round again: orbax's temporary folder of it stayed in the finished workdir for good. Its
  removal is said, so the log tells why the run resumed from an earlier round."""
  import shutil
  workdir = tmp_path / 'run'
  train_and_evaluate(_tiny(num_rounds=3, checkpoint_every=1), str(workdir))
  cut = workdir / 'checkpoints' / '3.orbax-checkpoint-tmp'
  shutil.copytree(workdir / 'checkpoints' / '3', cut)
  shutil.rmtree(workdir / 'checkpoints' / '3')
  (workdir / 'summary.json').unlink()
  resumed = train_and_evaluate(_tiny(num_rounds=5, checkpoint_every=10), str(workdir))
  assert resumed['resumed_from'] == 2 and not cut.exists()
  assert sorted(os.listdir(workdir / 'checkpoints')) == ['1', '2', '5']
  assert 'the unfinished save of round 3 (a run stopped mid-save) is removed' in caplog.text


def _edit_checkpoint_json(workdir, step, edit):
  path = os.path.join(workdir, 'checkpoints', str(step), 'meta', 'metadata')
  with open(path) as f:
    meta = json.load(f)
  edit(meta)
  with open(path, 'w') as f:
    json.dump(meta, f)


@pytest.mark.parametrize('edit, why', [
    (lambda m: m['hp'].__setitem__(2, m['hp'][2] + 7.0), 'sha256 mismatch'),
    (lambda m: m.__setitem__('total_examples', m['total_examples'] + 1000), 'sha256 mismatch'),
    (lambda m: m.pop('hp'), 'its JSON lacks hp'),
    (lambda m: m.pop('wall_s'), 'its JSON lacks wall_s')])
def test_a_checkpoint_whose_json_changed_on_disk_is_set_aside(tmp_path, caplog, edit, why):
  """The JSON holds what the host plans round t+1 from (the hyperparameters: B_int and each
  client's steps) and the totals it counts on from: a changed value resumed a run that planned
  another B_int than its device state's B, and counted other examples, without a word; a
  missing key stopped it with a KeyError. Either falls back as a torn array does."""
  straight = train_and_evaluate(_tiny(num_rounds=3, checkpoint_every=1), str(tmp_path / 's'))
  workdir = str(tmp_path / 'run')
  train_and_evaluate(_tiny(num_rounds=3, checkpoint_every=1), workdir)
  _edit_checkpoint_json(workdir, 3, edit)
  (tmp_path / 'run' / 'summary.json').unlink()
  resumed = train_and_evaluate(_tiny(num_rounds=3, checkpoint_every=1), workdir)
  assert 'checkpoint of round 3 is unreadable' in caplog.text and why in caplog.text
  assert resumed['resumed_from'] == 2
  assert os.path.isdir(os.path.join(workdir, 'unreadable_checkpoints', '3'))
  for key in ('final', 'total_examples', 'total_local_steps', 'final_hparams'):
    assert resumed[key] == straight[key], key


def _flip_a_byte(workdir, step):
  """A byte of the B-tree file that orbax's root index reads: its checksum fails mid-read."""
  data = os.path.join(workdir, 'checkpoints', str(step), 'state', 'd')
  for name in os.listdir(data):
    with open(os.path.join(data, name), 'r+b') as f:
      f.seek(os.path.getsize(os.path.join(data, name)) // 2)
      byte = f.read(1)[0]
      f.seek(-1, os.SEEK_CUR)
      f.write(bytes([byte ^ 0xFF]))


@pytest.mark.filterwarnings('error::pytest.PytestUnraisableExceptionWarning')
def test_unreadable_checkpoints_are_set_aside_once_an_older_one_reads_and_nothing_else(
    tmp_path, caplog, capfd):
  """The two newest checkpoints unreadable: each is set aside and named, the run resumes from
  the third, and orbax's aborted reads print no tracebacks."""
  workdir = str(tmp_path / 'run')
  straight = train_and_evaluate(_tiny(), workdir)
  for step in (20, 30):
    _flip_a_byte(workdir, step)
  capfd.readouterr()
  resumed = train_and_evaluate(_tiny(), workdir)
  assert resumed['resumed_from'] == 10
  assert sorted(os.listdir(os.path.join(workdir, 'unreadable_checkpoints'))) == ['20', '30']
  warnings = [r.getMessage() for r in caplog.records if 'is unreadable' in r.getMessage()]
  assert len(warnings) == 2 and all('resuming from round 10' in w for w in warnings)
  # what the set-aside ones hold, said as they pile up (never deleted)
  held = [r.getMessage() for r in caplog.records if 'set-aside checkpoint(s)' in r.getMessage()]
  assert [m.split(' holds ')[1].split(' set-aside')[0] for m in held] == ['1', '2']
  size = sum(os.path.getsize(os.path.join(d, f)) for d, _, files in
             os.walk(os.path.join(workdir, 'unreadable_checkpoints')) for f in files)
  assert f'2 set-aside checkpoint(s), {size / 2**20:.1f} MiB: delete them' in held[-1]
  assert 'Traceback' not in capfd.readouterr().err
  assert resumed['final']['params_sha256'] == straight['final']['params_sha256']
  assert [r['round'] for r in read_rows(workdir)] == list(range(1, 31))


@pytest.mark.filterwarnings('error::pytest.PytestUnraisableExceptionWarning')
@pytest.mark.parametrize('fault', ['damaged', 'meta_missing', 'io_error', 'tensorstore_io_error'])
def test_no_checkpoint_reading_back_stops_the_run_and_changes_nothing(tmp_path, monkeypatch,
                                                                      capfd, fault):
  """Every checkpoint unreadable: the run set them all aside and started again from round 0,
  cutting metrics.jsonl to nothing, also when the cause was the filesystem's (a mount giving
  I/O errors) and would have passed. It stops, naming each checkpoint's error, and the
  workdir stays as it was; moving checkpoints/ away, as the message says, starts again."""
  import shutil
  import orbax.checkpoint as ocp
  workdir = tmp_path / 'run'
  straight = train_and_evaluate(_tiny(num_rounds=20), str(workdir))
  (workdir / 'summary.json').unlink()  # as if stopped in its last round
  if fault == 'damaged':
    for step in (10, 20):
      _flip_a_byte(str(workdir), step)
    why = 'round 20: ValueError: '
  elif fault == 'meta_missing':  # orbax's FileNotFoundError has no errno: it was exit 1
    for step in (10, 20):
      (workdir / 'checkpoints' / str(step) / 'meta' / 'metadata').unlink()
    why = 'round 20: FileNotFoundError: '
  else:
    def io_error(*args, **kwargs):
      raise OSError(5, 'Input/output error')
    monkeypatch.setattr(ocp.CheckpointManager, 'restore', io_error)
    why = 'round 20: OSError: [Errno 5] Input/output error; round 10: OSError: [Errno 5]'
  if fault == 'tensorstore_io_error':
    # tensorstore reports an errno as a ValueError, which orbax wraps in a bare Exception
    # whose first line is a spec: the cause is named, and it is the filesystem's.
    def tensorstore_io_error(*args, **kwargs):
      try:
        raise ValueError('UNKNOWN: Error reading "w/0" in OCDBT database at local file "/x/": '
                         'Error reading local file "/x/d/ab12": [OS error 5: Input/output '
                         'error]')
      except ValueError as cause:
        raise Exception('Exception while reading {\n  "driver": "zarr",') from cause
    monkeypatch.setattr(ocp.CheckpointManager, 'restore', tensorstore_io_error)
    why = 'round 20: Input/output error: ValueError: UNKNOWN: Error reading "w/0" in OCDBT'
  listing = sorted(os.listdir(workdir))
  rows = (workdir / 'metrics.jsonl').read_bytes()
  capfd.readouterr()
  # The filesystem's fault is an OutputError (exit 1, to retry), damaged files the workdir's
  # (an InputError: exit 2, and a sweep goes on to its other runs).
  from fathom_sim.errors import InputError, OutputError
  with pytest.raises(InputError if fault in ('damaged', 'meta_missing') else OutputError,
                     match='no checkpoint reads back') as e:
    train_and_evaluate(_tiny(num_rounds=20), str(workdir))
  assert why in str(e.value) and '); none was moved.' in str(e.value)
  assert 'to start again from round 0, move checkpoints/ out of the workdir' in str(e.value)
  assert sorted(os.listdir(workdir)) == listing and 'unreadable_checkpoints' not in listing
  assert sorted(os.listdir(workdir / 'checkpoints')) == ['10', '20']
  assert (workdir / 'metrics.jsonl').read_bytes() == rows
  assert 'Traceback' not in capfd.readouterr().err
  monkeypatch.undo()
  shutil.move(workdir / 'checkpoints', tmp_path / 'aside')
  again = train_and_evaluate(_tiny(num_rounds=20), str(workdir))
  assert again['resumed_from'] == 0
  assert again['final']['params_sha256'] == straight['final']['params_sha256']
  assert [r['round'] for r in read_rows(str(workdir))] == list(range(1, 21))


def test_only_a_cause_the_filesystem_raised_counts_as_its_fault(tmp_path):
  """A checkpoint's read failing for the filesystem (EIO, a full table of files) is retried,
  exit 1; one missing a file (ENOENT, orbax's or tensorstore's) or failing while an OSError
  was being handled is damage, exit 2."""
  from fathom_sim.checkpoint import _filesystem_fault

  def chained(error, cause, implicit=False):
    try:
      raise cause
    except BaseException as c:
      try:
        if implicit:
          raise error
        raise error from c
      except BaseException as e:
        return e

  eio = ValueError('UNKNOWN: Error reading local file "/x/d/ab": [OS error 5: Input/output '
                   'error]')
  assert _filesystem_fault(chained(Exception('spec'), eio)) is not None
  assert _filesystem_fault(OSError(errno.EMFILE, 'Too many open files')) is not None
  assert _filesystem_fault(FileNotFoundError(errno.ENOENT, 'gone')) is None
  assert _filesystem_fault(chained(Exception('spec'), ValueError(
      'NOT_FOUND: Error reading local file "/x/d/ab": [OS error 2: No such file or '
      'directory]'))) is None
  assert _filesystem_fault(chained(ValueError('its arrays differ'), OSError(errno.EIO, 'x'),
                                   implicit=True)) is None
  # tensorstore 0.1.86's own form, "[os_error_code='21']", from a real write onto a folder: it
  # was not recognised, so a full disk or EIO read as damage (exit 2, a sweep going on).
  import tensorstore as ts
  from fathom_sim.checkpoint import _said
  (tmp_path / 'key').mkdir()
  with pytest.raises(ValueError) as real:
    ts.KvStore.open({'driver': 'file', 'path': f'{tmp_path}/'}).result().write('key', b'x').result()
  assert "[os_error_code='21']" in str(real.value)
  assert _filesystem_fault(chained(Exception('spec'), real.value)) is real.value
  assert _said(real.value).startswith('Is a directory: ValueError: FAILED_PRECONDITION: ')
  assert _filesystem_fault(chained(Exception('spec'), ValueError(
      "NOT_FOUND: Error reading local file \"/x/d/ab\" [os_error_code='2']"))) is None


def test_a_failed_restore_silences_orbax_aborted_reads_and_nothing_else(monkeypatch):
  """The array reads that a failed restore leaves in flight report their errors when they are
  collected, long after the checkpoint was set aside (~60 lines each, seen intermittently)."""
  import sys
  import types
  from fathom_sim import checkpoint
  seen = []
  monkeypatch.setattr(sys, 'unraisablehook', seen.append)
  checkpoint._quiet_closed_loop_callbacks()
  checkpoint._quiet_closed_loop_callbacks()  # once: not a hook around a hook

  async def _read_array_index_and_device_put():  # orbax's read coroutine, by name
    pass

  async def someone_elses():
    pass

  read, other = _read_array_index_and_device_put(), someone_elses()
  for coroutine in (read, other):
    sys.unraisablehook(types.SimpleNamespace(exc_value=Exception('read failed'),
                                             object=coroutine))
    coroutine.close()
  sys.unraisablehook(types.SimpleNamespace(exc_value=RuntimeError('Event loop is closed'),
                                           object=None))
  assert [u.object for u in seen] == [other]
  from orbax.checkpoint._src.serialization import serialization  # the name is still orbax's
  assert callable(getattr(serialization, checkpoint._ORBAX_ARRAY_READ))


def test_result_changing_config_is_refused_and_more_rounds_continue(tmp_path, monkeypatch):
  workdir = str(tmp_path / 'run')
  train_and_evaluate(_tiny(num_rounds=10), workdir)
  files = ('metrics.jsonl', 'config.json', 'summary.json', '.lock')  # .lock: the holder line
  before = [open(os.path.join(workdir, f)).read() for f in files]
  times = [os.stat(os.path.join(workdir, f)).st_mtime_ns for f in files]
  with pytest.raises(WorkdirError, match=r'model.hidden \(\[8\] -> \[9\]\), seed \(3 -> 4\)'):
    train_and_evaluate(_tiny(num_rounds=10, seed=4, **{'model.hidden': (9,)}), workdir)
  # Fewer rounds than the run's checkpoint: refused before the data load (minutes for a large
  # dataset), where it used to be refused once the checkpoint was restored.
  from fathom_sim import train

  def no_load(config):
    raise AssertionError('the data was loaded')

  with monkeypatch.context() as m:
    m.setattr(train, 'build', no_load)
    with pytest.raises(WorkdirError, match=re.escape(
        f"--workdir {workdir!r} holds a run already at round 10; config.num_rounds must be at "
        'least that, got 5')):
      train_and_evaluate(_tiny(num_rounds=5, keep_checkpoints=1), workdir)
  assert [open(os.path.join(workdir, f)).read() for f in files] == before  # nothing rewritten
  # Finished: nothing redone, and nothing rewritten (the summary kept its own compiles,
  # wall_s and resumed_from, where they were those of a command that only evaluated).
  again = train_and_evaluate(_tiny(num_rounds=10), workdir)
  assert [open(os.path.join(workdir, f)).read() for f in files] == before
  # (a refused command's lock line was taken back, but the .lock's time told it had come)
  assert [os.stat(os.path.join(workdir, f)).st_mtime_ns for f in files] == times
  assert again == json.loads(before[2]) and again['resumed_from'] == 0
  assert before[3] == ''  # a line names a live holder only
  target = train_and_evaluate(_tiny(num_rounds=10, target_accuracy=0.01), workdir)
  assert target['rounds_to_target'] is not None  # a new question: summarised again
  # ... with the run's wall_s: this command ran no round (its evaluation's seconds were added)
  assert target['wall_s'] == json.loads(before[2])['wall_s'] and target['resumed_from'] == 10
  longer = train_and_evaluate(_tiny(num_rounds=20), workdir)
  straight = train_and_evaluate(_tiny(num_rounds=20), str(tmp_path / 'straight'))
  assert longer['final']['params_sha256'] == straight['final']['params_sha256']
  assert _without_timing(read_rows(workdir)) == _without_timing(
      read_rows(str(tmp_path / 'straight')))


@pytest.mark.parametrize('path', [{'local_loop': 'host'}, {'data_on_device': 'no'},
                                  {'lanes_per_device': 2, 'algorithm': 'fedavg'},
                                  {'hyper_optimizer': 'adam', 'server_optimizer': 'adam'}])
def test_a_run_resumed_equals_an_uninterrupted_one_on_each_execution_path(tmp_path, path):
  """The host-driven local loop, the training set read per round (the prefetcher's buffers),
  lanes side by side, optimizers with state (Adam's moments, server's and FATHOM's): a run
  resumed from its checkpoint of round 10 ends where one run of 20 rounds does, row for row.
  (The killed-run tests take the quickstart's own path.)"""
  workdir, straight = str(tmp_path / 'run'), str(tmp_path / 'straight')
  train_and_evaluate(_tiny(num_rounds=10, **path), workdir)
  resumed = train_and_evaluate(_tiny(num_rounds=20, **path), workdir)
  assert resumed['resumed_from'] == 10
  assert resumed['final'] == train_and_evaluate(_tiny(num_rounds=20, **path), straight)['final']
  assert _without_timing(read_rows(workdir)) == _without_timing(read_rows(straight))


def test_a_finished_run_taken_further_keeps_no_evaluation_an_uninterrupted_run_lacks(tmp_path):
  workdir = str(tmp_path / 'run')
  short = train_and_evaluate(_tiny(num_rounds=7), workdir)  # round 7 is evaluated as the last
  assert read_rows(workdir)[-1]['test_accuracy'] == short['final']['test_accuracy']
  longer = train_and_evaluate(_tiny(num_rounds=20), workdir)
  straight = train_and_evaluate(_tiny(num_rounds=20), str(tmp_path / 'straight'))
  assert longer['resumed_from'] == 7
  rows = _without_timing(read_rows(workdir))
  assert rows == _without_timing(read_rows(str(tmp_path / 'straight')))
  assert [r['round'] for r in rows if 'test_accuracy' in r] == [10, 20]
  assert longer['final'] == straight['final']


def test_a_run_killed_before_its_summary_then_taken_further_keeps_no_extra_evaluation(tmp_path):
  workdir = str(tmp_path / 'run')
  train_and_evaluate(_tiny(num_rounds=7), workdir)
  os.remove(os.path.join(workdir, 'summary.json'))  # killed after its last checkpoint
  assert 'test_accuracy' in read_rows(workdir)[-1]
  train_and_evaluate(_tiny(num_rounds=20), workdir)
  train_and_evaluate(_tiny(num_rounds=20), str(tmp_path / 'straight'))
  assert _without_timing(read_rows(workdir)) == _without_timing(
      read_rows(str(tmp_path / 'straight')))


def test_a_second_command_on_a_live_runs_workdir_is_refused_and_changes_nothing(tmp_path):
  """A job relaunched while the first still runs wrote the same metrics and checkpoints."""
  import fcntl
  workdir = tmp_path / 'run'
  train_and_evaluate(_tiny(num_rounds=3), str(workdir))
  holder = 'process 4242 on host-a, since 2026-12-03T10:00:00\n'
  fresh = tmp_path / 'fresh'  # a new run's workdir, its first command still starting
  fresh.mkdir()
  for where in (workdir, fresh):
    with open(where / '.lock', 'a+') as live:  # the first command's, still running
      fcntl.flock(live, fcntl.LOCK_EX | fcntl.LOCK_NB)
      live.truncate(0)
      live.write(holder)
      live.flush()
      before = {f: (where / f).read_bytes() for f in os.listdir(where) if f != 'checkpoints'}
      with pytest.raises(WorkdirError, match=r"--workdir '.*' is in use by a running command "
                                             r'\(process 4242 on host-a, since 2026-12-03'):
        train_and_evaluate(_tiny(num_rounds=5), str(where))
      assert {f: (where / f).read_bytes() for f in os.listdir(where)
              if f != 'checkpoints'} == before  # the lock's holder line included
  assert sorted(os.listdir(fresh)) == ['.lock']  # no config.json of the refused command
  assert sorted(os.listdir(workdir / 'checkpoints')) == ['3']
  # Once it has ended (however: the system drops a dead process's lock), the run resumes.
  assert train_and_evaluate(_tiny(num_rounds=5), str(workdir))['resumed_from'] == 3


@pytest.mark.parametrize('refuse', ['write', 'lock_rw', 'lock', 'read_only'])
def test_a_workdir_the_user_may_not_write_is_refused_and_changes_nothing(tmp_path, monkeypatch,
                                                                          refuse):
  """A resume on a read-only mount (the permissions as the system answers them; root, which
  runs these tests, is not refused by them): one WorkdirError, nothing changed. A
  lock file only readable (another user's) still locks: flock needs only a handle. A run
  copied without its .lock onto a read-only mount was said to have none to open ('No such
  file or directory'), not the mount's answer."""
  workdir = str(tmp_path / 'run')
  train_and_evaluate(_tiny(num_rounds=2), workdir)
  if refuse == 'read_only':
    os.remove(os.path.join(workdir, '.lock'))
  before = {f: (tmp_path / 'run' / f).read_bytes() for f in os.listdir(workdir)
            if f != 'checkpoints'}
  real_access, real_open = os.access, os.open
  lock = os.path.join(workdir, '.lock')

  def access(path, mode, **kwargs):
    return False if refuse == 'write' and path == workdir else real_access(path, mode, **kwargs)

  def open_(path, flags, *args, **kwargs):
    if path == lock and refuse == 'read_only' and flags & os.O_CREAT:
      raise OSError(errno.EROFS, os.strerror(errno.EROFS), path)
    if path == lock and (flags & os.O_RDWR or refuse == 'lock'):
      raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), path)
    return real_open(path, flags, *args, **kwargs)

  monkeypatch.setattr(os, 'access', access)
  monkeypatch.setattr(os, 'open', open_ if refuse != 'write' else real_open)
  if refuse == 'lock_rw':
    assert train_and_evaluate(_tiny(num_rounds=3), workdir)['resumed_from'] == 2
    return
  with pytest.raises(WorkdirError, match={
      'write': f"^--workdir '{re.escape(workdir)}' is not writable$",
      'lock': f"^--workdir '{re.escape(workdir)}': its .lock cannot be opened "
              r'\(Permission denied\); give a folder of your own$',
      'read_only': f"^--workdir '{re.escape(workdir)}': its .lock cannot be made "
                   r'\(Read-only file system\); give a folder of your own$'}[refuse]):
    train_and_evaluate(_tiny(num_rounds=3), workdir)
  assert {f: (tmp_path / 'run' / f).read_bytes() for f in os.listdir(workdir)
          if f != 'checkpoints'} == before
  assert sorted(os.listdir(tmp_path / 'run' / 'checkpoints')) == ['2']


def test_a_run_s_workdir_is_checked_before_the_data_load(tmp_path, monkeypatch):
  """A relaunched job, or a resume whose config differs, was refused only after its data
  had loaded (minutes for a large dataset)."""
  import fcntl
  from fathom_sim import train as train_lib
  from fathom_sim.config import ConfigError
  workdir = tmp_path / 'run'
  train_and_evaluate(_tiny(num_rounds=2), str(workdir))

  def build(config):
    raise AssertionError('the data were loaded before the workdir was checked')

  monkeypatch.setattr(train_lib, 'build', build)
  before = {f: (workdir / f).read_bytes() for f in os.listdir(workdir) if f != 'checkpoints'}
  with pytest.raises(WorkdirError, match=r'holds a run with a different config; .*seed \(3 -> 9'
                     r'\); use another workdir$') as refused:
    train_and_evaluate(_tiny(num_rounds=4, seed=9), str(workdir))
  assert str(refused.value).startswith(f'--workdir {str(workdir)!r} holds')
  with pytest.raises(ConfigError, match='config.eta must be'):
    train_and_evaluate(_tiny(num_rounds=4, eta=-1.0), str(workdir))
  with open(workdir / '.lock', 'a+') as live:  # a first command still running
    fcntl.flock(live, fcntl.LOCK_EX | fcntl.LOCK_NB)
    with pytest.raises(WorkdirError, match='is in use by a running command'):
      train_and_evaluate(_tiny(num_rounds=4), str(workdir))
  assert {f: (workdir / f).read_bytes() for f in os.listdir(workdir)
          if f != 'checkpoints'} == before


@pytest.mark.parametrize('code,refused', [(errno.EACCES, True), (errno.ENOLCK, False)])
def test_a_lock_held_elsewhere_is_refused_and_a_filesystem_without_locks_warned(
    tmp_path, monkeypatch, caplog, code, refused):
  """Some filesystems answer a held lock with EACCES, not EWOULDBLOCK: the run went on
  unguarded. One without locks (ENOLCK) runs, said in the log."""
  import fcntl

  def flock(fd, op):
    raise OSError(code, os.strerror(code))

  monkeypatch.setattr(fcntl, 'flock', flock)
  if refused:
    with pytest.raises(WorkdirError, match='is in use by a running command'):
      train_and_evaluate(_tiny(num_rounds=1), str(tmp_path / 'run'))
  else:
    train_and_evaluate(_tiny(num_rounds=1), str(tmp_path / 'run'))
    assert 'cannot lock .lock' in caplog.text


def test_a_periodic_evaluation_is_kept_by_a_resume_with_another_eval_every(tmp_path):
  """Stopped after its round-10 checkpoint, resumed with eval_every 4 (a field a resumed run
  may change): round 10's evaluation was dropped as if the run had ended there."""
  import shutil
  workdir = tmp_path / 'run'
  train_and_evaluate(_tiny(num_rounds=12, eval_every=5, checkpoint_every=10), str(workdir))
  shutil.rmtree(workdir / 'checkpoints' / '12')  # as if killed after round 10's checkpoint
  (workdir / 'summary.json').unlink()
  train_and_evaluate(_tiny(num_rounds=20, eval_every=4, checkpoint_every=10), str(workdir))
  evaluated = [r['round'] for r in read_rows(str(workdir)) if 'test_accuracy' in r]
  assert evaluated == [5, 10, 12, 16, 20]


def test_an_evaluation_on_the_old_schedule_is_kept_when_the_run_goes_on_with_another(tmp_path):
  """Ended at round 6 with eval_every 3, taken to 12 with eval_every 4: round 6's evaluation
  was on the run's schedule, and was dropped as if the run had only ended there."""
  workdir = tmp_path / 'run'
  train_and_evaluate(_tiny(num_rounds=6, eval_every=3, checkpoint_every=3), str(workdir))
  train_and_evaluate(_tiny(num_rounds=12, eval_every=4, checkpoint_every=3), str(workdir))
  evaluated = [r['round'] for r in read_rows(str(workdir)) if 'test_accuracy' in r]
  assert evaluated == [3, 6, 8, 12]


def test_a_run_stopped_at_a_checkpoint_and_ended_there_evaluates_that_round(tmp_path,
                                                                             monkeypatch):
  """Stopped after round 5's checkpoint on its way to 12, then run with num_rounds=5: no
  round ran, and round 5's row lacked the evaluation a 5-round run makes there."""
  from fathom_sim import driver
  feed = driver.Rounds._feed

  def stop_in_round_6(self, t, hp, *rest):
    if t == 7:  # fed while round 6 runs, after round 5's checkpoint
      raise KeyboardInterrupt('stopped in round 6')
    return feed(self, t, hp, *rest)

  workdir = tmp_path / 'run'
  monkeypatch.setattr(driver.Rounds, '_feed', stop_in_round_6)
  with pytest.raises(KeyboardInterrupt):
    train_and_evaluate(_tiny(num_rounds=12, checkpoint_every=5, eval_every=10), str(workdir))
  monkeypatch.setattr(driver.Rounds, '_feed', feed)
  assert os.listdir(workdir / 'checkpoints') == ['5']
  assert all('test_accuracy' not in r for r in read_rows(str(workdir)))
  summary = train_and_evaluate(_tiny(num_rounds=5, checkpoint_every=5, eval_every=10),
                               str(workdir))
  straight = train_and_evaluate(_tiny(num_rounds=5, checkpoint_every=5, eval_every=10),
                                str(tmp_path / 'straight'))
  assert _without_timing(read_rows(str(workdir))) == _without_timing(
      read_rows(str(tmp_path / 'straight')))
  assert summary['final'] == straight['final'] and summary['resumed_from'] == 5
  # Then taken on to 12: round 5's evaluation, made because the last command ended there, is
  # dropped. It stayed: the checkpoint's config says 12 rounds, and only that was asked.
  train_and_evaluate(_tiny(num_rounds=12, checkpoint_every=5, eval_every=10), str(workdir))
  train_and_evaluate(_tiny(num_rounds=12, checkpoint_every=5, eval_every=10),
                     str(tmp_path / 'straight12'))
  assert _without_timing(read_rows(str(workdir))) == _without_timing(
      read_rows(str(tmp_path / 'straight12')))


def test_an_end_of_run_evaluation_left_by_a_command_killed_before_its_summary_is_dropped(
    tmp_path, monkeypatch):
  """Stopped after round 5's checkpoint on its way to 12; run with num_rounds=5, which
  evaluates round 5 as a last round and is killed before its summary.json; then taken to 12:
  round 5's evaluation stayed (the checkpoint's config says 12 rounds and no summary said the
  run ended at 5), an evaluation no uninterrupted run makes."""
  from fathom_sim import driver, summary
  feed, summarise = driver.Rounds._feed, summary.write

  def stop_in_round_6(self, t, hp, *rest):
    if t == 7:  # fed while round 6 runs, after round 5's checkpoint
      raise KeyboardInterrupt('stopped in round 6')
    return feed(self, t, hp, *rest)

  def killed(*args, **kwargs):
    raise KeyboardInterrupt  # as a kill -9 there: no summary.json written

  workdir = tmp_path / 'run'
  config = lambda rounds: _tiny(num_rounds=rounds, checkpoint_every=5, eval_every=10)
  monkeypatch.setattr(driver.Rounds, '_feed', stop_in_round_6)
  with pytest.raises(KeyboardInterrupt):
    train_and_evaluate(config(12), str(workdir))
  monkeypatch.setattr(driver.Rounds, '_feed', feed)
  monkeypatch.setattr(summary, 'write', killed)
  with pytest.raises(KeyboardInterrupt):
    train_and_evaluate(config(5), str(workdir))
  assert 'test_accuracy' in read_rows(str(workdir))[-1]  # round 5's, as a last round
  monkeypatch.setattr(summary, 'write', summarise)
  train_and_evaluate(config(12), str(workdir))
  train_and_evaluate(config(12), str(tmp_path / 'straight'))
  assert _without_timing(read_rows(str(workdir))) == _without_timing(
      read_rows(str(tmp_path / 'straight')))


@pytest.mark.parametrize('rounds, eval_clients', [(5, 0), (4, 0), (5, 4)])
def test_a_finished_run_taken_further_and_stopped_then_run_to_its_rounds_again_is_put_back(
    tmp_path, monkeypatch, rounds, eval_clients):
  """Finished at `rounds`, taken on to 12 and stopped in round 7 (its next checkpoint at 10),
  then run with num_rounds=`rounds` again: it said "finished already" and kept the rows to 6,
  config.json's 12, and round `rounds`' evaluation as the longer run left it (dropped off the
  eval period, sampled on it)."""
  from fathom_sim import driver
  feed = driver.Rounds._feed

  def stop_in_round_7(self, t, hp, *rest):
    if t == 8:  # fed while round 7 runs
      raise KeyboardInterrupt('stopped in round 7')
    return feed(self, t, hp, *rest)

  def config(num_rounds):
    return _tiny(num_rounds=num_rounds, checkpoint_every=10, eval_every=5,
                 eval_clients=eval_clients)

  workdir = tmp_path / 'run'
  straight = train_and_evaluate(config(rounds), str(tmp_path / 'straight'))
  train_and_evaluate(config(rounds), str(workdir))
  monkeypatch.setattr(driver.Rounds, '_feed', stop_in_round_7)
  with pytest.raises(KeyboardInterrupt):
    train_and_evaluate(config(12), str(workdir))
  monkeypatch.setattr(driver.Rounds, '_feed', feed)
  assert read_rows(str(workdir))[-1]['round'] == 6  # (round 7 stopped before its row)
  again = train_and_evaluate(config(rounds), str(workdir))
  assert _without_timing(read_rows(str(workdir))) == _without_timing(
      read_rows(str(tmp_path / 'straight')))
  assert json.load(open(workdir / 'config.json'))['num_rounds'] == rounds
  assert again['final'] == straight['final']
  # Finished as its files stand now: left as it is.
  files = [(workdir / f).read_bytes() for f in ('config.json', 'metrics.jsonl', 'summary.json')]
  assert train_and_evaluate(config(rounds), str(workdir)) == again
  assert [(workdir / f).read_bytes() for f in ('config.json', 'metrics.jsonl',
                                               'summary.json')] == files


def test_a_bfloat16_run_records_its_compute_dtype_and_is_not_resumed_in_float32(tmp_path):
  """Computing in bfloat16 changes what a run trains, like its model: not a resumable field."""
  workdir = str(tmp_path / 'run')
  summary = train_and_evaluate(_tiny(num_rounds=3, **{'model.compute_dtype': 'bfloat16'}),
                               workdir)
  assert summary['compute_dtype'] == 'bfloat16'
  assert np.isfinite(summary['final']['params_l2'])
  straight = train_and_evaluate(_tiny(num_rounds=3), str(tmp_path / 'float32'))
  assert straight['compute_dtype'] == 'float32'
  assert summary['final']['params_sha256'] != straight['final']['params_sha256']
  before = open(os.path.join(workdir, 'metrics.jsonl')).read()
  with pytest.raises(WorkdirError, match=r"model.compute_dtype \('bfloat16' -> 'float32'\)"):
    train_and_evaluate(_tiny(num_rounds=4), workdir)
  assert open(os.path.join(workdir, 'metrics.jsonl')).read() == before


def test_a_run_saved_before_a_config_field_existed_still_resumes(tmp_path):
  workdir = str(tmp_path / 'run')
  train_and_evaluate(_tiny(num_rounds=2), workdir)
  path = os.path.join(workdir, 'config.json')
  with open(path) as f:
    saved = json.load(f)
  del saved['clip_log_params']  # as written by a version without the field
  with open(path, 'w') as f:
    json.dump(saved, f)
  assert train_and_evaluate(_tiny(num_rounds=3), workdir)['resumed_from'] == 2
  # Not when the config now asks for a value other than the field's default.
  with open(path) as f:
    saved = json.load(f)
  del saved['clip_log_params']
  with open(path, 'w') as f:
    json.dump(saved, f)
  with pytest.raises(WorkdirError, match=r'clip_log_params \(False -> True\)'):
    train_and_evaluate(_tiny(num_rounds=4, clip_log_params=True), workdir)
  # A field the run does not read may take any value (the synthetic data read no in_memory).
  assert train_and_evaluate(_tiny(num_rounds=4, **{'data.in_memory': True}),
                            workdir)['resumed_from'] == 3


def _npz_with_bad_clients(directory, bad, poison=np.nan):
  r = np.random.default_rng(0)
  counts = np.array([6, 9, 7, 8])
  x = r.normal(size=(counts.sum(), 60)).astype(np.float32)
  y = r.integers(0, 10, counts.sum())
  offsets = np.concatenate([[0], np.cumsum(counts)])
  for i in bad:
    x[offsets[i]] = poison  # one poisoned example: by default, that client's update is NaN
  os.makedirs(directory)
  np.savez(os.path.join(directory, 'train.npz'), x=x, y=y, num_examples=counts)
  np.savez(os.path.join(directory, 'test.npz'), x=r.normal(size=(8, 60)).astype(np.float32),
           y=r.integers(0, 10, 8), num_examples=np.array([4, 4]))


def _npz_config(path, **overrides):
  c = _tiny(**{'num_rounds': 4, 'batch_size': 4.0, **overrides})
  c.data.name = 'npz'
  c.data.path = path
  c.data.num_classes = 10
  return c


def test_the_same_data_folder_spelled_otherwise_resumes(tmp_path, monkeypatch):
  """A run started on data.path '/x/data' was refused, as a change of its data, when resumed
  on '/x/data/' or 'data' from /x (the Stack Overflow config's folder is relative, a pod
  script's absolute). One place is one value; another folder is still another run's data."""
  data = str(tmp_path / 'data')
  _npz_with_bad_clients(data, bad=[])
  straight = train_and_evaluate(_npz_config(data), str(tmp_path / 'straight'))
  workdir = str(tmp_path / 'run')
  train_and_evaluate(_npz_config(data, num_rounds=2), workdir)
  monkeypatch.chdir(tmp_path)
  train_and_evaluate(_npz_config(data + '//', num_rounds=3), workdir)
  resumed = train_and_evaluate(_npz_config('./data/../data'), workdir)
  assert resumed['resumed_from'] == 3
  assert resumed['final']['params_sha256'] == straight['final']['params_sha256']
  assert _without_timing(read_rows(workdir)) == _without_timing(
      read_rows(str(tmp_path / 'straight')))
  # The run keeps its first spelling: its config.json, and the summary's fingerprint, which a
  # relaunch of the finished run under yet another spelling finds its own (nothing rewritten).
  assert json.load(open(os.path.join(workdir, 'config.json')))['data']['path'] == data
  files = {f: open(os.path.join(workdir, f), 'rb').read() for f in ('config.json',
                                                                     'summary.json')}
  assert train_and_evaluate(_npz_config('data/'), workdir) == json.loads(files['summary.json'])
  assert {f: open(os.path.join(workdir, f), 'rb').read() for f in files} == files
  shutil.copytree(data, str(tmp_path / 'copy'))
  with pytest.raises(WorkdirError, match=r"fields that change the result differ: data.path "
                     f"\\('{data}' -> 'copy'\\)"):
    train_and_evaluate(_npz_config('copy', num_rounds=5), workdir)


# One lane per device runs a client's last step as a branch (a cond); several side by side run
# it as selects under vmap (cohort.py). Both must leave a non-finite client out. B 5 is padded
# to 6 rows, and a padding row holds a real example (the next batch's, or the next client's):
# an inf there made other clients' gradients NaN (0 * inf) while masked out by a product.
# Client 0's bad example is row 0, where data on the device pads from.
@pytest.mark.parametrize('lanes,batch,bad', [(1, 4.0, 2), (3, 4.0, 2), (1, 5.0, 0), (3, 5.0, 0)])
def test_non_finite_client_is_dropped_and_counted(tmp_path, lanes, batch, bad):
  data = str(tmp_path / 'data')
  _npz_with_bad_clients(data, bad=[bad])
  summary = train_and_evaluate(_npz_config(data, lanes_per_device=lanes, batch_size=batch),
                               str(tmp_path / 'run'))
  rows = read_rows(str(tmp_path / 'run'))
  assert [r['dropped_clients'] for r in rows] == [1, 1, 1, 1]  # all 4 clients every round
  assert all(r['accepted'] and np.isfinite(r['train_loss']) for r in rows)
  assert np.isfinite(summary['final']['params_l2'])


@pytest.mark.parametrize('lanes,poison', [(1, 1e20), (3, 1e20), (1, 1e19), (3, 1e19)])
def test_client_whose_hypergradient_is_not_finite_is_left_out_like_a_non_finite_update(
    tmp_path, lanes, poison):
  """An example of 1e19 or 1e20 makes |g|^2 overflow float32 while the update stays finite, so
  the client's c_k = cos(g_k, d_k) is unknown. The client must be left out entirely, exactly as
  when its update is NaN: not in h_local and phi (the next round's B would be NaN), and not in
  the aggregate (its update is ~1e17). At 1e19 <g, d> stayed finite: c_k read as 0, and the
  round took the client in."""
  runs = {}
  for name, poison in (('overflow', poison), ('nan', np.nan)):
    data = str(tmp_path / f'data_{name}')
    _npz_with_bad_clients(data, bad=[2], poison=poison)
    summary = train_and_evaluate(_npz_config(data, num_rounds=1, lanes_per_device=lanes),
                                 str(tmp_path / name))
    runs[name] = (summary, read_rows(str(tmp_path / name))[0])
  (summary, row), (want_summary, want_row) = runs['overflow'], runs['nan']
  assert row['dropped_clients'] == want_row['dropped_clients'] == 1
  assert row['accepted'] and np.isfinite([row['h_local'], row['h_glob']]).all()
  for key in ('h_local', 'h_glob', 'train_loss'):
    assert row[key] == want_row[key], key
  assert summary['final']['params_sha256'] == want_summary['final']['params_sha256']
  assert summary['final_hparams'] == want_summary['final_hparams']
  assert np.isfinite(list(summary['final_hparams'].values())).all()


@pytest.mark.parametrize('seed, rounds, pattern, stops_at', [
    (3, 12, 'aaRaRRR', 7), (5, 12, 'aRRaaaRaRRaR', None),
    (3, 7, 'aaRaRRR', None)])  # the count complete in the last round: every round ran
def test_a_run_stops_after_max_rejected_rounds_in_a_row(tmp_path, seed, rounds, pattern,
                                                         stops_at):
  """A run whose every round is rejected changed nothing and went on to its last round (days
  of a pod's time, on a long run). Clients 0 and 1 are poisoned, one client a round: rejected
  rounds (R) come where they are sampled; three in a row stop the run, with its checkpoint of
  that round; an accepted round (a) between them starts the count again."""
  from fathom_sim.train import Diverged
  data, workdir = str(tmp_path / 'data'), str(tmp_path / 'run')
  _npz_with_bad_clients(data, bad=[0, 1])
  config = _npz_config(data, cohort_size=1, num_rounds=rounds, seed=seed, algorithm='fedavg',
                       max_rejected_rounds=3)
  if stops_at is None:
    assert train_and_evaluate(config, workdir)['rounds'] == rounds
  else:
    with pytest.raises(Diverged, match=rf'^rounds {stops_at - 2}..{stops_at} were all rejected '
                       r'\(3 in a row, config.max_rejected_rounds; 0 never stops\): .* its '
                       rf'checkpoint of round {stops_at} saved. A smaller eta, or another seed'):
      train_and_evaluate(config, workdir)
    assert str(stops_at) in os.listdir(os.path.join(workdir, 'checkpoints'))
    assert not os.path.exists(os.path.join(workdir, 'summary.json'))
  assert ''.join('a' if r['accepted'] else 'R' for r in read_rows(workdir)) == pattern
  if stops_at is not None:  # 0 never stops: the same run resumed goes on to its end
    config.max_rejected_rounds = 0
    summary = train_and_evaluate(config, workdir)
    assert summary['rounds'] == 12 and summary['resumed_from'] == stops_at


def test_a_run_stopped_by_its_hyper_step_is_told_so_not_to_lower_eta(tmp_path):
  """eta_h 1e38: every client's update is finite, phi's step is not, and every round is
  rejected. The run's last line said "no finite update" and advised a smaller eta, which
  FATHOM had already halved each round to no avail."""
  from fathom_sim.train import Diverged
  config = _tiny(algorithm='fathom', eta_h=1e38, num_rounds=6, max_rejected_rounds=2)
  with pytest.raises(Diverged, match=r"^rounds 1..2 were all rejected \(2 in a row, .*\): the "
                     r"clients' updates were finite but the server or hyper step was not .*"
                     r"A smaller eta_h \(FATHOM's steps on phi\) or server_lr, or another seed"):
    train_and_evaluate(config, str(tmp_path / 'run'))
  assert [r['dropped_clients'] for r in read_rows(str(tmp_path / 'run'))] == [0, 0]


def test_the_count_of_rejected_rounds_carries_over_a_resume(tmp_path):
  """Stopped within a streak of rejected rounds and resumed, a run stops where the
  uninterrupted one does (seed 3: 'aaRaRRR' stops at round 7): the checkpoint keeps the
  count. (Counted from the resume, it went on past round 7, halving eta again.)"""
  from fathom_sim.train import Diverged
  data, workdir = str(tmp_path / 'data'), str(tmp_path / 'run')
  _npz_with_bad_clients(data, bad=[0, 1])
  config = _npz_config(data, cohort_size=1, num_rounds=6, seed=3, algorithm='fedavg',
                       max_rejected_rounds=3)
  train_and_evaluate(config, workdir)  # rounds 5 and 6 rejected
  config.num_rounds = 12
  with pytest.raises(Diverged, match=r'^rounds 5..7 were all rejected'):
    train_and_evaluate(config, workdir)
  assert ''.join('a' if r['accepted'] else 'R' for r in read_rows(workdir)) == 'aaRaRRR'


def test_a_diverged_run_is_one_line_and_exit_3(tmp_path):
  from tests.test_cli import launch
  data = str(tmp_path / 'data')
  # (Finite but overflowing: training data whose every client holds NaN is refused at load.)
  _npz_with_bad_clients(data, bad=[0, 1, 2, 3], poison=3e38)
  p = launch(f'--config={QUICKSTART}', f'--workdir={tmp_path / "run"}', '--config.data.name=npz',
             f'--config.data.path={data}', '--config.data.num_classes=10',
             '--config.cohort_size=4', '--config.num_rounds=9', '--config.max_rejected_rounds=2')
  assert p.returncode == 3 and 'Traceback' not in p.stderr, p.stderr[-2000:]
  errors = [line for line in p.stderr.splitlines() if line.startswith('error:')]
  assert len(errors) == 1 and errors[0].startswith('error: rounds 1..2 were all rejected'), errors


def test_round_with_no_finite_update_changes_nothing_and_halves_eta(tmp_path, caplog):
  data = str(tmp_path / 'data')
  _npz_with_bad_clients(data, bad=[0, 1, 2, 3], poison=3e38)  # every update overflows
  from fathom_sim.run import build, init_state
  config = _npz_config(data)
  run = build(config)
  state0 = jax.device_get(init_state(run))
  with caplog.at_level('WARNING'):
    summary = train_and_evaluate(config, str(tmp_path / 'run'))
  rows = read_rows(str(tmp_path / 'run'))
  assert not any(r['accepted'] for r in rows)
  # No client counted: no loss or h_local measured (they read 0.0, a perfect loss, before).
  assert all(r['train_loss'] is None and r['h_local'] is None for r in rows)
  said = [r.getMessage() for r in caplog.records if 'rejected' in r.getMessage()]
  assert len(said) == len(rows) and all('no client returned a finite update' in m for m in said)
  np.testing.assert_allclose([r['eta'] for r in rows], [0.05 / 2 ** k for k in range(4)],
                             rtol=1e-5)
  from fathom_sim.metrics import params_digest
  assert summary['final']['params_sha256'] == params_digest(state0.params)[1]


def test_a_round_whose_server_optimizer_state_overflows_is_rejected():
  """A finite but huge Delta (|Delta_j| > 1.8e19) overflows server Adam's second moment to inf
  while its step is 0 and the params stay finite. The round used to be accepted and the inf
  kept, freezing those coordinates for good; the whole state must stay finite."""
  from tests.common import run_rounds, tiny_task
  config = tiny_config(algorithm='fedavg', eta=1e21, epochs=0.01, batch_size=3.0,
                       server_optimizer='adam', server_lr=0.05, num_rounds=2)
  state, history, _ = run_rounds(config, tiny_task(), 2)
  assert not any(bool(m.accepted) for m, _ in history)
  assert all(np.isfinite(leaf).all() for leaf in jax.tree.leaves(state))


def test_the_progress_line_says_an_eta_it_cannot_print_as_unknown():
  """A crawl through 2^31 - 1 rounds put the ETA past timedelta's range: an OverflowError at
  round 10, after the run had written its files."""
  from fathom_sim import metrics
  row = {'round': 10, 'train_loss': 0.5, 'eta': 0.1, 'epochs': 1.0, 'batch_size': 0.0341,
         'batch_size_int': 1, 'h_glob': 0.1, 'h_local': -0.2}
  assert '| ETA ? |' in metrics.progress_line(row, 2**31 - 1, 1e-6)
  assert '| ETA ? |' in metrics.progress_line(row, 20, 0.0)
  assert '| ETA 0:00:05 |' in metrics.progress_line(row, 20, 2.0)
  # FATHOM's real B may drift far below 1 (the quickstart's does): the batch used is beside it.
  assert ' B 0.0341 (1 used) | ' in metrics.progress_line(row, 20, 2.0)


def test_metrics_rows_read_plain_or_gzipped_up_to_a_torn_line_and_kept_to_a_round(tmp_path):
  import gzip
  from fathom_sim import metrics
  text = ''.join(json.dumps({'round': t}) + '\n' for t in (1, 2, 3)) + '{"round": 4, "tr'
  plain = tmp_path / metrics.METRICS_FILE
  plain.write_text(text)
  with gzip.open(str(plain) + '.gz', 'wt') as f:
    f.write(text)
  for path in (str(plain), str(plain) + '.gz'):
    assert [r['round'] for r in metrics.read_rows(path)] == [1, 2, 3]
  log = metrics.RowLog()
  assert metrics.keep_rows(str(tmp_path), 2, into=log) is False
  assert plain.read_text() == '{"round": 1}\n{"round": 2}\n' and log.last == {'round': 2}
  # The evaluation of one round dropped; fields added to the last kept row.
  plain.write_text(''.join(json.dumps({'round': t, 'test_accuracy': t / 10}) + '\n'
                           for t in (1, 2, 3)))
  assert metrics.keep_rows(str(tmp_path), 3, drop_eval_at=2, amend={'x': 1}) is True
  assert metrics.read_rows(str(plain)) == [{'round': 1, 'test_accuracy': 0.1}, {'round': 2},
                                           {'round': 3, 'test_accuracy': 0.3, 'x': 1}]
  assert metrics.keep_rows(str(tmp_path), 3, drop_eval_at=2) is False  # nothing left to drop
  assert sorted(os.listdir(tmp_path)) == [metrics.METRICS_FILE, metrics.METRICS_FILE + '.gz']


def test_rows_past_the_checkpoint_are_cut_in_place_without_a_copy(tmp_path, monkeypatch):
  """A resume rewrote the whole metrics.jsonl through a copy beside it: minutes and a second
  file's room for a long run's gigabytes, and on a disk without that room the run could not
  resume. Where no kept row changes it is now cut after the last kept row, in place; a last
  kept row without its line break, or a row that changes, still goes through a copy."""
  from fathom_sim import metrics
  path = tmp_path / metrics.METRICS_FILE
  kept = ''.join(json.dumps({'round': t, 'test_accuracy': 0.5}) + '\n' for t in (1, 2, 3))
  path.write_text(kept + '\n' + json.dumps({'round': 4}) + '\n{"round": 5, "tr')
  inode = os.stat(path).st_ino

  def no_room(_):
    raise AssertionError('copied')

  with monkeypatch.context() as m:
    m.setattr(metrics, 'replaced', no_room)
    log = metrics.RowLog(0.4)
    assert metrics.keep_rows(str(tmp_path), 3, into=log) is False
    assert metrics.keep_rows(str(tmp_path), 3) is False  # nothing past it: left as it is
  assert path.read_text() == kept and os.stat(path).st_ino == inode
  assert log.last['round'] == 3 and log.reached['round'] == 1
  # The last kept row's line break torn off (the next row would join its line): put back in
  # place too. Rows ended by '\r' or '\r\n' (an edited file) are rows, each kept as it was.
  with monkeypatch.context() as m:
    m.setattr(metrics, 'replaced', no_room)
    path.write_text(kept[:-1])
    metrics.keep_rows(str(tmp_path), 3)
    assert path.read_text() == kept
    for ending in ('\r', '\r\n'):
      path.write_bytes((kept + json.dumps({'round': 4}) + '\n').replace('\n', ending).encode())
      metrics.keep_rows(str(tmp_path), 3)
      assert path.read_bytes() == kept.replace('\n', ending).encode()
      assert [r['round'] for r in metrics.read_rows(str(path))] == [1, 2, 3]
  # A read that fails (EIO on a mount) is one line naming the file, which stays as it was.
  path.write_text(kept)

  def failing(f):
    raise OSError(errno.EIO, 'Input/output error')

  with monkeypatch.context() as m:
    m.setattr(metrics, '_lines', failing)
    from fathom_sim.errors import OutputError
    with pytest.raises(OutputError, match=f'{path} could not be read \\(Input/output error\\)'):
      metrics.keep_rows(str(tmp_path), 2)
  assert path.read_text() == kept
  # A row that changes goes through the copy, which a kill leaves as it was.
  path.write_text(kept + json.dumps({'round': 4}) + '\n')
  with monkeypatch.context() as m:
    m.setattr(metrics, 'replaced', no_room)
    with pytest.raises(AssertionError, match='copied'):
      metrics.keep_rows(str(tmp_path), 3, drop_eval_at=3)
  assert path.read_text() == kept + json.dumps({'round': 4}) + '\n'
  assert metrics.keep_rows(str(tmp_path), 3, drop_eval_at=3) is True
  assert metrics.read_rows(str(path))[-1] == {'round': 3}
  # Only the changed rows are written anew; the others' bytes are kept as they were.
  path.write_text(kept[:-1])
  assert metrics.keep_rows(str(tmp_path), 3, drop_eval_at=2, amend={'x': 1}) is True
  lines = kept.splitlines(keepends=True)
  assert path.read_text() == (lines[0] + json.dumps({'round': 2}) + '\n'
                              + json.dumps({'round': 3, 'test_accuracy': 0.5, 'x': 1}) + '\n')
  assert sorted(os.listdir(tmp_path)) == [metrics.METRICS_FILE]
  (tmp_path / metrics.METRICS_FILE).unlink()  # none yet: made empty, for the writer
  assert metrics.keep_rows(str(tmp_path), 0, check=False) is False
  assert path.read_text() == ''


@pytest.mark.parametrize('rounds, said', [
    ([1, 2, 3, 4, 5], None),
    ([1, 2, 4, 5], 'round 4 follows round 2'),
    ([2, 3, 4], 'the first row is round 2'),
    ([1, 2, 2, 3, 4], 'round 2 follows round 2'),
    ([1, 2], 'the last row is round 2'),
    ([1, 2, 5, 3, 4], 'the last row is round 2'),  # rounds 3, 4 after 5 are not redone
    ([], 'it holds no row')])
def test_rows_missing_before_the_checkpoint_are_said(tmp_path, caplog, rounds, said):
  """Rows are flushed before their round's checkpoint, so a kill never loses one; a filesystem
  that lost writes, or an edited file, can leave a checkpoint of round 4 beside rows with a
  gap. The run used to go on with the gap in silence (its rounds_to_target then counted from
  rows that are not there)."""
  from fathom_sim import metrics
  (tmp_path / metrics.METRICS_FILE).write_text(
      ''.join(json.dumps({'round': t}) + '\n' for t in rounds + [5, 6]))
  with caplog.at_level('INFO'):
    metrics.keep_rows(str(tmp_path), 4)
  warned = [r.getMessage() for r in caplog.records if r.levelname == 'WARNING']
  assert warned == ([] if said is None else [
      f'{tmp_path / metrics.METRICS_FILE} does not hold the rows of rounds 1..4 once each, in '
      f'order ({said}); the run goes on from its checkpoint of round 4, with its rows as they are'])
  # Rows past the checkpoint are dropped, and said to be: the rounds to run again.
  import itertools
  assert [r['round'] for r in metrics.read_rows(str(tmp_path / metrics.METRICS_FILE))] == list(
      itertools.takewhile(lambda t: t <= 4, rounds))
  redone = sum(t > 4 for t in rounds + [5, 6])
  assert f'{redone} row(s) past the checkpoint of round 4 dropped' in caplog.text
  # The amending call of a resumed run made again checks nothing a second time.
  caplog.clear()
  (tmp_path / metrics.METRICS_FILE).write_text(
      ''.join(json.dumps({'round': t}) + '\n' for t in rounds))
  metrics.keep_rows(str(tmp_path), 4, amend={'x': 1}, check=False)
  assert not [r for r in caplog.records if r.levelname == 'WARNING']


def test_the_rows_of_a_checkpoint_are_synced_to_the_disk_before_it_is_saved(tmp_path,
                                                                            monkeypatch):
  """Rows flushed by a write stay in the page cache (on a gcsfuse mount, in its local staging
  file until the file is closed): a machine lost after a checkpoint was saved could leave it
  beside rows that never reached the disk or the bucket. Each save now follows an fsync of the
  rows up to its round; a sync that fails is one OutputError naming the file."""
  from fathom_sim import metrics
  from fathom_sim.checkpoint import Checkpointer
  from fathom_sim.errors import OutputError
  events, fsync, save = [], os.fsync, Checkpointer.save
  path = os.path.realpath(tmp_path / metrics.METRICS_FILE)

  def recording_fsync(fd):
    if os.path.realpath(f'/proc/self/fd/{fd}') == path:
      events.append(('synced', [r['round'] for r in metrics.read_rows(path)]))
    return fsync(fd)

  def recording_save(self, state, meta, **kwargs):
    events.append(('saved', meta['round']))
    return save(self, state, meta, **kwargs)

  monkeypatch.setattr(os, 'fsync', recording_fsync)
  monkeypatch.setattr(Checkpointer, 'save', recording_save)
  train_and_evaluate(_tiny(num_rounds=5, checkpoint_every=2, eval_every=2), str(tmp_path))
  assert events == [('synced', [1, 2]), ('saved', 2), ('synced', [1, 2, 3, 4]), ('saved', 4),
                    ('synced', [1, 2, 3, 4, 5]), ('saved', 5)]

  def failing_fsync(code):
    def fail(fd):
      raise OSError(code, os.strerror(code))
    return fail

  writer = metrics.MetricsWriter(str(tmp_path))
  monkeypatch.setattr(os, 'fsync', failing_fsync(errno.EINVAL))  # a pipe: nothing to sync
  writer.sync()
  monkeypatch.setattr(os, 'fsync', failing_fsync(errno.EIO))
  with pytest.raises(OutputError, match=re.escape(f'{writer.path} cannot be written '
                                                  '(Input/output error)')):
    writer.sync()
  writer.close()


def test_a_file_written_whole_is_synced_before_it_replaces_the_old_one(tmp_path, monkeypatch):
  """summary.json, config.json and a resume's metrics.jsonl replace the old file by a rename;
  a filesystem may put the rename on the disk before the data (a power loss then leaves an
  empty file where the old one was), unless the new file was synced first."""
  from fathom_sim import metrics
  events, fsync, replace = [], os.fsync, os.replace

  def recording_fsync(fd):
    events.append(('synced', os.path.basename(os.path.realpath(f'/proc/self/fd/{fd}'))))
    return fsync(fd)

  def recording_replace(src, dst):
    events.append(('renamed', os.path.basename(src)))
    return replace(src, dst)

  monkeypatch.setattr(os, 'fsync', recording_fsync)
  monkeypatch.setattr(os, 'replace', recording_replace)
  metrics.write_json(str(tmp_path / 'summary.json'), {'rounds': 3})
  assert events == [('synced', 'summary.json.tmp'), ('renamed', 'summary.json.tmp'),
                    ('synced', os.path.basename(os.path.realpath(tmp_path)))]  # the rename
  assert json.loads((tmp_path / 'summary.json').read_text()) == {'rounds': 3}


@pytest.mark.parametrize('bad', ['xx', '[1, 2]', '{"loss": 1}'])
def test_a_damaged_row_before_others_is_refused_and_no_row_is_lost(tmp_path, bad):
  """Only a last line can be a torn write: a resume cutting the file at a damaged line in the
  middle would delete every round after it for good (the checkpoint and summary are past it)."""
  from fathom_sim import metrics
  from fathom_sim.data import DataError
  workdir = str(tmp_path / 'run')
  train_and_evaluate(_tiny(num_rounds=10), workdir)
  path = os.path.join(workdir, metrics.METRICS_FILE)
  lines = open(path).read().split('\n')
  lines[4] = bad
  damaged = '\n'.join(lines)
  with open(path, 'w') as f:
    f.write(damaged)
  config = open(os.path.join(workdir, 'config.json')).read()
  with pytest.raises(DataError, match=f'{path}: line 5 is not a row of a run .*rows follow it'):
    train_and_evaluate(_tiny(num_rounds=20), workdir)
  assert open(path).read() == damaged
  # (config.json said 20 rounds: the file mended, the first command found the run
  # unfinished, and summarised it again, losing its compiles and resumed_from.)
  assert open(os.path.join(workdir, 'config.json')).read() == config
  if bad == 'xx':  # the same line last is a torn write: the rows before it are kept
    with open(path, 'w') as f:
      f.write('\n'.join(lines[:5]))
    assert [r['round'] for r in metrics.read_rows(path)] == [1, 2, 3, 4]


def test_a_command_stopped_before_it_takes_the_run_further_leaves_its_rows_uncut(tmp_path,
                                                                                 monkeypatch):
  """A run's rows were cut (round 10's last-round evaluation dropped, for a run going on to
  20) before config.json said 20 rounds: stopped in between, the run looked finished at 10,
  that evaluation gone from its rows for good."""
  from fathom_sim import metrics
  from fathom_sim import workdir as workdir_lib

  class Stopped(Exception):
    pass

  def stopped(*args):
    raise Stopped

  workdir = str(tmp_path / 'run')
  train_and_evaluate(_tiny(num_rounds=10, eval_every=3, checkpoint_every=5), workdir)
  path = os.path.join(workdir, metrics.METRICS_FILE)
  rows, config = open(path).read(), open(os.path.join(workdir, 'config.json')).read()
  assert 'test_accuracy' in json.loads(rows.splitlines()[-1])
  monkeypatch.setattr(workdir_lib, 'save_config', stopped)
  with pytest.raises(Stopped):
    train_and_evaluate(_tiny(num_rounds=20, eval_every=3, checkpoint_every=5), workdir)
  assert open(path).read() == rows
  assert open(os.path.join(workdir, 'config.json')).read() == config

@pytest.mark.parametrize('bad', ['{"round": true}', '{"round": 2.0}', '{"round": "2"}',
                                 '{"round": null}'])
def test_a_row_whose_round_is_no_integer_is_no_row(tmp_path, bad):
  """JSON's true reads as a Python int: it passed for round 1, and a report took it as such."""
  from fathom_sim import metrics
  from fathom_sim.data import DataError
  path = str(tmp_path / metrics.METRICS_FILE)
  with open(path, 'w') as f:
    f.write('{"round": 1}\n' + bad + '\n{"round": 3}\n')
  with pytest.raises(DataError, match=f'{path}: line 2 is not a row of a run .*rows follow it'):
    metrics.read_rows(path)
  with open(path, 'w') as f:  # whole JSON, last: still no torn write
    f.write('{"round": 1}\n' + bad + '\n')
  with pytest.raises(DataError, match=f'{path}: line 2 is not a row of a run'):
    metrics.read_rows(path)


def test_a_field_the_run_does_not_read_may_change_on_resume(tmp_path):
  """FATHOM's fields under FedAvg (another dataset's, server optimizer's) change nothing: a
  resume that changes them goes on from its checkpoint to the uninterrupted run's model and
  rows, and a finished run relaunched so is left as it was. Not so alpha, which FedAvg's
  logged h_glob reads, nor hyper_optimizer, whose state the checkpoint holds. Under FATHOM
  they are the run's identity, and so is the algorithm that decides what is read."""
  from fathom_sim import workdir as workdir_lib
  fedavg = dict(algorithm='fedavg', num_rounds=4, checkpoint_every=2)
  straight = train_and_evaluate(_tiny(**fedavg), str(tmp_path / 'straight'))
  workdir = str(tmp_path / 'run')
  train_and_evaluate(_tiny(**{**fedavg, 'num_rounds': 2}), workdir)
  other = dict(eta_h=0.5, upper_eta=0.01, clip_log_params=True, server_b1=0.5,
               **{'data.path': 'x.npz'})
  for refused, value in (('alpha', 0.9), ('hyper_optimizer', 'adam')):
    with pytest.raises(WorkdirError, match=f'differ: {refused} ') as e:
      train_and_evaluate(_tiny(**fedavg, **{refused: value}), workdir)
    # why, where a warning may have said FedAvg does not read it
    assert (refused == 'hyper_optimizer') == (
        "('sgd' -> 'adam', whose state the checkpoint holds)" in str(e.value))
  resumed = train_and_evaluate(_tiny(**fedavg, **other), workdir)
  assert resumed['resumed_from'] == 2
  assert not os.path.exists(os.path.join(workdir, 'unreadable_checkpoints'))
  assert resumed['final']['params_sha256'] == straight['final']['params_sha256']
  assert _without_timing(read_rows(workdir)) == _without_timing(
      read_rows(str(tmp_path / 'straight')))
  assert json.load(open(os.path.join(workdir, 'config.json')))['eta_h'] == 0.5
  files = [open(os.path.join(workdir, f)).read() for f in ('config.json', 'summary.json')]
  assert train_and_evaluate(_tiny(**fedavg, eta_h=0.7), workdir) == json.loads(files[1])
  assert [open(os.path.join(workdir, f)).read()
          for f in ('config.json', 'summary.json')] == files  # finished: nothing new asked
  fathom = str(tmp_path / 'fathom')
  os.makedirs(fathom)
  workdir_lib.save_config(fathom, _tiny(num_rounds=2))
  (tmp_path / 'fathom' / 'metrics.jsonl').write_text('{"round": 1}\n')  # a run with a result
  with pytest.raises(WorkdirError, match=r"fields that change the result differ: "
                     r"clip_log_params \(False -> True\), eta_h \(0.01 -> 0.5\), upper_eta"):
    workdir_lib.check_same_run(fathom, _tiny(num_rounds=2, **other))
  with pytest.raises(WorkdirError, match=r"differ: algorithm \('fathom' -> 'fedavg'\); use "
                     r"another workdir$"):
    workdir_lib.check_same_run(fathom, _tiny(**fedavg, **other))
  (tmp_path / 'fathom' / 'config.json').write_text('[]')
  with pytest.raises(WorkdirError, match=r"config.json is unreadable \(a JSON list, where a "
                     r"config is an object\)"):
    workdir_lib.check_same_run(fathom, _tiny(num_rounds=2))


def test_config_json_is_replaced_whole_or_not_at_all(tmp_path, monkeypatch):
  """Another host's process reads config.json while process 0 writes it, and a run killed
  while writing it must stay resumable: it is never seen truncated (a multi-host test once
  read it empty and refused the run as unreadable)."""
  import ml_collections
  from fathom_sim import workdir as workdir_lib
  config = _tiny(num_rounds=3)
  workdir_lib.save_config(str(tmp_path), config)
  before = (tmp_path / 'config.json').read_text()

  def broken(self, **kwargs):
    raise RuntimeError('killed while writing')

  monkeypatch.setattr(ml_collections.ConfigDict, 'to_json_best_effort', broken)
  with pytest.raises(RuntimeError):
    workdir_lib.save_config(str(tmp_path), config)
  assert (tmp_path / 'config.json').read_text() == before


def _out_of_memory():
  return jax.errors.JaxRuntimeError('RESOURCE_EXHAUSTED: Out of memory allocating 123456 bytes.')


@pytest.mark.parametrize('lanes', [1, 2])
def test_a_round_out_of_memory_keeps_the_checkpoint_and_the_run_resumes(tmp_path, monkeypatch,
                                                                        lanes):
  """XLA's error in round 15 (as a device too small for the round would raise it) becomes one
  error naming the round and the fields; round 10's checkpoint stays, and the same command
  finishes the run as if nothing had happened."""
  from fathom_sim.driver import Rounds
  from fathom_sim.failures import OutOfMemory
  straight = train_and_evaluate(_tiny(lanes_per_device=lanes), str(tmp_path / 'straight'))
  workdir = str(tmp_path / 'run')
  real_round = Rounds.__call__

  def round_or_out_of_memory(self, state, t, hp):
    if t == 15:
      raise _out_of_memory()
    return real_round(self, state, t, hp)

  with monkeypatch.context() as patch:
    patch.setattr(Rounds, '__call__', round_or_out_of_memory)
    with pytest.raises(OutOfMemory) as raised:
      train_and_evaluate(_tiny(lanes_per_device=lanes), workdir)
  message, row = str(raised.value), read_rows(str(tmp_path / 'straight'))[14]
  b, b_int = row['batch_size'], row['batch_size_int']  # round 15's, as FATHOM moved it
  assert b_int == 1  # (so the message says "example")
  assert message.startswith('round 15 ran out of memory on 2 cpu device(s) (XLA: '
                            'RESOURCE_EXHAUSTED: Out of memory allocating 123456 bytes.) with '
                            f'B {b:.6g} (1 example a local step), config.cohort_size=4 '
                            f'clients, {lanes} side by side per device (each with its copy '
                            'of the model); '
                            + ('a smaller config.lanes_per_device (now 2) resumes this workdir; '
                               if lanes > 1 else '')
                            + 'a smaller config.upper_batch_size or config.cohort_size, a '
                            'smaller model (config.model), or'), message
  assert message.endswith('the workdir keeps the checkpoint of round 10')
  assert os.listdir(os.path.join(workdir, 'checkpoints')) == ['10']  # no pending save lost
  assert [r['round'] for r in read_rows(workdir)] == list(range(1, 15))
  resumed = train_and_evaluate(_tiny(lanes_per_device=lanes), workdir)
  assert resumed['resumed_from'] == 10
  assert resumed['final'] == straight['final']
  assert _without_timing(read_rows(workdir)) == _without_timing(
      read_rows(str(tmp_path / 'straight')))


def test_a_run_ended_by_bad_data_finishes_its_pending_checkpoint(tmp_path, monkeypatch):
  """A record found bad in round 5 ends the run (one DataError) right after round 4's save
  started: that save is finished, not left as a temporary folder, and the run resumes there."""
  from fathom_sim.data import DataError
  from fathom_sim.driver import Rounds
  real_round = Rounds.__call__

  def round_or_bad_record(self, state, t, hp):
    if t == 5:
      raise DataError('record 7 of train.array_record-00000 cannot be read')
    return real_round(self, state, t, hp)

  workdir = str(tmp_path / 'run')
  with monkeypatch.context() as patch:
    patch.setattr(Rounds, '__call__', round_or_bad_record)
    with pytest.raises(DataError, match='record 7'):
      train_and_evaluate(_tiny(checkpoint_every=1), workdir)
    assert sorted(os.listdir(os.path.join(workdir, 'checkpoints'))) == ['2', '3', '4']
  assert [r['round'] for r in read_rows(workdir)] == [1, 2, 3, 4]
  assert train_and_evaluate(_tiny(checkpoint_every=1), workdir)['resumed_from'] == 4


def test_vectorised_seeds_out_of_memory_keep_each_checkpoint(tmp_path, monkeypatch):
  from fathom_sim.driver import Rounds
  from fathom_sim.failures import OutOfMemory
  from fathom_sim.train import train_seeds
  real_round = Rounds.__call__

  def round_or_out_of_memory(self, state, t, hp):
    if t == 12:
      raise _out_of_memory()
    return real_round(self, state, t, hp)

  workdirs = [str(tmp_path / f'seed{s}') for s in (3, 4)]
  monkeypatch.setattr(Rounds, '__call__', round_or_out_of_memory)
  with pytest.raises(OutOfMemory, match=r'^round 12 ran out of memory .* with B \S+ \(\d+ '
                     r'examples? a local step\).* side by side per device \(each with its '
                     r'copy of the model\);.* a smaller model \(config.model\).*; fewer seeds '
                     r'side by side \(2 now: launch/'
                     r'sweep.py without --vmap_seeds\) resume these workdirs; each workdir '
                     'keeps the checkpoint of round 10$'):
    train_seeds([_tiny(seed=3), _tiny(seed=4)], workdirs)
  for workdir in workdirs:
    assert os.listdir(os.path.join(workdir, 'checkpoints')) == ['10']
    assert [r['round'] for r in read_rows(workdir)] == list(range(1, 12))


def test_the_checkpoints_an_out_of_memory_error_names_are_read_from_the_workdirs(tmp_path):
  from fathom_sim.failures import checkpoints_kept
  a, b, fresh = tmp_path / 'a', tmp_path / 'b', tmp_path / 'fresh'
  for path in ('a/checkpoints/10', 'a/checkpoints/20', 'a/checkpoints/30.orbax-checkpoint-tmp',
               'b/checkpoints/10', 'fresh'):
    (tmp_path / path).mkdir(parents=True)
  assert checkpoints_kept([str(a)]) == 'the workdir keeps the checkpoint of round 20'
  assert checkpoints_kept([str(a), str(a)]) == 'each workdir keeps the checkpoint of round 20'
  assert checkpoints_kept([str(a), str(b), str(fresh)]) == (
      'the workdirs keep the checkpoints of rounds 20, 10, none')
  assert checkpoints_kept([str(fresh)]) == 'no round was checkpointed yet'


def test_an_evaluation_out_of_memory_names_eval_batch_size_and_a_smaller_one_resumes(
    tmp_path, monkeypatch):
  from fathom_sim.evaluation import Evaluator
  from fathom_sim.failures import OutOfMemory
  workdir = str(tmp_path / 'run')
  real_evaluate, calls = Evaluator.__call__, []

  def evaluate_or_out_of_memory(self, *args, **kwargs):
    calls.append(1)
    if len(calls) == 2:  # round 20's
      raise _out_of_memory()
    return real_evaluate(self, *args, **kwargs)

  with monkeypatch.context() as patch:
    patch.setattr(Evaluator, '__call__', evaluate_or_out_of_memory)
    with pytest.raises(OutOfMemory, match=r'^the evaluation after round 20 ran out of memory .* '
                       r'in batches of 15 examples \(config.eval_batch_size=1024, no more '
                       r'than the test set holds\); a config.eval_batch_size below 15 resumes '
                       r'this workdir; the workdir keeps the checkpoint of round 10$'):
      train_and_evaluate(_tiny(), workdir)
    # (The tiny test set's 15 examples are the batch.) Within a test set, the field's value.
    import types
    from fathom_sim import failures
    from fathom_sim.mesh import make_mesh
    run = types.SimpleNamespace(config=_tiny(eval_batch_size=100), mesh=make_mesh(1),
                                lanes_per_device=1, task=types.SimpleNamespace(
                                    test=types.SimpleNamespace(num_examples=[300, 200])))
    assert failures.out_of_memory_message(run, {'what': 'evaluation', 'round': 5}, 'XLA') == (
        'the evaluation after round 5 ran out of memory on 1 cpu device(s) (XLA) in batches of '
        '100 examples (config.eval_batch_size=100); a config.eval_batch_size below 100 resumes '
        'this workdir')
  resumed = train_and_evaluate(_tiny(eval_batch_size=64), workdir)
  assert resumed['resumed_from'] == 10 and resumed['rounds'] == 30


def test_a_checkpoint_too_large_for_the_device_is_not_set_aside(tmp_path, monkeypatch):
  """Restoring can run out of device memory too: that says nothing of the checkpoint's files,
  which stay where they are (not moved aside as unreadable) for a run with more memory."""
  import orbax.checkpoint as ocp
  from fathom_sim.failures import OutOfMemory
  workdir = str(tmp_path / 'run')
  train_and_evaluate(_tiny(num_rounds=20), workdir)

  def restore(self, *args, **kwargs):
    raise _out_of_memory()

  with monkeypatch.context() as patch:
    patch.setattr(ocp.CheckpointManager, 'restore', restore)
    with pytest.raises(OutOfMemory, match=r'^restoring the checkpoint ran out of memory on 2 '
                       r'cpu device\(s\) \(XLA: RESOURCE_EXHAUSTED: .*\); a device with more '
                       'memory resumes it; the workdir keeps the checkpoint of round 20$'):
      train_and_evaluate(_tiny(num_rounds=30), workdir)
  assert sorted(os.listdir(os.path.join(workdir, 'checkpoints'))) == ['10', '20']
  assert not os.path.exists(os.path.join(workdir, 'unreadable_checkpoints'))
  assert train_and_evaluate(_tiny(num_rounds=30), workdir)['resumed_from'] == 20


@pytest.mark.parametrize('name,make', [('checkpoints', 'file'), ('metrics.jsonl', 'folder'),
                                       ('summary.json', 'folder'), ('.lock', 'folder')])
def test_a_run_file_of_the_wrong_kind_is_refused_and_the_run_left_as_it_was(tmp_path, name,
                                                                           make):
  """A file named checkpoints: the run restarted from round 0 without a word, cut its rows,
  then hung on orbax's failing background save. A folder named metrics.jsonl or summary.json
  ended in a traceback."""
  import shutil
  workdir = tmp_path / 'run'
  train_and_evaluate(_tiny(num_rounds=2), str(workdir))
  path = workdir / name
  shutil.rmtree(path) if path.is_dir() else path.unlink()
  path.write_text('x') if make == 'file' else path.mkdir()
  before = {f: (workdir / f).read_bytes() for f in os.listdir(workdir)
            if (workdir / f).is_file()}
  with pytest.raises(WorkdirError, match=f'{name} is a {make}, where a run keeps its {name}'):
    train_and_evaluate(_tiny(num_rounds=3), str(workdir))
  assert {f: (workdir / f).read_bytes() for f in os.listdir(workdir)
          if (workdir / f).is_file()} == before


def test_out_of_memory_outside_a_compiled_program_is_recognised():
  """Eager operations raise XLA's RESOURCE_EXHAUSTED as a plain ValueError (a label of 1e9
  made fathom.init's zeros_like fail so, with a traceback), and numpy a MemoryError; errors
  of ours that quote it are not converted again."""
  from fathom_sim.config import ConfigError
  from fathom_sim.mesh import out_of_memory
  assert out_of_memory(ValueError('RESOURCE_EXHAUSTED: Out of memory allocating 8 bytes.\nx')) \
      == 'XLA: RESOURCE_EXHAUSTED: Out of memory allocating 8 bytes.'
  assert out_of_memory(MemoryError('Unable to allocate 22.3 GiB')) == \
      'host: Unable to allocate 22.3 GiB'
  assert out_of_memory(ConfigError('round 1 ran out of memory (XLA: RESOURCE_EXHAUSTED)')) is None
  assert out_of_memory(ValueError('no memory talk')) is None


def test_the_first_state_out_of_memory_in_an_eager_operation_is_one_error(tmp_path, monkeypatch):
  from fathom_sim import book
  from fathom_sim.failures import OutOfMemory

  def eager_out_of_memory(run):
    raise ValueError('RESOURCE_EXHAUSTED: Out of memory while trying to allocate 4000000000 '
                     'bytes.')

  real_init = book.init_state
  monkeypatch.setattr(book, 'init_state', eager_out_of_memory)
  with pytest.raises(OutOfMemory, match=r"^the model's first state ran out of memory on \d+ cpu "
                                        r'device\(s\) \(XLA: RESOURCE_EXHAUSTED.*; a smaller '
                                        r'model .* starts afresh in this workdir'):
    train_and_evaluate(_tiny(num_rounds=2), str(tmp_path / 'run'))
  # The workdir holds the refused run's config.json and no round (a run killed in its first
  # compile leaves an empty metrics.jsonl and checkpoints/ too): the smaller model's command
  # runs there (it was refused as "a run with a different config"), and its config is saved.
  assert sorted(os.listdir(tmp_path / 'run')) == ['.lock', 'config.json']
  (tmp_path / 'run' / 'checkpoints').mkdir()
  (tmp_path / 'run' / 'metrics.jsonl').write_text('')
  monkeypatch.setattr(book, 'init_state', real_init)
  smaller = _tiny(num_rounds=2)
  smaller.model.hidden = (4,)
  assert train_and_evaluate(smaller, str(tmp_path / 'run'))['rounds'] == 2
  assert json.loads((tmp_path / 'run' / 'config.json').read_text())['model']['hidden'] == [4]
  # Once it has a round, another config is refused as before, and the out-of-memory message
  # does not offer this workdir.
  with pytest.raises(WorkdirError, match='holds a run with a different config'):
    train_and_evaluate(_tiny(num_rounds=3), str(tmp_path / 'run'))
  monkeypatch.setattr(book, 'init_state', eager_out_of_memory)
  with pytest.raises(OutOfMemory, match=r'a smaller model \(config.model\) needs a new '
                                        'workdir; the workdir keeps the checkpoint of round 2$'):
    train_and_evaluate(smaller, str(tmp_path / 'run'))
  # Of npz data, whose classes are a field, that field is named too.
  from fathom_sim.failures import _model_fields
  smaller.data.name = 'npz'
  assert _model_fields(smaller) == 'config.model, or fewer classes: config.data.num_classes'


def test_a_round_out_of_host_memory_names_the_host_not_a_device(tmp_path, monkeypatch):
  """numpy's MemoryError in a round (planning a huge batch) was said as a device's."""
  from fathom_sim.driver import Rounds
  from fathom_sim.failures import OutOfMemory
  real_round = Rounds.__call__

  def round_or_host_out_of_memory(self, state, t, hp):
    if t == 2:
      raise MemoryError('Unable to allocate 22.3 GiB for an array with shape (99981182, 60)')
    return real_round(self, state, t, hp)

  monkeypatch.setattr(Rounds, '__call__', round_or_host_out_of_memory)
  with pytest.raises(OutOfMemory, match=r"^round 2 ran out of the host's memory \(Unable to "
                                        r'allocate 22.3 GiB .*\); the config asks for more than '
                                        r'this machine holds: .*; no round was checkpointed yet$'):
    train_and_evaluate(_tiny(num_rounds=3), str(tmp_path / 'run'))


def _simulators_of_checkpoint(workdir, step):
  with open(os.path.join(workdir, 'checkpoints', str(step), 'meta', 'metadata')) as f:
    return json.load(f).get('simulators')


def test_each_run_records_the_simulator_that_ran_it(tmp_path, caplog):
  from fathom_sim import provenance
  workdir = str(tmp_path / 'run')
  first = train_and_evaluate(_tiny(num_rounds=3, checkpoint_every=1), workdir)
  want = [{'from_round': 0, **provenance.describe()}]
  assert first['simulators'] == want == _simulators_of_checkpoint(workdir, 3)
  assert want[0]['results_version'] == provenance.RESULTS_VERSION
  assert want[0]['jax'] == jax.__version__
  git = subprocess.run(['git', 'rev-parse', 'HEAD'], cwd=ROOT, capture_output=True, text=True)
  if git.returncode == 0:  # a checkout: its commit, '+' where tracked files were changed
    assert want[0]['commit'].rstrip('+') == git.stdout.strip()
  # The same simulator resuming adds nothing and says nothing.
  again = train_and_evaluate(_tiny(num_rounds=4, checkpoint_every=1), workdir)
  assert again['simulators'] == want and 'results version' not in caplog.text


def test_a_run_resumed_on_other_devices_records_and_says_that_it_rounds_otherwise(
    tmp_path, caplog):
  """Clients are summed lane by lane and lanes across devices: resumed with another device
  count (num_devices 0, all of them, on another machine), the rounds from there equal an
  uninterrupted run's only up to float rounding. That was nowhere said or recorded, and a
  researcher comparing params_sha256 would take the run for broken, or for bitwise equal."""
  workdir = str(tmp_path / 'run')
  first = train_and_evaluate(_tiny(num_rounds=3, checkpoint_every=1), workdir)
  on_two = {'platform': 'cpu', 'devices': 2, 'processes': 1, 'lanes_per_device': 1,
            'batch_pad_per_octave': first['executions'][0]['batch_pad_per_octave'],
            'conv': None, 'matmul_precision': first['matmul_precision'],
            'local_loop': first['local_loop'], 'xla_flags': ''}  # (device count: not a flag)
  assert first['executions'] == [{'from_round': 0, **on_two}]
  assert set(on_two) == set(provenance.EXECUTION_FIELDS)
  again = train_and_evaluate(_tiny(num_rounds=4, checkpoint_every=1), workdir)  # the same
  assert again['executions'] == first['executions'] and 'float rounding' not in caplog.text
  resumed = train_and_evaluate(_tiny(num_rounds=6, checkpoint_every=1, num_devices=1), workdir)
  assert resumed['executions'] == [{'from_round': 0, **on_two},
                                   {'from_round': 4, **on_two, 'devices': 1}]
  assert re.search(r'resumed at round 4 with devices 2 -> 1: .* equals an uninterrupted one up '
                   r'to float rounding, not bit for bit', caplog.text)
  with open(os.path.join(workdir, 'checkpoints', '6', 'meta', 'metadata')) as f:
    assert json.load(f)['executions'] == resumed['executions']


def test_xla_flags_that_may_change_what_programs_compute_are_recorded_and_said(
    tmp_path, caplog, monkeypatch):
  """XLA_FLAGS (fast math, a GPU's deterministic ops or autotuning) may change how sums
  round, like the fields recorded before; they were nowhere recorded. XLA reads them at start,
  so here (one process) the rounds run under the first ones: what is tested is the record."""
  workdir = str(tmp_path / 'run')
  first = train_and_evaluate(_tiny(num_rounds=2, checkpoint_every=1), workdir)
  assert first['xla_flags'] == first['executions'][0]['xla_flags'] == ''
  flags = f'--xla_cpu_enable_fast_math=false --xla_dump_to={tmp_path / "dump"}'
  monkeypatch.setenv('XLA_FLAGS', f'--xla_force_host_platform_device_count=8 {flags}')
  resumed = train_and_evaluate(_tiny(num_rounds=3, checkpoint_every=1), workdir)
  assert resumed['xla_flags'] == '--xla_cpu_enable_fast_math=false'  # (a dump changes nothing)
  assert [e['xla_flags'] for e in resumed['executions']] == ['', resumed['xla_flags']]
  assert ("resumed at round 2 with xla_flags '' -> '--xla_cpu_enable_fast_math=false'"
          in caplog.text)


def test_a_field_recorded_on_one_side_only_is_unknown_there_not_a_change():
  """A checkpoint saved before xla_flags was recorded, resumed the same way otherwise, goes
  on in its stretch without a warning; resumed on other devices, the warning names the
  devices alone. The same for a field the checkpoint recorded and this simulator does not."""
  from fathom_sim import provenance
  now = {'platform': 'cpu', 'devices': 2, 'processes': 1, 'lanes_per_device': 1,
         'batch_pad_per_octave': 2, 'conv': None, 'matmul_precision': 'default',
         'local_loop': 'device', 'xla_flags': ''}
  old = {k: v for k, v in now.items() if k != 'xla_flags'}
  assert provenance.executed([{'from_round': 0, **old}], 5, now, 'w') == (
      [{'from_round': 0, **old}], None)
  runs, warning = provenance.executed([{'from_round': 0, **old}], 5, {**now, 'devices': 1}, 'w')
  assert runs == [{'from_round': 0, **old}, {'from_round': 5, **now, 'devices': 1}]
  assert 'with devices 2 -> 1:' in warning and 'xla_flags' not in warning
  # The reverse: a field the stretch recorded that this simulator no longer records.
  gone = {k: v for k, v in now.items() if k != 'local_loop'}
  assert provenance.executed([{'from_round': 0, **now}], 5, gone, 'w') == (
      [{'from_round': 0, **now}], None)
  runs, warning = provenance.executed([{'from_round': 0, **now}], 5, {**gone, 'conv': 'xla'}, 'w')
  assert runs[-1] == {'from_round': 5, **gone, 'conv': 'xla'}
  assert 'with conv None -> \'xla\':' in warning and 'local_loop' not in warning


def test_a_run_resumed_by_a_simulator_that_computes_differently_says_so(tmp_path, caplog,
                                                                        monkeypatch):
  from fathom_sim import provenance
  straight = train_and_evaluate(_tiny(num_rounds=5, checkpoint_every=1), str(tmp_path / 's'))
  workdir = str(tmp_path / 'run')
  train_and_evaluate(_tiny(num_rounds=3, checkpoint_every=1), workdir)
  before = provenance.describe()
  monkeypatch.setattr(provenance, 'RESULTS_VERSION', before['results_version'] + 1)
  monkeypatch.setattr(provenance, '_describe', provenance._describe.__wrapped__)  # uncached
  resumed = train_and_evaluate(_tiny(num_rounds=5, checkpoint_every=1), workdir)
  assert f'saved by simulator results version {before["results_version"]}' in caplog.text
  assert 'goes on from round 3' in caplog.text
  assert resumed['simulators'] == [
      {'from_round': 0, **before},
      {'from_round': 3, **before, 'results_version': before['results_version'] + 1}]
  assert resumed['simulators'] == _simulators_of_checkpoint(workdir, 5)
  # Here the code is the same, so the rounds are too: a warning, not a refusal or a restart.
  assert resumed['final']['params_sha256'] == straight['final']['params_sha256']
  # Yet another simulator on the finished run runs no round: it joins no list. Left as it is,
  # the run hears nothing; evaluated and summarised again, it is told that this simulator
  # evaluates rounds others ran.
  caplog.clear()
  v = before['results_version']
  monkeypatch.setattr(provenance, 'RESULTS_VERSION', v + 2)
  assert train_and_evaluate(_tiny(num_rounds=5, checkpoint_every=1), workdir) == resumed
  assert 'results version' not in caplog.text
  again = train_and_evaluate(_tiny(num_rounds=5, checkpoint_every=1, target_accuracy=0.5),
                             workdir)
  assert again['simulators'] == resumed['simulators']
  assert f'its rounds ran under simulator results version(s) [{v}, {v + 1}]; this one, version '\
         f'{v + 2}, evaluates it again' in caplog.text
  assert 'goes on' not in caplog.text


def test_a_finished_run_killed_while_summarised_again_is_not_taken_as_summarised(
    tmp_path, monkeypatch):
  """Run again with another target_accuracy, a finished run rewrites config.json, evaluates
  and summarises again. Killed before its summary.json was written, the next command found
  the old summary beside the new config and returned it: the old target, the old counts."""
  from fathom_sim import summary
  workdir = str(tmp_path / 'run')
  first = train_and_evaluate(_tiny(num_rounds=3, target_accuracy=0.9), workdir)
  assert first['target_accuracy'] == 0.9
  summarise = summary.write

  def killed(*args, **kwargs):
    raise KeyboardInterrupt  # as a kill -9 there: no summary.json written

  monkeypatch.setattr(summary, 'write', killed)
  with pytest.raises(KeyboardInterrupt):
    train_and_evaluate(_tiny(num_rounds=3, target_accuracy=0.95), workdir)
  monkeypatch.setattr(summary, 'write', summarise)
  again = train_and_evaluate(_tiny(num_rounds=3, target_accuracy=0.95), workdir)
  assert again['target_accuracy'] == 0.95
  with open(os.path.join(workdir, 'summary.json')) as f:
    assert json.load(f)['target_accuracy'] == 0.95
  assert again['final'] == first['final']
  assert again['wall_s'] == first['wall_s']  # the run's seconds: no command since ran a round


def test_a_summary_s_fingerprint_follows_the_fields_its_run_reads():
  """summary.json's config_sha256 is what summary.of_finished compares: a field the run reads
  changes it; one it does not read (eta_h under FedAvg), or a field the simulator adds later at
  its default (a config saved without it), leaves it."""
  from fathom_sim.workdir import config_fingerprint
  base = config_fingerprint(_tiny(num_rounds=3))
  assert config_fingerprint(_tiny(num_rounds=3, target_accuracy=0.5)) != base
  assert config_fingerprint(_tiny(num_rounds=4)) != base
  fedavg = config_fingerprint(_tiny(num_rounds=3, algorithm='fedavg'))
  assert config_fingerprint(_tiny(num_rounds=3, algorithm='fedavg', eta_h=0.5)) == fedavg
  older = _tiny(num_rounds=3)
  with older.unlocked():
    del older['log_every']  # at its default in _tiny: as a config from before the field
  assert config_fingerprint(older) == base


def test_a_checkpoint_saved_before_versions_were_recorded_reads_as_version_1(tmp_path, caplog):
  from fathom_sim import provenance
  workdir = str(tmp_path / 'run')
  train_and_evaluate(_tiny(num_rounds=3, checkpoint_every=1), workdir)
  # As the simulator wrote it before this record (and the JSON's digest) existed.
  _edit_checkpoint_json(workdir, 3, lambda m: [m.pop('simulators'), m.pop('meta_sha256')])
  resumed = train_and_evaluate(_tiny(num_rounds=4, checkpoint_every=1), workdir)
  assert 'saved by a simulator that recorded no version (read as 1)' in caplog.text
  assert resumed['simulators'] == [{'from_round': 0, 'results_version': 1},
                                   {'from_round': 3, **provenance.describe()}]


def test_a_save_that_cannot_make_its_folder_leaves_no_thread_waiting_for_it(tmp_path,
                                                                           monkeypatch):
  """Orbax's writers of a save whose folder could not be made (no inodes left, a read-only
  mount) waited for it for orbax's 300 s timeout, and the process's exit with them: the
  error line, then 5 minutes and ~15 lines of timeouts."""
  import concurrent.futures
  import threading
  import orbax.checkpoint as ocp
  from orbax.checkpoint._src.futures import future
  from fathom_sim.checkpoint import CheckpointError
  atomic = ocp.path.atomicity.AtomicRenameTemporaryPath
  create = atomic.create

  async def no_inodes_at_round_3(self):
    if self.get_final().name == '3':
      raise OSError(28, 'No space left on device', str(self.get()))
    return await create(self)

  monkeypatch.setattr(atomic, 'create', no_inodes_at_round_3)
  workdir = str(tmp_path / 'run')
  before = set(threading.enumerate())  # (other tests' saves may be finishing)
  with pytest.raises(CheckpointError, match=r'saving the checkpoint of round 3 failed \(OSError: '
                                            r'\[Errno 28\] No space left on device'):
    train_and_evaluate(_tiny(num_rounds=9, checkpoint_every=3), workdir)
  waiting = [t for t in set(threading.enumerate()) - before
             if isinstance(t, future._SignalingThread)]
  for t in waiting:
    try:
      t.join(timeout=20)
    except (TimeoutError, concurrent.futures.CancelledError):  # (orbax's join raises them)
      pass
  assert not [(t.name, t._operation_id) for t in waiting if t.is_alive()]
  monkeypatch.setattr(atomic, 'create', create)
  train_and_evaluate(_tiny(num_rounds=9, checkpoint_every=3), workdir)  # resumes from round 0
  assert [r['round'] for r in read_rows(workdir)] == list(range(1, 10))

@pytest.mark.parametrize('raised', ['os', 'tensorstore', 'tensorstore_0186'])
def test_a_checkpoint_that_cannot_be_saved_stops_the_run_naming_its_round(tmp_path, monkeypatch,
                                                                          raised):
  """Orbax raised a background save's error (a full disk) at the next save, rounds later, as
  a bare OSError with no round; the run had trained on with no durable checkpoint. A
  tensorstore write's error comes wrapped in an Exception whose first line is a spec: its
  cause is the one named."""
  import orbax.checkpoint as ocp
  from fathom_sim.checkpoint import CheckpointError
  atomic = ocp.path.atomicity.AtomicRenameTemporaryPath
  finalize = atomic.finalize

  async def full_disk_at_round_3(self):  # the commit of round 3 (its rename) never happens
    if self.get().name.startswith('3.'):
      if raised == 'os':
        raise OSError(28, 'No space left on device')
      try:
        if raised == 'tensorstore_0186':  # a real full disk's (a 2 MB tmpfs), whose cause
          # lay past the 200 characters of the line: the line did not say the disk was full
          raise ValueError(
              'RESOURCE_EXHAUSTED: Error writing local file "/tmp/small/run/checkpoints/6.orbax-'
              'checkpoint-tmp/state.orbax-checkpoint-tmp/manifest.ocdbt": Failed writing: "/tmp/'
              'small/run/checkpoints/6.orbax-checkpoint-tmp/state.orbax-checkpoint-tmp/manifest.'
              'ocdbt.__lock": Failed to write 115 bytes to file 9: No space left on device '
              "[os_error_code='28']")
        raise ValueError('RESOURCE_EXHAUSTED: Error writing local file "/x/d/ab": '
                         '[OS error 28: No space left on device]')
      except ValueError as cause:
        raise Exception('Exception while writing {\n  "driver": "zarr",') from cause
    return await finalize(self)

  monkeypatch.setattr(atomic, 'finalize', full_disk_at_round_3)
  workdir = str(tmp_path / 'run')
  said = {'os': r'OSError: \[Errno 28\] No space left on device',
          'tensorstore': r'No space left on device: ValueError: RESOURCE_EXHAUSTED: .*'
                         r'\[OS error 28: No space left on device\]',
          'tensorstore_0186': r'No space left on device: ValueError: RESOURCE_EXHAUSTED: Error '
                              r'writing local file "/tmp/small/[^)]*'}[raised]
  with pytest.raises(CheckpointError, match=r'saving the checkpoint of round 3 failed \('
                     + said + r'\); the newest complete checkpoint stays'):
    train_and_evaluate(_tiny(num_rounds=9, checkpoint_every=3), workdir)
  assert read_rows(workdir)[-1]['round'] <= 6  # it stopped at the next save, at the latest
  monkeypatch.setattr(atomic, 'finalize', finalize)
  straight = train_and_evaluate(_tiny(num_rounds=9, checkpoint_every=3), str(tmp_path / 's'))
  resumed = train_and_evaluate(_tiny(num_rounds=9, checkpoint_every=3), workdir)
  assert resumed['final']['params_sha256'] == straight['final']['params_sha256']


def test_old_checkpoints_that_cannot_be_removed_only_warn_and_the_run_goes_on(
    tmp_path, monkeypatch, caplog):
  """Orbax removes the checkpoints past keep_checkpoints in the background step that
  finishes a save; that failing (an NFS 'Directory not empty') was said as the new save
  failing, and stopped the run, though round 2's checkpoint was whole."""
  from orbax.checkpoint import checkpoint_manager
  deleter = checkpoint_manager.deleter.StandardCheckpointDeleter  # (orbax 0.12's)
  delete, failed = deleter.delete, []

  def removal_fails_once(self, step):
    if not failed:
      failed.append(step)
      raise OSError(errno.ENOTEMPTY, 'Directory not empty')
    return delete(self, step)

  monkeypatch.setattr(deleter, 'delete', removal_fails_once)
  config = lambda: _tiny(num_rounds=4, checkpoint_every=1, keep_checkpoints=1)
  workdir = tmp_path / 'run'
  summary = train_and_evaluate(config(), str(workdir))
  assert ('the checkpoint of round 2 is saved, but removing older ones (keep_checkpoints=1) '
          'failed (OSError: [Errno 39] Directory not empty)') in caplog.text
  assert failed == [1] and os.listdir(workdir / 'checkpoints') == ['4']  # with the next ones
  monkeypatch.setattr(deleter, 'delete', delete)
  straight = train_and_evaluate(config(), str(tmp_path / 'straight'))
  assert summary['final'] == straight['final']
  # A rename that failed part-way (a bucket's mount copies object by object) left part of
  # the folder beside the rest of the temporary one: not committed, so the error stands.
  from fathom_sim.checkpoint import Checkpointer
  checkpointer = Checkpointer(str(tmp_path / 'parts'), keep=1)
  try:
    os.makedirs(tmp_path / 'parts' / 'checkpoints' / '7')
    assert checkpointer._committed(7) and not checkpointer._committed(8)
    os.makedirs(tmp_path / 'parts' / 'checkpoints' / '7.orbax-checkpoint-tmp-1234')
    assert not checkpointer._committed(7)
  finally:
    checkpointer.close()


def test_a_second_ctrl_c_stops_at_once_and_one_signal_waits_for_the_round():
  import signal as signal_lib
  from fathom_sim.train import _stop_signals
  before = signal_lib.getsignal(signal_lib.SIGINT)
  with _stop_signals() as received:
    os.kill(os.getpid(), signal_lib.SIGTERM)
    time.sleep(0.01)
    assert received == [signal_lib.SIGTERM]
    with pytest.raises(KeyboardInterrupt):
      os.kill(os.getpid(), signal_lib.SIGINT)
      time.sleep(1)  # the handler runs between bytecodes: here
  assert signal_lib.getsignal(signal_lib.SIGINT) is before


def test_a_signal_in_the_last_round_writes_the_summary_then_stops(tmp_path, monkeypatch):
  """A finished run stopped by SIGTERM in its last round wrote no summary.json: a sweep saw it
  interrupted (and the next command only evaluated it again)."""
  from fathom_sim import train as train_lib
  agreed = train_lib._agreed_stop
  calls = []

  def signal_in_round_3(signals):
    calls.append(1)
    return 15 if len(calls) == 3 else agreed(signals)

  monkeypatch.setattr(train_lib, '_agreed_stop', signal_in_round_3)
  workdir = str(tmp_path / 'run')
  with pytest.raises(train_lib.Preempted, match='stopped by signal 15 after round 3'):
    train_and_evaluate(_tiny(num_rounds=3), workdir)
  summary = _summary(workdir)
  assert summary['rounds'] == 3 and summary['resumed_from'] == 0
  monkeypatch.setattr(train_lib, '_agreed_stop', agreed)
  assert train_and_evaluate(_tiny(num_rounds=3), workdir) == summary  # nothing left to do


def test_a_signal_while_the_run_waits_for_its_compiles_is_taken_after_the_summary(
    tmp_path, monkeypatch):
  """The run's end waits for compiles still running ahead (seconds on a GPU). That wait ran
  after the stop handlers were restored, so a SIGTERM there killed the finished run before its
  summary.json; now it is taken as a signal in the last round."""
  from fathom_sim import driver, train as train_lib
  close = driver.Rounds.close

  sent = []

  def close_and_signal(self):
    if not sent:  # the first call, the wait after the last round (a second one does nothing)
      sent.append(1)
      os.kill(os.getpid(), signal.SIGTERM)
      time.sleep(0.01)  # the handler runs between bytecodes
    close(self)

  monkeypatch.setattr(driver.Rounds, 'close', close_and_signal)
  workdir = str(tmp_path / 'run')
  with pytest.raises(train_lib.Preempted, match='stopped by signal 15 after round 2'):
    train_and_evaluate(_tiny(num_rounds=2), workdir)
  summary = _summary(workdir)
  assert summary['rounds'] == 2
  monkeypatch.setattr(driver.Rounds, 'close', close)
  assert train_and_evaluate(_tiny(num_rounds=2), workdir) == summary


def test_a_resumed_run_of_the_dropout_cnn_equals_an_uninterrupted_one(tmp_path):
  """The resume tests above train the MLP, which has no dropout, on the device loop: the CNN's
  dropout masks (from the checkpointed base key and round) on the host-driven loop (auto's
  choice for the CNN with nn.Conv on CPU) were never resumed."""
  def cnn(num_rounds):
    c = tiny_config(algorithm='fathom', num_devices=2, cohort_size=3, eta=0.1, epochs=0.05,
                    batch_size=20.0, num_rounds=num_rounds, eval_every=2, checkpoint_every=1,
                    local_loop='host')
    c.model.name = 'emnist_cnn'
    c.data.name, c.data.num_clients = 'femnist_synthetic', 8
    return c
  straight = train_and_evaluate(cnn(3), str(tmp_path / 'straight'))
  assert straight['local_loop'] == 'host' and straight['conv'] is not None
  workdir = str(tmp_path / 'run')
  train_and_evaluate(cnn(2), workdir)
  resumed = train_and_evaluate(cnn(3), workdir)
  assert resumed['resumed_from'] == 2
  assert resumed['final']['params_sha256'] == straight['final']['params_sha256']
  untimed = [[{k: v for k, v in r.items() if k != 'wall_s'} for r in read_rows(w)]
             for w in (workdir, str(tmp_path / 'straight'))]
  assert untimed[0] == untimed[1]

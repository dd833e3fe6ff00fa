"""Multi-host: 2 processes x 4 CPU devices (JAX's distributed runtime on localhost, gloo
collectives) train the same model as 1 process x 8 devices."""

import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np

from fathom_sim.checkpoint import Checkpointer
from fathom_sim.run import build, init_state
from tests.common import tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OVERRIDES = ['--config.num_rounds=4', '--config.cohort_size=10', '--config.data.num_clients=60',
             '--config.eval_every=2', '--config.checkpoint_every=2', '--config.num_devices=0',
             # Examples sent per round, a buffer per device that its 2 lanes share: each
             # process loads only its own devices' lanes' examples.
             '--config.data_on_device=no', '--config.lanes_per_device=2']


def _free_port() -> int:
  """A port free now, below Linux's ephemeral range (32768-60999): the kernel's own pick
  (bind to port 0) comes from that range, which every outgoing connection (gloo's, gRPC's, of
  the tests beside this one) draws from too, and one could take it before the coordinator
  binds it a second later."""
  draw = random.SystemRandom()
  while True:
    port = draw.randrange(20000, 32768)
    with socket.socket() as s:
      try:
        s.bind(('localhost', port))
      except OSError:  # another program's
        continue
      return port


def _main(workdir, devices, extra=(), script=os.path.join('launch', 'main.py'), env=None):
  env = dict(os.environ, JAX_PLATFORMS='cpu',
             XLA_FLAGS=f'--xla_force_host_platform_device_count={devices}', **(env or {}))
  return subprocess.Popen(
      [sys.executable, os.path.join(ROOT, script),
       f'--config={os.path.join(ROOT, "configs", "quickstart.py")}', f'--workdir={workdir}',
       *OVERRIDES, *extra], cwd=ROOT, env=env, stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT, text=True)


def _two_processes(workdir, extra=(), **kwargs):
  port = _free_port()
  return [_main(workdir, 4, [f'--coordinator_address=localhost:{port}', '--num_processes=2',
                             f'--process_id={i}', *extra], **kwargs) for i in range(2)]


def _each_stops_in_one_line(procs, needles):
  """Every process ends with exit status 2 and one error line holding its needle."""
  outs = [p.communicate(timeout=120)[0] for p in procs]
  for p, out, needle in zip(procs, outs, needles):
    errors = [line for line in out.splitlines() if line.startswith('error:')]
    assert p.returncode == 2 and len(errors) == 1 and needle in errors[0], out[-3000:]
    assert 'Traceback' not in out and 'Check failure' not in out, out[-3000:]


def _tails(procs) -> str:
  """Every process's last output lines (those still running are killed first): when one
  process fails a collective, the cause is often in the other's output."""
  for p in procs:
    if p.poll() is None:
      p.kill()
  return '\n'.join(f'--- process {i} (exit {p.wait()}):\n{p.communicate()[0][-2500:]}'
                   for i, p in enumerate(procs))


def _final_params(workdir):
  with open(os.path.join(workdir, 'config.json')) as f:
    saved = json.load(f)
  config = tiny_config()
  config.update_from_flattened_dict({k: v for k, v in _flat(saved).items() if k in
                                     _flat(config.to_dict())})
  config.num_devices = 0
  like = init_state(build(config))
  state, meta = Checkpointer(workdir, 3).restore_newest(like)
  return jax.device_get(state.params), meta


def _flat(d, prefix=''):
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(_flat(v, f'{prefix}{k}.'))
    else:
      out[f'{prefix}{k}'] = tuple(v) if isinstance(v, list) else v
  return out


def _rows(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [json.loads(line) for line in f]


def test_two_processes_of_four_devices_train_what_one_process_of_eight_does(tmp_path):
  port = _free_port()
  multi = str(tmp_path / 'multi')
  procs = [_main(multi, 4, [f'--coordinator_address=localhost:{port}', '--num_processes=2',
                            f'--process_id={i}']) for i in range(2)]
  single = _main(str(tmp_path / 'single'), 8)
  for p in procs + [single]:
    out, _ = p.communicate(timeout=600)
    assert p.returncode == 0, out[-3000:]

  with open(os.path.join(multi, 'summary.json')) as f:
    summary = json.load(f)
  assert summary['processes'] == 2 and summary['devices'] == 8
  got, got_meta = _final_params(multi)
  want, want_meta = _final_params(str(tmp_path / 'single'))
  assert got_meta['round'] == want_meta['round'] == 4
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)
  for g, w in zip(_rows(multi), _rows(str(tmp_path / 'single'))):
    assert g['examples'] == w['examples'] and g['batch_size_int'] == w['batch_size_int']
    np.testing.assert_allclose([g['eta'], g['epochs'], g['batch_size'], g['h_glob']],
                               [w['eta'], w['epochs'], w['batch_size'], w['h_glob']],
                               rtol=1e-5, atol=1e-6)

  # Taken further with its evaluations sampled: both processes evaluate the round it ended at
  # again (a collective: neither waits for the other), and its row gets the sample.
  before = _rows(multi)
  for p in _two_processes(multi, ['--config.num_rounds=6', '--config.eval_clients=3']):
    out, _ = p.communicate(timeout=600)
    assert p.returncode == 0, out[-3000:]
  rows = _rows(multi)
  assert [r['round'] for r in rows] == list(range(1, 7))
  assert rows[3]['test_loss'] != before[3]['test_loss'] and rows[:3] == before[:3]

  # Process 0 alone reads the rows: a damaged one stops both processes with one line each
  # (process 1 used to wait in round 5's collective until gloo timed out, with a traceback).
  path = os.path.join(multi, 'metrics.jsonl')
  lines = open(path).read().split('\n')
  damaged = '\n'.join(['xx'] + lines[1:])
  with open(path, 'w') as f:
    f.write(damaged)
  _each_stops_in_one_line(
      _two_processes(multi, ['--config.num_rounds=8']),
      ['metrics.jsonl: line 1 is not a row of a run',
       'process 0 of the run stopped: ' + f'{path}: line 1 is not a row of a run'])
  assert open(path).read() == damaged


def test_bad_data_met_by_one_process_in_a_round_stops_both_in_one_line_and_they_resume(
    tmp_path):
  """Process 1 alone meets bad data in round 3 (its lanes' records). Process 0 waited in round
  3's collective until process 1's exit timed out in JAX's shutdown barrier (5 minutes), and
  then both aborted with stack dumps (exit 134): now process 1 says why, process 0 says that
  process 1 stopped and why, both exit 2, and the checkpoint of round 2 resumes them."""
  workdir = str(tmp_path / 'multi')
  error = 'record 7 of split train cannot be read (injected, round 3)'
  _each_stops_in_one_line(
      _two_processes(workdir, script=os.path.join('tests', 'fail_in_round.py'),
                     env={'FAIL_ROUND': '3', 'FAIL_PROCESS': '1'}),
      [f'process 1 of the run stopped: {error}; this process stops too', error])
  assert [r['round'] for r in _rows(workdir) if 'train_loss' in r] == [1, 2]
  procs = _two_processes(workdir)
  for p in procs:
    out, _ = p.communicate(timeout=300)
    assert p.returncode == 0, _tails(procs)
  with open(os.path.join(workdir, 'summary.json')) as f:
    summary = json.load(f)
  assert (summary['rounds'], summary['resumed_from']) == (4, 2)


def test_a_bad_flag_met_by_one_process_after_joining_stops_both_in_one_line(tmp_path):
  """Process 0's --compilation_cache cannot be used (process 0 makes it; the others only
  read): it exited with one line after joining the run, and process 1 waited in a collective
  until JAX's heartbeat gave up (100 s)."""
  taken = tmp_path / 'a_file'
  taken.write_text('x')
  port = _free_port()
  joined = [f'--coordinator_address=localhost:{port}', '--num_processes=2']
  error = f"--compilation_cache '{taken / 'cache'}' cannot be used"
  _each_stops_in_one_line(
      [_main(str(tmp_path / 'multi'), 4, [*joined, '--process_id=0',
                                          f'--compilation_cache={taken / "cache"}']),
       _main(str(tmp_path / 'multi'), 4, [*joined, '--process_id=1'])],
      [error, f'process 0 of the run stopped: {error}'])


def test_a_signal_to_one_process_stops_both_after_the_same_round_and_they_resume(tmp_path):
  workdir = str(tmp_path / 'multi')
  extra = ['--config.num_rounds=12', '--config.checkpoint_every=4']

  def start():
    port = _free_port()
    return [_main(workdir, 4, [f'--coordinator_address=localhost:{port}', '--num_processes=2',
                               f'--process_id={i}', *extra]) for i in range(2)]

  procs = start()
  metrics_file = os.path.join(workdir, 'metrics.jsonl')
  deadline = time.time() + 300
  while not (os.path.exists(metrics_file) and os.path.getsize(metrics_file) > 0):
    assert time.time() < deadline and procs[0].poll() is None, _tails(procs)
    time.sleep(0.01)
  procs[1].send_signal(signal.SIGTERM)  # a preemption notice reaching one worker only
  outs = [p.communicate(timeout=300)[0] for p in procs]
  assert [p.returncode for p in procs] == [143, 143], outs[0][-3000:]
  found = [re.search(r'stopped after round (\d+)', o) for o in outs]
  assert all(found), '\n'.join(o[-2500:] for o in outs)
  stopped = {int(m.group(1)) for m in found}
  assert len(stopped) == 1 and stopped.pop() < 12

  procs = start()
  for p in procs:
    out, _ = p.communicate(timeout=600)
    assert p.returncode == 0, out[-3000:]
  rows = _rows(workdir)
  assert [r['round'] for r in rows] == list(range(1, 13))
  straight = str(tmp_path / 'straight')
  p = _main(straight, 8, extra)
  out, _ = p.communicate(timeout=600)
  assert p.returncode == 0, out[-3000:]
  got, _ = _final_params(workdir)
  want, _ = _final_params(straight)
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)


def test_a_mesh_that_leaves_a_process_without_devices_is_refused_in_one_line(tmp_path):
  """num_devices=4 of 2 processes x 4 took process 0's devices only: process 1 ran a program
  whose results it cannot fetch."""
  needle = ('config.num_devices=4 takes the first 4 of the 8 devices, none of process(es) 1; '
            'on several hosts every process needs devices of the run: use 0 (all devices)')
  _each_stops_in_one_line(_two_processes(str(tmp_path / 'multi'), ['--config.num_devices=4']),
                          [needle, needle])


def test_processes_given_different_configs_or_data_are_refused_in_one_line(tmp_path):
  """Each host reads its own config file and data: one edited on a worker ran silently. (Each
  its own folder here: in one, process 1 may meet process 0's config.json first, refused too.)"""
  port = _free_port()
  procs = [_main(str(tmp_path / f'multi{i}'), 4, [
      f'--coordinator_address=localhost:{port}', '--num_processes=2', f'--process_id={i}',
      f'--config.data.num_clients={60 + i}', f'--config.eta={0.1 + 0.1 * i}']) for i in range(2)]
  needle = ('the processes of the run were given different config (process(es) 1 against '
            'process 0) and data (process(es) 1 against process 0): every host runs the same '
            'config on the same data')
  _each_stops_in_one_line(procs, [needle, needle])


_BARRIER_CHECK = """
import sys
from absl import flags
flags.FLAGS(['check'])
from fathom_sim import distributed
distributed.initialize(sys.argv[1], 1, 0)
from orbax.checkpoint._src.multihost import multihost
print(multihost.EXPERIMENTAL_ORBAX_USE_DISTRIBUTED_BARRIER.value)
"""


def test_joining_a_run_moves_orbax_syncs_to_the_coordination_service():
  # orbax's default sync is a collective over every device, through gloo on CPU, which fails
  # when processes reach it over 30 s apart; its distributed barrier waits up to 300 s.
  out = subprocess.run([sys.executable, '-c', _BARRIER_CHECK, f'localhost:{_free_port()}'],
                       cwd=ROOT, env=dict(os.environ, JAX_PLATFORMS='cpu'),
                       capture_output=True, text=True, timeout=120)
  assert out.returncode == 0, out.stderr[-2000:]
  assert out.stdout.split()[-1] == 'True'


_SIGTERM_CHECK = """
import os, signal, sys, time
from absl import flags
flags.FLAGS(['check'])
from fathom_sim import distributed, train
distributed.initialize(sys.argv[1], 1, 0)
os.kill(os.getpid(), signal.SIGTERM)
time.sleep(0.5)
with train._stop_signals() as received:
  print('rounds see', received)
os.kill(os.getpid(), signal.SIGTERM)  # after the rounds: recorded, not the default's exit
time.sleep(0.5)
print('after', distributed.take_early_signals())
"""


def test_a_sigterm_before_or_after_the_rounds_of_a_joined_run_reaches_them():
  """JAX's preemption service, started by joining the runtime, took SIGTERM in C++ and told
  nothing this program reads: a stop during the data load or the first compile was lost."""
  out = subprocess.run([sys.executable, '-c', _SIGTERM_CHECK, f'localhost:{_free_port()}'],
                       cwd=ROOT, env=dict(os.environ, JAX_PLATFORMS='cpu'),
                       capture_output=True, text=True, timeout=120)
  assert out.returncode == 0, out.stderr[-2000:]
  assert out.stdout.splitlines()[-2:] == ['rounds see [15]', 'after [15]'], out.stdout


_PEER_STATUS_CHECK = """
import sys
from absl import flags
flags.FLAGS(['check'])
from fathom_sim import distributed
distributed.initialize(sys.argv[1], 1, 0)
from jax._src import distributed as jax_distributed
# What process 1's stop_peers leaves when a checkpoint save fails there (launch/cli: exit 1).
jax_distributed.global_state.client.key_value_set(distributed.STOP_KEY, '1\\n1\\ndisk full')
distributed._watch_loop()  # as the watching thread: this process stops too
"""


def test_a_stopped_peer_exits_with_the_status_of_the_process_that_failed():
  """Peers exited 2 whatever stopped the run: a scheduler that retries a failed save (exit 1)
  but not bad input (exit 2) saw both for one failure."""
  out = subprocess.run([sys.executable, '-c', _PEER_STATUS_CHECK, f'localhost:{_free_port()}'],
                       cwd=ROOT, env=dict(os.environ, JAX_PLATFORMS='cpu'),
                       capture_output=True, text=True, timeout=120)
  assert out.returncode == 1, out.stderr[-2000:]
  assert 'error: process 1 of the run stopped: disk full; this process stops too' in out.stderr


_WATCH_MEMORY_CHECK = """
import sys, threading, time
from absl import flags
flags.FLAGS(['check'])
from fathom_sim import distributed
distributed.initialize(sys.argv[1], 1, 0)
distributed._POLL_MS = 1  # thousands of reads in a few seconds, as a day of a run makes

def rss_kb():
  with open('/proc/self/status') as f:
    return next(int(line.split()[1]) for line in f if line.startswith('VmRSS'))

watcher = threading.Thread(target=distributed._watch_loop, daemon=True)
watcher.start()
time.sleep(0.5)  # the thread's own start-up (its stack, a malloc arena) is not a read's
before = rss_kb()
time.sleep(4)
distributed._watch['quiet'].set()
watcher.join(5)
print('grew', rss_kb() - before, 'watching', watcher.is_alive())
"""


def test_watching_for_stopped_peers_keeps_memory_flat():
  """The watcher read the stop key with a blocking get that timed out every 0.5 s; each left
  memory behind (at the coordinator, process 0, too): 115 MB over these 4 s of 1 ms reads,
  some GB a day on every host of a pod. Its plain reads stay within what starting up takes."""
  out = subprocess.run([sys.executable, '-c', _WATCH_MEMORY_CHECK, f'localhost:{_free_port()}'],
                       cwd=ROOT, env=dict(os.environ, JAX_PLATFORMS='cpu'),
                       capture_output=True, text=True, timeout=120)
  assert out.returncode == 0, out.stderr[-2000:]
  grew, watching = re.search(r'grew (-?\d+) watching (\w+)', out.stdout).groups()
  assert int(grew) < 30_000 and watching == 'False', out.stdout


def _pod(*args, **env):
  return subprocess.run(['bash', os.path.join(ROOT, 'launch', 'tpu_pod.sh'), *args],
                        env=dict(os.environ, DRY_RUN='1', **env), capture_output=True,
                        text=True, timeout=60)


def test_tpu_pod_script_starts_the_same_multihost_command_on_every_worker():
  p = _pod('run', '--config.num_rounds=5', TPU_NAME='pod1', CONFIG='configs/quickstart.py')
  assert p.returncode == 0, p.stderr
  (line,) = p.stdout.splitlines()
  assert line.startswith('gcloud compute tpus tpu-vm ssh pod1 --worker=all --command=')
  for part in ('launch/main.py', '--multihost', '--config=configs/quickstart.py',
               '--workdir=/mnt/fathom/runs/pod1', '--config.num_rounds=5', 'nohup',
               '--compilation_cache=/mnt/fathom/runs/jax_cache',
               '>> ~/fathom_run.log'):  # appended: a relaunch keeps the last attempt's log
    assert part in line.replace('\\', ''), part
  p = _pod('run', TPU_NAME='pod1', COMPILATION_CACHE='')
  assert p.returncode == 0 and "--compilation_cache='' " in p.stdout.replace('\\', ''), p.stdout
  p = _pod('install', BUCKET='gs://bkt')
  assert p.returncode == 0, p.stderr
  scp, setup = p.stdout.splitlines()
  assert '--worker=all' in scp and '--worker=all' in setup
  setup = setup.replace('\\', '')
  assert "jax[tpu]==0.10.2" in setup and ('gcsfuse --implicit-dirs --rename-dir-limit=100000 bkt '
                                              '/mnt/fathom') in setup
  # The image's python3 is 3.10, which the pins refuse: a 3.11 venv, apt's where it is missing.
  assert 'python3.11 -m venv ~/fathom_venv' in setup and 'apt-get install -y -qq python3.11 ' \
      'python3.11-venv' in setup and 'gcsfuse is not installed on this worker' in setup
  p = _pod('create', SPOT='1')
  assert p.returncode == 0 and '--spot' in p.stdout and '--accelerator-type=v4-32' in p.stdout
  p = _pod('resume')
  assert p.returncode == 2 and 'usage: launch/tpu_pod.sh' in p.stderr


def test_tpu_pod_stop_sends_sigterm_to_the_run_and_not_to_its_own_shell(tmp_path):
  """The remote command that `stop` runs on each worker, run here against a stand-in for the
  run: its pattern matched the shell running it, which pkill killed (status 143), so `stop`
  failed though the run got its SIGTERM."""
  import shlex
  p = _pod('stop', TPU_NAME='pod1')
  assert p.returncode == 0, p.stderr
  [remote] = [a.split('=', 1)[1] for a in shlex.split(p.stdout) if a.startswith('--command=')]
  run = subprocess.Popen(['bash', '-c', 'exec -a "python launch/main.py --multihost '
                          '--config=configs/quickstart.py" sleep 60'])
  time.sleep(0.5)  # (the exec done)
  try:
    stop = subprocess.run(['bash', '-c', remote], capture_output=True, timeout=30)
    assert stop.returncode == 0, stop
    assert run.wait(timeout=10) == -signal.SIGTERM
  finally:
    run.kill()


def test_both_processes_set_aside_an_unreadable_checkpoint_and_resume_from_the_one_before(
    tmp_path):
  """Each process restores for itself, and each moved the unreadable newest checkpoint aside:
  the second's move found the folder gone, and that process stopped with a traceback. Process
  0 alone moves it now; both fall back to the same round."""
  workdir = tmp_path / 'multi'
  procs = _two_processes(str(workdir), ['--config.num_rounds=2', '--config.checkpoint_every=1'])
  for p in procs:
    p.communicate(timeout=300)
    assert p.returncode == 0, _tails(procs)
  import shutil
  shutil.rmtree(workdir / 'checkpoints' / '2' / 'state')
  procs = _two_processes(str(workdir), ['--config.num_rounds=3', '--config.checkpoint_every=1'])
  outs = []
  for p in procs:
    outs.append(p.communicate(timeout=200)[0])
    assert p.returncode == 0, _tails(procs)
  assert all('checkpoint of round 2 is unreadable' in out and 'Traceback' not in out
             for out in outs), '\n'.join(o[-2500:] for o in outs)
  assert os.listdir(workdir / 'unreadable_checkpoints') == ['2']
  with open(workdir / 'summary.json') as f:
    summary = json.load(f)
  assert (summary['rounds'], summary['resumed_from']) == (3, 1)
  # A host whose mount failed sees an empty folder: its collectives paired with the others'
  # agreement, and process 0 set its readable newest checkpoint aside. Refused, nothing moved.
  port = _free_port()
  procs = [_main(str(workdir if i == 0 else tmp_path / 'unmounted'), 4, [
      f'--coordinator_address=localhost:{port}', '--num_processes=2', f'--process_id={i}',
      '--config.num_rounds=4', '--config.checkpoint_every=1']) for i in range(2)]
  # (each says its own listing, or the other's if told first that it stopped)
  needle = 'process(es) 1 list other checkpoints than process 0 (process '
  _each_stops_in_one_line(procs, [needle, needle])
  assert os.listdir(workdir / 'unreadable_checkpoints') == ['2']
  assert sorted(os.listdir(workdir / 'checkpoints')) == ['1', '2', '3']

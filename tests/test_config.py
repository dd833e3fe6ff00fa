"""Bad configs fail before any compute, with one message naming the field."""

import logging

import jax
import numpy as np
import pytest

from fathom_sim import fathom
from fathom_sim.config import ConfigError, base_config, check_config, unread_fields
from fathom_sim import run as run_lib
from fathom_sim.data.plan import longest_lane
from fathom_sim.run import build
from fathom_sim.workdir import RESUMABLE_FIELDS, config_dict, differing, flatten
from tests.common import tiny_config, tiny_task


def test_base_config_and_quickstart_are_valid():
  check_config(base_config())
  from tests.test_cli import load_config_file
  for name in ('quickstart',):
    check_config(load_config_file(f'configs/{name}.py'))


@pytest.mark.parametrize('field,value,needle', [
    ('eta', -0.1, 'config.eta must be > 0'),
    ('eta', 0.0, 'config.eta must be > 0'),
    # (eta must be > 0: '0 or between' said 0 would do)
    ('eta', 1e-46, "config.eta must be between 1.18e-38 and 3.4e+38 in size (float32's"),
    ('server_eps', 1e-50, 'config.server_eps must be between 1.18e-38'),
    ('upper_batch_size', 1e39, 'config.upper_batch_size must be between 1.18e-38'),
    ('eta_h', 1e-40, 'config.eta_h must be 0 or between 1.18e-38'),  # (eta_h 0 freezes phi)
    ('eta_h', -1e39, 'config.eta_h must be >= 0'),
    ('batch_size', 0.0, 'config.batch_size must be > 0'),
    ('batch_size', -4.0, 'config.batch_size must be > 0'),
    ('epochs', 0.0, 'config.epochs must be > 0'),
    ('num_rounds', 0, 'config.num_rounds must be in [1, 2147483647], got 0'),
    ('num_rounds', 2**31, 'config.num_rounds must be in [1, 2147483647]'),  # an int32 round
    ('data.num_classes', 2**31, 'config.data.num_classes must be in [0, 2147483647]'),
    ('data.num_clients', 10**7 + 1, 'config.data.num_clients must be at most 10,000,000 '
     '(generated clients are drawn one by one'),
    ('cohort_size', 0, 'config.cohort_size must be >= 1'),
    ('seed', -1, 'config.seed must be in [0, 2147483647], got -1'),  # the bound exact, not :g's
    ('seed', 2**31, 'config.seed must be in [0, 2147483647]'),
    ('alpha', 1.0, 'config.alpha must be in [0, 1)'),
    ('eta_h', -0.01, 'config.eta_h must be >= 0'),
    ('upper_eta', 0.0, 'config.upper_eta must be > 0'),
    ('upper_eta', 0.05, 'config.eta (0.1) is above config.upper_eta (0.05): FATHOM clips it'),
    ('upper_batch_size', 8.0, 'config.batch_size (20) is above config.upper_batch_size (8)'),
    ('upper_epochs', 0.5, 'config.epochs (1) is above config.upper_epochs (0.5)'),
    ('algorithm', 'fedsgd', "config.algorithm must be one of 'fathom', 'fedavg'"),
    ('server_optimizer', 'sgdd', 'config.server_optimizer must be one of'),
    ('hyper_optimizer', 'rmsprop', 'config.hyper_optimizer must be one of'),
    ('server_lr', -1.0, 'config.server_lr must be > 0'),
    ('model.name', 'resnet', 'config.model.name must be one of'),
    ('model.conv', 'cudnn', "config.model.conv must be one of 'auto', 'xla', 'matmul'"),
    ('model.hidden', (64, 0), 'config.model.hidden'),
    ('model.compute_dtype', 'float16',
     "config.model.compute_dtype must be one of 'float32', 'bfloat16'"),
    ('model.expected_length', -13.3, 'config.model.expected_length must be >= 0'),
    ('model.expected_length', 13.3,  # base_config's model is the mlp
     "config.model.expected_length must be 0 for model.name 'mlp'"),
    ('model.init', 'haiku', "config.model.init must be one of 'flax', 'fedjax'"),
    ('data.name', 'cifar', 'config.data.name must be one of'),
    ('data.test_fraction', 1.0, 'config.data.test_fraction'),
    ('data.shared_glyphs', None, 'config.data.shared_glyphs must be True or False'),
    ('data.flip_pixels', None, 'config.data.flip_pixels must be True or False'),
    ('eval_every', 0, 'config.eval_every must be >= 1'),
    ('target_accuracy', 1.5, 'config.target_accuracy must be in [0, 1]'),
    ('data_on_device', 'maybe', 'config.data_on_device must be one of'),
    ('lanes_per_device', -1, 'config.lanes_per_device'),
    ('compile_ahead', 'always', "config.compile_ahead must be one of 'auto', 'yes', 'no'"),
    ('loop_chunk', -1, 'config.loop_chunk must be in [0, 1024]'),
    ('matmul_precision', 'fp32',
     "config.matmul_precision must be one of 'auto', 'default', 'high', 'highest'"),
])
def test_out_of_range_fields_are_named(field, value, needle):
  c = base_config()
  node = c
  *path, leaf = field.split('.')
  for part in path:
    node = node[part]
  node[leaf] = value
  with pytest.raises(ConfigError, match=None) as err:
    check_config(c)
  assert needle in str(err.value)
  assert '\n' not in str(err.value)


def test_the_generated_clients_cap_binds_only_where_data_num_clients_is_read():
  c = base_config()
  c.data.num_clients = 10**8
  c.data.name, c.data.data_dir, c.model.name = 'femnist', 'data/femnist', 'emnist_cnn'
  check_config(c)  # a prepared dataset's clients are its own: the field is not read


def test_small_float32_values_and_zeros_are_accepted():
  c = base_config()
  c.eta, c.eta_h, c.server_eps, c.alpha = 1e-30, 0.0, 1.2e-38, 0.0
  check_config(c)


def test_wrong_types_set_in_a_config_file_are_named():
  import ml_collections
  for field, value, needle in (('num_rounds', 10.5, 'config.num_rounds must be an integer'),
                               ('eta', 'fast', 'config.eta must be a finite number'),
                               ('clip_log_params', 'yes', 'config.clip_log_params must be')):
    fields = base_config().to_dict()
    fields[field] = value  # a config file that builds its own dict, bypassing the base types
    with pytest.raises(ConfigError, match=needle):
      check_config(ml_collections.ConfigDict(fields))


def test_cohort_larger_than_population_is_refused_before_compute():
  with pytest.raises(ConfigError, match=r'config.cohort_size must be at most .*\(12\)'):
    build(tiny_config(cohort_size=13), tiny_task())


def test_npz_data_needs_a_path():
  c = base_config()
  c.data.name = 'npz'
  with pytest.raises(ConfigError, match='config.data.path'):
    check_config(c)


def test_jax_random_bits_that_depend_on_padding_are_refused():
  """With jax_threefry_partitionable off, the first B_int rows of a dropout draw over B_pad
  rows are not those of a draw over B_int: a client's masks, and so the run, would change
  with the buckets. It is refused before anything is built."""
  jax.config.update('jax_threefry_partitionable', False)
  try:
    with pytest.raises(ConfigError, match=r'^JAX_THREEFRY_PARTITIONABLE=0 .* is not supported'):
      build(tiny_config(), tiny_task())
  finally:
    jax.config.update('jax_threefry_partitionable', True)


def test_more_devices_than_present_is_refused():
  with pytest.raises(ConfigError, match='config.num_devices must be at most'):
    build(tiny_config(num_devices=64), tiny_task())


def test_data_on_device_yes_needs_a_training_set_in_memory():
  c = tiny_config(data_on_device='yes')
  c.data.name = 'femnist_synthetic'
  with pytest.raises(ConfigError, match=r"data_on_device='yes' needs an in-memory training set; "
                     r'.* use auto or no \(or set config.data.in_memory=True'):
    build(c)
  c.data.in_memory = True  # what the message offers works
  assert build(c).resident


def test_data_on_device_refuses_a_set_past_int32_row_indices(monkeypatch):
  """A resident set's rows are int32 indices: a set of 2^31 rows or more is past them (an
  index over 2^31 - 1 wraps to a negative one, which reads rows from the end). 'yes' is
  refused with the reason, 'auto' sends clients per round even where its bytes would fit.
  (Views of one row: no memory behind the 2^31 rows.)"""
  from fathom_sim.data.federated import ArrayClientDataset
  task = tiny_task()
  rows = 2**31
  features = {k: np.broadcast_to(v[:1], (rows,) + v.shape[1:])
              for k, v in task.train.features.items()}
  offsets = np.array([0, 40, 80, rows])
  big = task._replace(train=ArrayClientDataset(features, offsets, np.array(['a', 'b', 'c'])))
  c = tiny_config(data_on_device='yes', algorithm='fedavg', epochs=0.5, cohort_size=2)
  # (A round of the 2^31-row client would plan 2^30 indices a lane: past this host's memory,
  # refused before the set's rows are counted; here it is not what is looked at.)
  monkeypatch.setattr(run_lib, 'host_memory', lambda: 1 << 62)
  with pytest.raises(ConfigError, match=r"config.data_on_device='yes': .* has 2147483648 rows; "
                     r'a set kept on the devices must have fewer than 2\^31 \(its rows are int32 '
                     r'indices\); use auto or no'):
    build(c, big)
  c.data_on_device = 'auto'
  monkeypatch.setattr(run_lib, 'RESIDENT_BYTES', 1 << 62)  # its bytes would fit
  assert not build(c, big).resident
  offsets[-1] = rows - 1  # the largest set kept: 2^31 - 1 rows
  features = {k: v[:rows - 1] for k, v in features.items()}
  small = task._replace(train=ArrayClientDataset(features, offsets, np.array(['a', 'b', 'c'])))
  c.data_on_device = 'yes'
  assert build(c, small).resident


class _FakeDevice:
  def __init__(self, platform, stats, process_index=0):
    self.platform, self._stats, self.process_index = platform, stats, process_index

  def memory_stats(self):
    return self._stats


class _FakeMesh:
  def __init__(self, *devices):
    self.devices = np.array(devices)


def test_auto_lanes_and_resident_limits_per_platform(caplog):
  """CPU: 1 GiB resident over all the host's copies and one lane; an accelerator: a quarter
  of its memory (1 GiB when it reports none) and every client of the cohort side by side, up
  to MAX_ACCELERATOR_LANES, for clients of equal size (fewer lanes would run more steps)."""
  cpu = _FakeMesh(_FakeDevice('cpu', None))
  gpu = _FakeMesh(_FakeDevice('gpu', {'bytes_limit': 80 << 30}))
  assert run_lib._resident_bytes(cpu) == run_lib.RESIDENT_BYTES
  # 8 CPU devices of this process hold 8 copies in its memory; another host's hold none.
  assert run_lib._resident_bytes(_FakeMesh(*[_FakeDevice('cpu', None)] * 8)) == (
      run_lib.RESIDENT_BYTES // 8)
  assert run_lib._resident_bytes(_FakeMesh(*[_FakeDevice('cpu', None)] * 4 + [
      _FakeDevice('cpu', None, process_index=1)] * 4)) == run_lib.RESIDENT_BYTES // 4
  assert run_lib._resident_bytes(gpu) == 20 << 30
  assert run_lib._resident_bytes(_FakeMesh(_FakeDevice('tpu', None))) == run_lib.RESIDENT_BYTES
  c = base_config()
  c.cohort_size = 200
  n = np.full(1000, 100)
  assert run_lib._auto_lanes(c, cpu, n) == 1
  assert run_lib._auto_lanes(c, gpu, n) == run_lib.MAX_ACCELERATOR_LANES
  c.cohort_size = 10
  assert run_lib._auto_lanes(c, gpu, n) == 10
  c.lanes_per_device = 3
  assert run_lib._auto_lanes(c, gpu, n) == 3
  assert not caplog.records
  c.lanes_per_device = 1000  # lanes without a client would compute padding only
  assert run_lib._auto_lanes(c, gpu, n) == run_lib._auto_lanes(c, cpu, n) == 10
  assert 'config.lanes_per_device=1000: a cohort of 10 clients over 1 device(s) fills 10 lanes' \
      in caplog.text
  two = _FakeMesh(_FakeDevice('cpu', None))
  two.devices = np.array([two.devices[0]] * 2)
  c.cohort_size, c.lanes_per_device = 5, 4
  assert run_lib._auto_lanes(c, two, n) == 3


def test_auto_lanes_on_an_accelerator_pack_heavy_tailed_clients_onto_fewer(caplog):
  """Stack-Overflow-shaped sizes at cohort 50: one client a lane runs every lane to the
  longest client (padding ~0.24 on the H200); far fewer lanes run as many steps, at most
  LANE_STEP_SLACK more. The choice is the same for every seed (one program per setting)."""
  caplog.set_level(logging.INFO)
  gpu = _FakeMesh(_FakeDevice('gpu', None))
  n = np.clip(np.random.default_rng(0).lognormal(np.log(60), 1.0, 1000), 2, 2000).astype(int)
  n[::7] = 0  # clients without data are never drawn
  c = base_config()
  c.cohort_size, c.batch_size = 50, 16.0
  lanes = run_lib._auto_lanes(c, gpu, n)
  assert 5 <= lanes <= 20
  eligible = np.flatnonzero(n > 0)
  draw = np.random.default_rng(1)
  cohorts = [fathom.integer_schedule(1.0, 16.0, n[draw.choice(eligible, 50, replace=False)])[1]
             for _ in range(200)]
  fewer, every = (np.mean([longest_lane(s, k) for s in cohorts]) for k in (lanes, 50))
  assert fewer <= 1.15 * every  # on cohorts the estimate did not draw
  assert f'lanes per device: {lanes}, of the 50 the cohort fills' in caplog.text
  c.seed = 5
  assert run_lib._auto_lanes(c, gpu, n) == lanes
  c.batch_size, c.epochs = 1.0, 2.0  # long clients: relatively the same, the same choice
  assert abs(run_lib._auto_lanes(c, gpu, n) - lanes) <= 2


def test_auto_conv_and_local_loop_per_platform():
  """The CNN: matmul convolutions on CPU and GPU, nn.Conv elsewhere; the host-driven loop
  only for nn.Conv on CPU; explicit values win."""
  cpu, gpu, tpu = (_FakeMesh(_FakeDevice(p, None)) for p in ('cpu', 'gpu', 'tpu'))
  c = base_config()
  c.model.name = 'emnist_cnn'
  assert [run_lib._auto_conv(c, m) for m in (cpu, gpu, tpu)] == ['matmul', 'matmul', 'xla']
  assert run_lib._local_loop(c, cpu, 'xla') == 'host'
  assert run_lib._local_loop(c, cpu, 'matmul') == 'device'
  assert run_lib._local_loop(c, gpu, 'xla') == 'device'
  c.model.conv, c.local_loop = 'xla', 'device'
  assert run_lib._auto_conv(c, cpu) == 'xla'
  assert run_lib._local_loop(c, cpu, 'xla') == 'device'
  c.model.name, c.local_loop = 'mlp', 'auto'
  assert run_lib._local_loop(c, cpu, 'xla') == 'device'
  c.model.name, c.model.conv = 'emnist_cnn', 'pallas'  # for a GPU; on CPU it warns and runs
  assert [run_lib._auto_conv(c, m) for m in (cpu, gpu)] == ['pallas', 'pallas']


def test_compile_ahead_per_platform_and_algorithm(caplog):
  """auto: FATHOM on accelerators only, where its B can move; never with the host-driven loop
  (which has no round program: 'yes' there is said to compile the evaluation alone); explicit
  values win."""
  cpu, gpu = (_FakeMesh(_FakeDevice(p, None)) for p in ('cpu', 'gpu'))
  c = base_config()
  c.algorithm = 'fathom'
  assert [run_lib._compile_ahead(c, m, 'device') for m in (cpu, gpu)] == [False, True]
  assert not run_lib._compile_ahead(c, gpu, 'host')
  for field in ('eta_h', 'eta_h2'):  # B stays put: no other padded size to compile
    frozen = base_config()
    frozen.algorithm, frozen[field] = 'fathom', 0.0
    assert not run_lib._compile_ahead(frozen, gpu, 'device')
  c.algorithm = 'fedavg'
  assert not run_lib._compile_ahead(c, gpu, 'device')
  assert not caplog.records
  c.compile_ahead = 'yes'
  assert run_lib._compile_ahead(c, cpu, 'device')
  assert not caplog.records
  assert not run_lib._compile_ahead(c, cpu, 'host')
  assert [r.getMessage() for r in caplog.records] == [
      "config.compile_ahead='yes' compiles only the evaluation ahead: the local loop is driven "
      "by the host (config.local_loop='auto' chose it for this model and platform), one jitted "
      "step a call, with no round program to compile ahead"]
  c.algorithm, c.compile_ahead = 'fathom', 'no'
  assert not run_lib._compile_ahead(c, gpu, 'device')


def test_evaluation_ahead_per_platform():
  """The evaluation's program: auto on accelerators whatever the algorithm (FedAvg's too);
  explicit values win."""
  cpu, gpu = (_FakeMesh(_FakeDevice(p, None)) for p in ('cpu', 'gpu'))
  c = base_config()
  for algorithm in ('fathom', 'fedavg'):
    c.algorithm = algorithm
    assert [run_lib._evaluation_ahead(c, m) for m in (cpu, gpu)] == [False, True]
  c.compile_ahead = 'yes'
  assert run_lib._evaluation_ahead(c, cpu)
  c.compile_ahead = 'no'
  assert not run_lib._evaluation_ahead(c, gpu)


def test_loop_chunk_resolved(caplog):
  """auto checks the device loop's bound at every step; the host-driven loop has no chunk,
  and a chunk set for it is said to change nothing (auto may choose that loop by platform)."""
  c = base_config()
  assert run_lib._loop_chunk(c, 'device') == 1
  assert run_lib._loop_chunk(c, 'host') == 1
  c.loop_chunk = 1
  assert run_lib._loop_chunk(c, 'host') == 1
  assert not caplog.records
  c.loop_chunk = 8
  assert run_lib._loop_chunk(c, 'device') == 8
  assert not caplog.records
  assert run_lib._loop_chunk(c, 'host') == 1
  assert [r.getMessage() for r in caplog.records] == [
      "config.loop_chunk=8 is not read: the local loop is driven by the host "
      "(config.local_loop='auto' chose it for this model and platform), one step a call"]


def test_matmul_precision_reaches_the_programs_and_auto_restores_the_setting_before_it():
  start = jax.config.jax_default_matmul_precision
  task = tiny_task()
  try:
    run = build(tiny_config(matmul_precision='highest'), task)
    assert run_lib.matmul_precision() == 'highest'
    state = run_lib.init_state(run)
    batch = {k: v[:4] for k, v in task.train.client(0).items()}
    grad = jax.jit(jax.grad(run.model.loss))
    hlo = grad.lower(state.params, batch, np.ones(4, bool), jax.random.key(0)).as_text()
    assert 'HIGHEST' in hlo  # the local step's matmuls, backward pass included
    build(tiny_config(matmul_precision='auto'), task)
    assert jax.config.jax_default_matmul_precision == start
    hlo = jax.jit(jax.grad(run.model.loss)).lower(
        state.params, batch, np.ones(4, bool), jax.random.key(0)).as_text()
    assert 'HIGHEST' not in hlo or start == 'highest'
  finally:
    jax.config.update('jax_default_matmul_precision', start)


def test_auto_matmul_precision_keeps_a_setting_made_outside_any_run():
  start = jax.config.jax_default_matmul_precision
  try:
    jax.config.update('jax_default_matmul_precision', 'high')  # e.g. in a notebook
    build(tiny_config(matmul_precision='auto'), tiny_task())
    assert run_lib.matmul_precision() == 'high'
  finally:
    jax.config.update('jax_default_matmul_precision', start)


_BASE = 'from fathom_sim.config import base_config\n\n\ndef get_config():\n  c = base_config()\n'


@pytest.mark.parametrize('body,needle', [
    ('def get_config(:\n', '(SyntaxError, line 1)'),
    ('import no_such_module_xyz\n', "ModuleNotFoundError: No module named 'no_such_module_xyz'"),
    ('def get_config():\n  raise RuntimeError("boom")\n',
     ": get_config() raised RuntimeError: boom (line 2)"),
    ('x = 1\n', 'defines no get_config()'),
    ('def get_config():\n  return "x"\n', ": get_config() returned str; it must return the "
     'config (an ml_collections.ConfigDict'),
    ('def get_config():\n  return None\n', ': get_config() returned NoneType; it must return'),
    # absl said 'FrozenConfigDict is immutable. Cannot call lock().'
    (_BASE + '  import ml_collections\n  return ml_collections.FrozenConfigDict(c)\n',
     ': get_config() returned FrozenConfigDict; it must return the config (an '
     'ml_collections.ConfigDict, not frozen'),
    (_BASE + '  c.eta = True\n  return c\n', ', line 6: config.eta must be a number, got True'),
    (_BASE + '  del c["eval_every"]\n  return c\n', 'config.eval_every is missing'),
    (_BASE + '  c.cohort_sze = 5\n  return c\n',
     "unknown config field config.cohort_sze (the config has no field 'cohort_sze'); did you "
     "mean cohort_size? (the fields are base_config()'s, fathom_sim/config.py)"),
    (_BASE + '  c.model.hiden = 5\n  return c\n',
     "unknown config field config.model.hiden (config.model has no field 'hiden'); did you "
     "mean hidden?"),
    (_BASE + '  del c["model"]\n  c.model = 5\n  return c\n',
     'config.model is a value where base_config() has a group of fields (compute_dtype, '),
    # ml_collections said "Could not override field 'model' (reference). mlp is of original
    # type <class 'str'> and cannot be casted to type <class 'fathom_sim.config._Fields'>".
    (_BASE + '  c.model = "mlp"\n  return c\n',
     ", line 6: config.model is a group of fields (model.compute_dtype, model.conv, "
     "model.expected_length, model.hidden, model.init, model.name); set one of them, e.g. "
     "config.model.name = 'mlp'"),
])
def test_a_broken_config_file_is_one_line_naming_it(tmp_path, body, needle):
  """The file's own error (syntax, import, get_config raising), a field it lost and a field it
  misspelt: one line and exit 2, before any workdir is made. A misspelt field was ignored."""
  from tests.test_cli import launch
  path = tmp_path / 'mine.py'
  path.write_text(body)
  workdir = tmp_path / 'run'
  p = launch(f'--config={path}', f'--workdir={workdir}')
  assert p.returncode == 2, p.stderr[-2000:]
  errors = [line for line in p.stderr.splitlines() if line.startswith('error:')]
  assert len(errors) == 1 and needle in errors[0], p.stderr[-2000:]
  assert 'Traceback' not in p.stderr and not workdir.exists()


def test_the_last_of_two_config_files_is_the_one_checked(tmp_path):
  """absl loads the last --config given (tpu_pod.sh puts its own before the user's flags);
  the early check read the first, so a broken second file got through as a traceback."""
  from tests.test_cli import QUICKSTART, launch
  path = tmp_path / 'mine.py'
  path.write_text('def get_config():\n  raise RuntimeError("boom")\n')
  workdir = tmp_path / 'run'
  p = launch(f'--config={QUICKSTART}', f'--config={path}', f'--workdir={workdir}')
  assert p.returncode == 2 and 'Traceback' not in p.stderr, p.stderr[-2000:]
  errors = [line for line in p.stderr.splitlines() if line.startswith('error:')]
  assert errors == [f"error: --config {str(path)!r}: get_config() raised RuntimeError: boom "
                    "(line 2)"] and not workdir.exists()


def _one_error_line(p, workdir) -> str:
  assert p.returncode == 2 and 'Traceback' not in p.stderr, p.stderr[-2000:]
  errors = [line for line in p.stderr.splitlines() if line.startswith('error:')]
  assert len(errors) == 1 and not workdir.exists(), p.stderr[-2000:]
  return errors[0]


def test_two_config_files_and_an_override_are_read_as_the_last_file_with_it(tmp_path):
  """tpu_pod.sh passes its own --config before the user's flags: with an override too, absl
  stopped on "The flag 'config.num_rounds' is defined twice" (config_flags defines the
  overrides' flags once per --config), naming nothing the user gave."""
  from tests.test_cli import QUICKSTART, launch
  workdir = tmp_path / 'run'
  for first in ([f'--config={QUICKSTART}'], ['--config', QUICKSTART]):
    p = launch(*first, f'--config={QUICKSTART}', '--config.num_rounds=-1', f'--workdir={workdir}')
    assert _one_error_line(p, workdir) == (
        'error: config.num_rounds must be in [1, 2147483647], got -1')


@pytest.mark.parametrize('form', ['utf-16', 'pyc'])
def test_a_config_file_that_is_not_python_source_is_one_line(tmp_path, form):
  """A config saved as UTF-16 (NUL bytes: Python's SyntaxError then names no file and no line)
  ended in a TypeError traceback; a compiled .pyc loaded here, then failed as config_flags read
  it as source."""
  import py_compile

  from tests.test_cli import QUICKSTART, launch
  path = tmp_path / ('config.py' if form == 'utf-16' else 'config.pyc')
  if form == 'utf-16':
    path.write_text(open(QUICKSTART).read(), encoding='utf-16')
  else:
    py_compile.compile(QUICKSTART, cfile=str(path), doraise=True)
  workdir = tmp_path / 'run'
  p = launch(f'--config={path}', f'--workdir={workdir}')
  assert _one_error_line(p, workdir) == (
      f'error: --config {str(path)!r} could not be loaded: source code string cannot contain '
      'null bytes (SyntaxError)')


def test_a_config_path_holding_a_colon_is_said_as_such(tmp_path):
  """config_flags splits --config at ':' (file.py:ARG): the error named a file that is not there
  ('no such config file .../a'), not why."""
  from tests.test_cli import QUICKSTART, launch
  (tmp_path / 'a:b').mkdir()
  path = tmp_path / 'a:b' / 'q.py'
  path.write_text(open(QUICKSTART).read())
  workdir = tmp_path / 'run'
  p = launch(f'--config={path}', f'--workdir={workdir}')
  assert _one_error_line(p, workdir) == (
      f"error: --config {str(path)!r}: config_flags takes what follows ':' for get_config's "
      "argument, so a path holding ':' cannot be given; link or copy the file to a path "
      'without one')


def test_flag_files_are_read_before_the_config_is_checked(tmp_path):
  """--flagfile was read by config_flags while main.py defined --config, at import: a missing
  one was a traceback, and a --config in one skipped the early checks (a broken file's error
  came out as a traceback)."""
  from tests.test_cli import launch
  workdir = tmp_path / 'run'
  missing = tmp_path / 'missing.flags'
  p = launch(f'--flagfile={missing}', f'--workdir={workdir}')
  assert _one_error_line(p, workdir) == (
      f"error: --flagfile: Unable to open flagfile: [Errno 2] No such file or directory: "
      f"{str(missing)!r}")
  broken = tmp_path / 'mine.py'
  broken.write_text('def get_config():\n  raise RuntimeError("boom")\n')
  flagfile = tmp_path / 'run.flags'
  flagfile.write_text(f'--config={broken}\n')
  p = launch(f'--flagfile={flagfile}', f'--workdir={workdir}')
  assert _one_error_line(p, workdir) == (
      f"error: --config {str(broken)!r}: get_config() raised RuntimeError: boom (line 2)")


def test_fedavg_takes_static_values_above_fathoms_bounds():
  """The bounds are FATHOM's: FedAvg's static eta, E and B are used as given."""
  c = base_config()
  c.algorithm, c.eta, c.upper_eta = 'fedavg', 0.8, 0.5
  check_config(c)


@pytest.mark.parametrize('fields,needle', [
    (dict(batch_size=1e8), r'config.epochs=1.5, config.batch_size=1e\+08: one local step of '
                           r'100000000 examples \(\d+ bytes each\) .* more than the host.s '
                           r'memory \(1.0 GiB\); lower config.batch_size'),
    (dict(epochs=1e9), r'config.epochs=1e\+09, config.batch_size=\d+: the largest client '
                       r'\(\d+ examples\) would take \d+ local steps'),
    # E n / B_int past 2^63 wrapped around int64 to a negative step count, taken: round 1
    # failed in planning with a traceback, and its workdir refused the corrected command.
    (dict(epochs=1e20), r'config.epochs=1e\+20, config.batch_size=\d+: the largest client '
                        r'\(\d+ examples\) would take \d{20,} local steps'),
    # E 1e6 planned 2e9 indices a round: 16 GB of the host's memory and growing, for hours.
    (dict(epochs=1e8), r'config.epochs=1e\+08, config.batch_size=\d+: a round with the largest '
                       r'client \(9 examples\) plans 900000000 example indices for each of its '
                       r'\d+ lane\(s\), \d+.\d GiB, more than the host.s memory \(1.0 GiB\); '
                       r'lower config.epochs or raise config.batch_size'),
    # Each client fits, but the first round's cohort shares one lane: refused in round 1, after
    # the workdir was written (the quickstart at E 1e6 on a 2-core CPU).
    (dict(epochs=4e6, num_devices=1), r"config.epochs=4e\+06, config.batch_size=3: the first "
                                      r"round's 5 clients over 1 lane\(s\) plan at least "
                                      r"116000004 example indices for each of its 1 lane\(s\), "
                                      r"2.2 GiB, more than the host.s memory \(1.0 GiB\)"),
])
@pytest.mark.parametrize('algorithm', ['fedavg', 'fathom'])
def test_a_first_round_that_cannot_run_is_refused_before_the_workdir(tmp_path, monkeypatch,
                                                                      fields, needle, algorithm):
  """Instead of a MemoryError traceback from planning, after the workdir was made."""
  from fathom_sim.train import train_and_evaluate
  monkeypatch.setattr(run_lib, '_memory_bytes', lambda mesh: (1 << 30, "the host's memory"))
  monkeypatch.setattr(run_lib, 'host_memory', lambda: 1 << 30)
  upper = dict(upper_batch_size=2e12, upper_epochs=2e20) if algorithm == 'fathom' else {}
  config = tiny_config(algorithm=algorithm, **upper, **fields)
  with pytest.raises(ConfigError, match=needle):
    train_and_evaluate(config, str(tmp_path / 'run'))
  assert not (tmp_path / 'run').exists()


def test_an_evaluation_batch_past_the_memory_is_refused_before_the_workdir(tmp_path,
                                                                          monkeypatch):
  """It overwrote a finished run's config.json, then failed with a numpy MemoryError. A batch
  is no larger than the test set (evaluation.batch_rows): here ~2,000 examples of 244 bytes
  against 100 kB, where the parameters and a local step fit."""
  from fathom_sim.train import train_and_evaluate
  monkeypatch.setattr(run_lib, '_memory_bytes', lambda mesh: (100_000, "the host's memory"))
  config = tiny_config(eval_batch_size=10**8, **{'data.num_clients': 400,
                                                  'data.test_fraction': 0.5})
  with pytest.raises(ConfigError, match=r'^config.eval_batch_size=100000000: one evaluation '
                                        r'batch of \d{4} examples \(244 bytes each, the test set '
                                        r'holds \d{4}\) needs 0.0 GiB for its inputs alone, more '
                                        r'than the host.s memory \(0.0 GiB\); lower it'):
    train_and_evaluate(config, str(tmp_path / 'run'))
  assert not (tmp_path / 'run').exists()
  config.eval_batch_size = 64
  train_and_evaluate(config, str(tmp_path / 'run'))


def test_upper_bounds_fathom_could_not_run_at_are_refused_before_the_workdir(tmp_path):
  """B's bound 1e30 with a large eta_h2: rounds 1-2 ran, round 3 failed in planning with a
  traceback ("Maximum allowed dimension exceeded"), after the workdir was written."""
  from fathom_sim.train import train_and_evaluate
  config = tiny_config(algorithm='fathom', upper_batch_size=1e30)
  with pytest.raises(ConfigError, match=r'config.upper_epochs=\d+, config.upper_batch_size='
                                        r'1e\+30: FATHOM may move E and B up to these bounds'):
    train_and_evaluate(config, str(tmp_path / 'run'))
  assert not (tmp_path / 'run').exists()
  build(tiny_config(algorithm='fedavg', upper_batch_size=1e30), tiny_task())  # FedAvg's: unused


def test_the_first_round_memory_bound_is_the_devices_own_or_the_hosts():
  gpu = _FakeMesh(_FakeDevice('gpu', {'bytes_limit': 80 << 30}))
  assert run_lib._memory_bytes(gpu) == (80 << 30, "one gpu device's memory")
  limit, what = run_lib._memory_bytes(_FakeMesh(_FakeDevice('cpu', {})))
  assert what == "the host's memory" and limit > 1 << 30
  build(tiny_config(algorithm='fedavg', batch_size=4096.0), tiny_task())  # big but fits


class _RemoteDevice(_FakeDevice):
  def memory_stats(self):  # as XLA's GPU client answers for another process's device
    raise RuntimeError('FAILED_PRECONDITION: GetAllocatorStats() is allowed only for '
                       'addressable devices')


def test_device_memory_is_asked_of_a_device_this_process_drives():
  """The mesh's first device is process 0's: on any other process of a pod or multi-GPU run,
  its stats were asked for, and refused, before round 1 (or read as zeros on some TPUs, where
  the processes then chose differently whether the data stays on the devices)."""
  mesh = _FakeMesh(_RemoteDevice('gpu', None, process_index=1),
                   _FakeDevice('gpu', {'bytes_limit': 80 << 30}, process_index=0))
  assert run_lib._memory_bytes(mesh) == (80 << 30, "one gpu device's memory")
  assert run_lib._resident_bytes(mesh) == int((80 << 30) * run_lib.RESIDENT_FRACTION)


def test_fields_set_but_not_read_are_listed(tmp_path):
  """FedAvg ignores FATHOM's fields, SGD the other optimizers', generated data data_dir, ...:
  such a setting changed nothing, without a word. Only the fields given are judged."""
  c = base_config()
  c.eta_h, c.upper_eta, c.server_b1, c.server_momentum = 0.5, 0.9, 0.5, 0.5
  c.model.conv, c.data.data_dir, c.data.num_clients = 'xla', 'x', 50
  c.data.shared_glyphs = True
  fields = ['eta_h', 'upper_eta', 'server_b1', 'server_momentum', 'model.conv',
            'data.data_dir', 'data.num_clients', 'data.shared_glyphs', 'eta']
  assert unread_fields(c, fields) == ["server_b1=0.5 (server_optimizer is sgd)",
                                      "server_momentum=0.5 (server_optimizer is sgd)",
                                      "model.conv='xla' (model.name is mlp)",
                                      "data.data_dir='x' (data.name is synthetic)",
                                      'data.shared_glyphs=True (data.name is synthetic)']
  c.algorithm, c.server_optimizer, c.data.name = 'fedavg', 'adam', 'femnist'
  c.model.name, c.model.hidden = 'emnist_cnn', (3,)
  assert unread_fields(c, fields + ['model.hidden']) == [
      'eta_h=0.5 (algorithm is fedavg)', 'upper_eta=0.9 (algorithm is fedavg)',
      "server_momentum=0.5 (server_optimizer is adam)",
      'data.num_clients=50 (data.name is femnist)',
      'data.shared_glyphs=True (data.name is femnist)',
      'model.hidden=(3,) (model.name is emnist_cnn)']
  assert unread_fields(c, ['eta', 'seed']) == []
  # Only the real FEMNIST flips its pixels (the generated data's recorded runs stay as made).
  c.data.flip_pixels = True
  assert unread_fields(c, ['data.flip_pixels']) == []
  for name in ('npz', 'femnist_synthetic'):
    c.data.name = name
    assert unread_fields(c, ['data.flip_pixels']) == [
        f'data.flip_pixels=True (data.name is {name})']
  # The generated FEMNIST-shaped data reads these, so a resume cannot change them.
  c.data.name = 'femnist_synthetic'
  assert unread_fields(c, ['data.shared_glyphs', 'data.in_memory']) == []
  saved = flatten(config_dict(c))
  c.data.shared_glyphs = False
  assert differing(saved, flatten(config_dict(c)), RESUMABLE_FIELDS) == ['data.shared_glyphs']
  # A .npz file is split by test_fraction and seed; a folder of train.npz and test.npz is not.
  c.data.name, c.data.path = 'npz', str(tmp_path / 'clients.npz')
  assert unread_fields(c, ['data.test_fraction', 'data.seed']) == []
  c.data.path = str(tmp_path)
  assert unread_fields(c, ['data.test_fraction', 'data.seed']) == [
      f'data.test_fraction={c.data.test_fraction!r} (data.path is a folder of train.npz and '
      'test.npz)', 'data.seed=0 (data.path is a folder of train.npz and test.npz)']


def test_the_run_command_warns_of_fields_set_on_it_that_the_run_does_not_read(caplog):
  from absl import flags
  from ml_collections import config_flags
  from launch import cli
  from tests.test_cli import QUICKSTART
  values = flags.FlagValues()
  argv = ['main.py', f'--config={QUICKSTART}', '--config.algorithm=fedavg',
          '--config.eta_h=0.5']
  config_flags.DEFINE_config_file('config', flag_values=values, sys_argv=argv)
  values(argv)
  cli.warn_unread(values.config, config_flags.get_override_values(values['config']))
  assert ('set on the command line but not read by this run: eta_h=0.5 (algorithm is fedavg)'
          in caplog.text)


@pytest.mark.parametrize('line,said', [
    # ml_collections cast True to 1.0: the run trained at eta 1.0, config.json saying 1.0
    ('c.eta = True', 'config.eta must be a number, got True'),
    ('c.data.alpha = False', 'config.data.alpha must be a number, got False'),
    ('c.target_accuracy = True', 'config.target_accuracy must be a number, got True'),
    # ml_collections' words: "Could not override field 'cohort_size' (reference). ..."
    ('c.cohort_size = 2.5', 'config.cohort_size must be an integer, got 2.5 (float)'),
    ('c.data.path = 3', 'config.data.path must be a string, got 3 (int)'),
    ("c.model.hidden = '64'", "config.model.hidden must be a tuple, got '64' (str)"),
])
def test_a_config_file_setting_a_field_to_another_kind_is_refused_naming_it(tmp_path, line,
                                                                            said):
  from fathom_sim.config import call_user_file
  path = tmp_path / 'mine.py'
  path.write_text('from fathom_sim.config import base_config\n\n\ndef get_config():\n'
                  f'  c = base_config()\n  {line}\n  return c\n')
  with pytest.raises(ConfigError) as e:
    call_user_file(str(path), 'get_config', '--config')
  assert str(e.value) == f"--config '{path}', line 6: {said}"


def test_a_config_files_own_values_of_the_fields_kinds_still_pass(tmp_path):
  """What a config file may set: an int for a float field, a list for a tuple, a bool for a
  bool, whole groups' fields one by one, and a copy of the config (which knows no group)."""
  c = base_config()
  c.eta, c.model.hidden, c.clip_log_params, c.data.name = 1, [8, 4], True, 'npz'
  assert (c.eta, c.model.hidden, c.clip_log_params) == (1.0, (8, 4), True)
  import ml_collections
  c.model = ml_collections.ConfigDict(c.model.to_dict())  # a whole group, plain, as before
  with pytest.raises(ConfigError, match=r'^config\.model\.hidden must be a tuple'):
    c.model.hidden = 3
  with c.ignore_type():  # ml_collections' own way past its types: left to check_config
    c.eta = True
  c.eta = 0.1
  copy = c.copy_and_resolve_references()
  copy.seed = 3
  with pytest.raises(ConfigError, match=r'^config\.hidden must be a tuple, got 3 \(int\)$'):
    copy.model.hidden = 3


def test_a_generated_set_past_the_hosts_memory_is_refused_before_it_is_made():
  """1,000 clients of 100,000 examples each: 24 GiB of generated data on a 24 GiB host ran
  for minutes, then ended out of memory without a word."""
  c = tiny_config()
  c.data.num_clients, c.data.min_examples, c.data.max_examples = 10**7, 10**5, 10**5
  with pytest.raises(ConfigError, match=r'^config\.data\.num_clients=10,000,000 with config\.'
                     r'data\.min_examples=100,000: the generated set holds 227\d{3}\.\d GiB '
                     r"at least \(244 bytes an example\), more than the host's memory"):
    check_config(c)
  c.data.name = 'femnist_synthetic'  # (made one client at a time: not this check's)
  check_config(c)


def test_ctrl_c_while_the_config_file_loads_is_one_line(tmp_path):
  """A KeyboardInterrupt there (the file's own, or Ctrl-C while it ran) was a traceback."""
  from tests.test_cli import launch
  path = tmp_path / 'mine.py'
  path.write_text('def get_config():\n  raise KeyboardInterrupt\n')
  p = launch(f'--config={path}', f'--workdir={tmp_path / "run"}')
  assert p.returncode == 130 and 'Traceback' not in p.stderr, p.stderr[-2000:]
  assert p.stderr.strip().splitlines()[-1] == (
      f"error: interrupted while --config '{path}' was loading; nothing was started")
  assert not (tmp_path / 'run').exists()


def test_a_model_whose_parameters_exceed_the_memory_is_refused_before_the_workdir(tmp_path):
  """Its first state ran out of memory after config.json and the workdir's lock were made."""
  from fathom_sim.train import train_and_evaluate
  config = tiny_config(**{'model.hidden': (10**11,)})
  with pytest.raises(ConfigError, match=r'^config\.model: its parameters alone take 2\d{4}\.\d '
                     r"GiB( \(x\d devices' copies\))?, more than the host's memory "
                     r'\(\d+\.\d GiB\); a smaller model'):
    train_and_evaluate(config, str(tmp_path / 'run'))
  assert not (tmp_path / 'run').exists()


def test_npz_classes_that_make_the_model_too_big_are_named_as_the_cause(tmp_path):
  """One stray label of 2^31 - 2 (data.num_classes 0: taken from the labels) made a model of
  terabytes, and the error blamed config.model alone."""
  from fathom_sim.train import train_and_evaluate
  path = str(tmp_path / 'd.npz')
  np.savez(path, x=np.zeros((4, 8), np.float32), y=np.array([0, 1, 2, 2**31 - 2]),
           num_examples=np.array([2, 2]))
  config = tiny_config(cohort_size=2, **{'model.hidden': (1000,)})
  config.data.name, config.data.path, config.data.num_classes = 'npz', path, 0
  with pytest.raises(ConfigError) as e:
    train_and_evaluate(config, str(tmp_path / 'run'))
  assert str(e.value).endswith(
      'a smaller model (config.model.hidden, config.model.name), or fewer classes '
      f'(2,147,483,647: the largest label of {path} + 1, as data.num_classes is 0)'), str(e.value)
  assert not (tmp_path / 'run').exists()


def test_a_group_set_to_a_value_is_refused_in_our_words_but_none_and_ignore_type_pass():
  """The refusal of `c.model = 'mlp'` (ml_collections' "cannot be casted to type <class
  '..._Fields'>") refused None and values set under ignore_type() too, which ml_collections
  lets through (a config file may build a group by hand)."""
  from fathom_sim.config import ConfigError, base_config
  c = base_config()
  with pytest.raises(ConfigError, match=r"^config\.data is a group of fields \(data\.alpha, .*\); "
                     r"set one of them, e\.g\. config\.data\.name = 5$"):
    c.data = 5
  c.model = None
  assert c.model is None
  c = base_config()
  with c.ignore_type():
    c.model = 'mlp'
  assert c.model == 'mlp'

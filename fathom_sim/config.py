"""Every config field, its default and its check: the one place a field is defined.

Files in configs/ start from `base_config()` and override. `check_config` runs before any data
is read or anything is compiled, and raises `ConfigError` naming the field and what is accepted.
"""

from __future__ import annotations

import difflib
import importlib.machinery
import importlib.util
import math
import os
import traceback
from typing import Iterable

import ml_collections

from fathom_sim.errors import MOUNT_HINT, InputError, is_url

ALGORITHMS = ('fathom', 'fedavg')
MATMUL_PRECISIONS = ('auto', 'default', 'high', 'highest')
MAX_GENERATED_CLIENTS = 10_000_000  # data.num_clients: ~30x Stack Overflow's users


class ConfigError(InputError):
  """A config field out of range or of the wrong type."""


_KINDS = ((bool, 'true or false'), (int, 'an integer'), (float, 'a number'),
          (str, 'a string'), (tuple, 'a tuple'))


class _Fields(ml_collections.ConfigDict):
  """base_config's ConfigDict: a value of another kind than its field's, set in a config file,
  is refused in the simulator's words. ml_collections casts True to 1.0 for a float field (a
  config file's `c.eta = True` trained at eta 1.0, config.json saying 1.0), and says a cast it
  refuses as "Could not override field 'cohort_size' (reference)"."""

  def __setitem__(self, key, value):
    fields = self._fields
    current = fields.get(key)
    current = current.get() if isinstance(current, ml_collections.FieldReference) else current
    kind = next((said for t, said in _KINDS if isinstance(current, t)), None)
    where = f'{self.__dict__.get("_where", "")}{key}'  # (a copy knows no group)
    if isinstance(current, _Fields) and isinstance(value, (ml_collections.ConfigDict, dict)) and (
        not isinstance(value, _Fields)):  # a whole group given as a plain ConfigDict, as before
      group = _group(f'{where}.')
      for k, v in value.items():
        group[k] = v
      value = group
    if (isinstance(current, _Fields) and not isinstance(value, _Fields) and value is not None
        and self._type_safe):  # (None and ignore_type() pass, as ml_collections lets them)
      # (ml_collections said "Could not override field 'model' (reference). mlp is of
      # original type <class 'str'> and cannot be casted to type <class '..._Fields'>".)
      field = 'name' if 'name' in current else next(iter(current.keys()), None)
      raise ConfigError(f'config.{where} is a group of fields ('
                        + ', '.join(f'{where}.{k}' for k in current.keys()) + ')'
                        + (f'; set one of them, e.g. config.{where}.{field} = {value!r}'
                           if field else ''))
    if (kind and self._type_safe and isinstance(value, bool)  # (not under ignore_type())
        and not isinstance(current, bool)):
      raise ConfigError(f'config.{where} must be {kind}, got {value}')
    try:
      super().__setitem__(key, value)
    except TypeError:
      if kind is None:
        raise
      raise ConfigError(f'config.{where} must be {kind}, got {value!r} '
                        f'({type(value).__name__})') from None


def _group(where: str) -> _Fields:
  group = _Fields()
  object.__setattr__(group, '_where', where)  # (an attribute, not a field)
  return group


def typed(config: ml_collections.ConfigDict, where: str = '') -> ml_collections.ConfigDict:
  """A copy of `config` in base_config's kind of ConfigDict: a value of another kind than a
  field's, set on it later, is refused in the simulator's words (for a sweep's overrides)."""
  out = _group(where)
  for key, value in config.items():
    out[key] = (typed(value, f'{where}{key}.') if isinstance(value, ml_collections.ConfigDict)
                else value)
  return out


def base_config() -> ml_collections.ConfigDict:
  """All fields, with the FATHOM reference defaults of the FEMNIST task (spec/fathom.md)."""
  c = _Fields()
  c.algorithm = 'fathom'          # 'fathom' (tunes eta, E, B online) or 'fedavg' (static)
  c.num_rounds = 1500
  c.cohort_size = 10              # clients per round
  c.seed = 0                      # cohorts, shuffles, dropout and model init
  c.eval_every = 5                # rounds between evaluations on (sampled) test clients
  c.eval_clients = 0              # test clients per periodic eval; 0 = all of them
  c.eval_batch_size = 1024        # rows of an evaluation batch (at most the test set's)
  c.checkpoint_every = 100
  c.keep_checkpoints = 3          # newest checkpoints kept in <workdir>/checkpoints
  c.target_accuracy = 0.0         # > 0: report rounds/examples to first reach it
  c.max_rejected_rounds = 50      # stop a run whose rounds are rejected (no finite update)
                                  # this many times in a row, counted across resumes (in a
                                  # vectorised group, that seed alone); 0 = never stop
  c.log_every = 10                # rounds between progress lines

  # Client hyperparameters: the static values of FedAvg, the initial values of FATHOM.
  c.eta = 0.1                     # client learning rate
  c.epochs = 1.0                  # local epochs E: K_i = max(1, ceil(E n_i / B_int))
  c.batch_size = 20.0             # B, real since FATHOM moves it; B_int = round(B), a half up

  # FATHOM.
  c.alpha = 0.5                   # decay of the moving average of aggregated updates
  c.eta_h = 0.01                  # hyper learning rate
  c.eta_h0 = 1.0                  # scale of the hypergradient of log E
  c.eta_h1 = 1.0                  # ... of log eta
  c.eta_h2 = 10.0                 # ... of log B
  c.upper_epochs = 10.0
  c.upper_eta = 0.5
  c.upper_batch_size = 5096.0
  c.hyper_optimizer = 'sgd'       # 'sgd' (the paper's) or 'adam'
  c.clip_log_params = False       # also clip phi = log(E, eta, B) to log(upper bounds)

  # Server optimizer: Delta is its gradient; sgd with lr 1.0 is plain FedAvg.
  c.server_optimizer = 'sgd'      # sgd | momentum | adam | yogi | adagrad
  c.server_lr = 1.0
  c.server_momentum = 0.9
  c.server_b1 = 0.9
  c.server_b2 = 0.99
  c.server_eps = 1e-3

  c.model = _group('model.')
  c.model.name = 'mlp'            # logistic | mlp | emnist_cnn | stackoverflow_lstm | lstm
  c.model.hidden = (64,)          # mlp hidden widths; lstm: (embedding, LSTM, dense) widths
  c.model.conv = 'auto'           # emnist_cnn's convolutions: auto | xla | matmul, or a mix
                                  # 'F/X/W' of the two for the forward pass, the input's and
                                  # the kernel's gradients (models.CONV_FORMS; the same
                                  # function; auto: matmul on CPU and GPU, measured);
                                  # pallas: Triton kernels for a GPU (conv_kernels.py)
  c.model.compute_dtype = 'float32'  # float32 | bfloat16: activations and matrix products;
                                  # parameters, updates and FATHOM's statistics stay float32
  c.model.init = 'flax'           # initial values: flax's defaults, or 'fedjax': those of
                                  # FedJAX's Haiku models, which the paper's reference ran
                                  # (configs/femnist.py, stackoverflow.py; models.fedjax_init)
  c.model.expected_length = 0.0   # sequence models' training loss: 0, the mean over the
                                  # batch's non-pad target tokens; > 0, FedJAX's
                                  # stackoverflow_word task's (13.3): each sentence's summed
                                  # token loss / expected_length, mean over sentences

  c.data = _group('data.')
  c.data.name = 'synthetic'       # synthetic | femnist_synthetic | npz | femnist | stackoverflow
  c.data.seed = 0                 # generated data only
  c.data.num_clients = 1000       # generated data only
  c.data.in_memory = False        # femnist_synthetic: make every client once and keep them
  c.data.flip_pixels = False      # femnist: x -> 1 - x, ink 1 on 0 as FedJAX's EMNIST
                                  # loader (the paper's runs) gives it; the files store ink 0
                                  # on 1 (configs/femnist.py sets True)
  c.data.shared_glyphs = False    # femnist_synthetic: both cases of the 15 letters EMNIST
                                  # merges (c i j k l m o p s u v w x y z) share one glyph,
                                  # so labels overlap as FEMNIST's do (loss stays off 0)
  c.data.alpha = 1.0              # Synthetic(alpha, beta)
  c.data.beta = 1.0
  c.data.size_log_mean = 4.0      # client sizes: min_examples + lognormal(mean, sigma)
  c.data.size_log_sigma = 1.0
  c.data.min_examples = 10
  c.data.max_examples = 2000
  c.data.test_fraction = 0.2      # held out of each client when no test split is given
  c.data.path = ''                # npz: a .npz file or a directory with train.npz, test.npz
  c.data.num_classes = 0          # npz: 0 = infer from the labels
  c.data.data_dir = ''            # femnist | stackoverflow: made by launch/prepare_data.py

  # Execution.
  c.num_devices = 0               # devices of the clients mesh; 0 = all
  c.lanes_per_device = 0          # clients trained side by side per device; 0 = auto
  c.data_on_device = 'auto'       # keep the training set on the devices: auto | yes | no
  c.batch_pad_per_octave = 2      # padded batch sizes per doubling (fewer: fewer compiles),
                                  # while B can move; a static B runs as B_int rows
  c.local_loop = 'auto'           # local steps loop on the device or driven by the host: auto |
                                  # device | host (auto: host for nn.Conv models on CPU)
  c.loop_chunk = 0                # device loop: local steps between checks of its bound (a
                                  # known-length inner loop; up to chunk - 1 padding steps);
                                  # 0 = auto: 1, every step (4 was slower on an H100)
  c.compile_ahead = 'auto'        # compile the round for the padded batch sizes around the
                                  # current one, and the evaluation, on threads: auto | yes |
                                  # no (auto, on accelerators, where compiles are slow: the
                                  # rounds for FATHOM, whose B moves; the evaluation always)
  c.matmul_precision = 'auto'     # float32 matmuls and convolutions: auto (JAX's own setting,
                                  # e.g. JAX_DEFAULT_MATMUL_PRECISION) |
                                  # default (TF32 on recent NVIDIA GPUs) | high | highest
                                  # (full float32, what the CPU computes)
  return c


def _describe_failure(error: Exception, path: str) -> str:
  """What a user's Python file (a config or sweep file) raised, as one line, with the line of
  `path` it came from when known."""
  if isinstance(error, SyntaxError):
    # (No file and no line for a source that does not decode, e.g. one saved as UTF-16.)
    where = [error.filename] if error.filename and (
        os.path.abspath(error.filename) != os.path.abspath(path)) else []
    where += [f'line {error.lineno}'] if error.lineno else []
    return f'{error.msg} (SyntaxError' + (', ' + ' '.join(where) if where else '') + ')'
  frames = traceback.extract_tb(error.__traceback__)
  line = next((f.lineno for f in reversed(frames)
               if os.path.abspath(f.filename) == os.path.abspath(path)), None)
  message = ' '.join(str(error).split())  # one line, whatever the exception's text
  return f'{type(error).__name__}: {message}' + (f' (line {line})' if line else '')


def call_user_file(path: str, function: str, what: str, *args):
  """function(*args) of a user's Python file (a config or sweep file), run as a module. A file
  that is not Python, that fails to run, that lacks `function`, or whose function raises, is
  a ConfigError naming the file (`what`: how the user gave it, e.g. '--config')."""
  # As source, whatever its name ends in: config_flags reads a --config file so, and a .pyc
  # loaded here compiled would pass here and fail there as a traceback.
  name = f'_user_{function}'
  spec = importlib.util.spec_from_file_location(
      name, path, loader=importlib.machinery.SourceFileLoader(name, path))
  if spec is None:
    raise ConfigError(f'{what} {path!r} is not a Python file')
  module = importlib.util.module_from_spec(spec)
  # SystemExit too: a file that exits (sys.exit, argparse's parse_args) ended the command
  # with that status and no word, exit 0 for sys.exit(0).
  try:
    spec.loader.exec_module(module)
  except (Exception, SystemExit) as e:  # the user's file, whatever it raises: said in one line
    raise ConfigError(f'{what} {path!r} could not be loaded: {_describe_failure(e, path)}'
                      ) from None
  fn = getattr(module, function, None)
  if not callable(fn):
    raise ConfigError(f'{what} {path!r} defines no {function}()')
  try:
    return fn(*args)
  except ConfigError as e:  # (a field given a value of another kind: _Fields)
    line = _describe_failure(e, path).rpartition(' (line ')[2]
    raise ConfigError(f'{what} {path!r}' + (f', line {line[:-1]}' if line[:-1].isdigit() else '')
                      + f': {e}') from None
  except (Exception, SystemExit) as e:  # noqa: BLE001
    raise ConfigError(f'{what} {path!r}: {function}() raised {_describe_failure(e, path)}'
                      ) from None


def _get(c: ml_collections.ConfigDict, field: str):
  """The value of a dotted field ('data.seed')."""
  for part in field.split('.'):
    c = c[part]
  return c


def _fail(field: str, accepted: str, value) -> None:
  raise ConfigError(f'config.{field} must be {accepted}, got {value!r}')


# The devices compute with these fields in float32: a value past its normal range there
# becomes 0 or inf (eta=1e-46 trained nothing and its rounds were rejected as not finite).
_FLOAT32_TINY, _FLOAT32_MAX = 1.1754943508222875e-38, 3.4028234663852886e+38


def _number(c, field: str, *, low: float | None = None, low_open: bool = False,
            high: float | None = None, high_open: bool = False, integer: bool = False,
            float32: bool = False) -> None:
  value = _get(c, field)
  kinds = (int,) if integer else (int, float)
  if isinstance(value, bool) or not isinstance(value, kinds) or not math.isfinite(value):
    _fail(field, 'an integer' if integer else 'a finite number', value)
  below = low is not None and (value <= low if low_open else value < low)
  above = high is not None and (value >= high if high_open else value > high)
  if below or above:
    lo = '' if low is None else ('(' if low_open else '[') + _bound(low)
    hi = '' if high is None else _bound(high) + (')' if high_open else ']')
    rng = (f'in {lo}, {hi}' if low is not None and high is not None
           else f'> {_bound(low)}' if low_open else f'>= {_bound(low)}' if low is not None
           else f'< {_bound(high)}' if high_open else f'<= {_bound(high)}')
    _fail(field, rng, value)
  if float32 and value != 0 and not _FLOAT32_TINY <= abs(value) <= _FLOAT32_MAX:
    zero = '' if low == 0 and low_open else '0 or '  # (a field that refuses 0 says so above)
    _fail(field, f'{zero}between {_FLOAT32_TINY:.3g} and {_FLOAT32_MAX:.3g} in size (float32\'s '
          'normal numbers: the devices compute with it in float32)', value)


def _choice(c, field: str, choices) -> None:
  value = _get(c, field)
  if value not in choices:
    _fail(field, 'one of ' + ', '.join(map(repr, choices)), value)


def _field_paths(c: ml_collections.ConfigDict, prefix: str = '') -> set[str]:
  paths = set()
  for key, value in c.items():
    if isinstance(value, ml_collections.ConfigDict):
      paths |= _field_paths(value, f'{prefix}{key}.')
    else:
      paths.add(f'{prefix}{key}')
  return paths


def unknown_field(c: ml_collections.ConfigDict, path: str) -> str | None:
  """Why the dotted `path` is not a field of `c` (an override given on a command line or in a
  sweep file), with the names it may have meant; None where it is one."""
  node, parts = c, path.split('.')
  for depth, part in enumerate(parts):
    where = f'config.{".".join(parts[:depth])}' if depth else 'the config'
    if not isinstance(node, ml_collections.ConfigDict):
      return f'unknown config field config.{path} ({where} is a value, not a group of fields)'
    if part not in node:
      close = difflib.get_close_matches(part, list(node.keys()), n=3)
      hint = f'; did you mean {", ".join(close)}?' if close else ''
      return f'unknown config field config.{path} ({where} has no field {part!r}){hint}'
    node = node[part]
  return None


def _check_fields(c: ml_collections.ConfigDict) -> None:
  """A config file's fields must be base_config()'s: a misspelt one (c.cohort_sze = 50) would
  otherwise be ignored and the default used without a word."""
  base = base_config()
  expected, given = _field_paths(base), _field_paths(c)
  for path in sorted(given - expected):
    # Named as a command-line override is (the group that lacks it, its near names); a value
    # given where base_config() has a group of fields is the one case unknown_field accepts.
    why = unknown_field(base, path) or (f'config.{path} is a value where base_config() has a '
                                        f'group of fields ({", ".join(sorted(base[path]))})')
    raise ConfigError(f'{why} (the fields are base_config()\'s, fathom_sim/config.py)')
  for path in sorted(expected - given):
    raise ConfigError(f'config.{path} is missing: a config starts from base_config() '
                      '(fathom_sim/config.py) and overrides its fields')


def _bound(x: float) -> str:
  """A range's end as the message shows it: an integer whole (2147483647, which :g rounds to
  2.14748e+09), a float short."""
  return str(x) if isinstance(x, int) else f'{x:g}'


def check_config(c: ml_collections.ConfigDict) -> None:
  """Raises ConfigError for an unknown or missing field, or the first field that is out of
  range or of the wrong type."""
  # Here, not at the top: every config file imports this module, and a file that cannot be
  # read, or a misspelt --config flag, is then reported without importing JAX (~2 s a start).
  from fathom_sim import fathom, models, server
  from fathom_sim.data import DATASETS
  _check_fields(c)
  _choice(c, 'algorithm', ALGORITHMS)
  _number(c, 'num_rounds', low=1, high=2**31 - 1, integer=True)  # the state's round is int32
  _number(c, 'cohort_size', low=1, integer=True)
  _number(c, 'seed', low=0, high=2**31 - 1, integer=True)
  _number(c, 'eval_every', low=1, integer=True)
  _number(c, 'eval_clients', low=0, integer=True)
  _number(c, 'eval_batch_size', low=1, integer=True)
  _number(c, 'checkpoint_every', low=1, integer=True)
  _number(c, 'keep_checkpoints', low=1, integer=True)
  _number(c, 'target_accuracy', low=0, high=1)
  _number(c, 'max_rejected_rounds', low=0, integer=True)
  _number(c, 'log_every', low=1, integer=True)
  _number(c, 'eta', low=0, low_open=True, float32=True)
  _number(c, 'epochs', low=0, low_open=True, float32=True)
  _number(c, 'batch_size', low=0, low_open=True, float32=True)
  _number(c, 'alpha', low=0, high=1, high_open=True, float32=True)
  _number(c, 'eta_h', low=0, float32=True)
  for field in ('eta_h0', 'eta_h1', 'eta_h2'):
    _number(c, field, low=0, float32=True)
  for field in ('upper_epochs', 'upper_eta', 'upper_batch_size'):
    _number(c, field, low=0, low_open=True, float32=True)
  if c.algorithm == 'fathom':  # FedAvg applies no bounds to its static values
    for field in ('epochs', 'eta', 'batch_size'):
      if c[field] > c[f'upper_{field}']:
        raise ConfigError(f'config.{field} ({c[field]:g}) is above config.upper_{field} '
                          f'({c[f"upper_{field}"]:g}): FATHOM clips it to the bound from round '
                          f'1, so the run would not start where the config says; lower '
                          f'{field} or raise upper_{field}')
  _choice(c, 'hyper_optimizer', fathom.HYPER_OPTIMIZERS)
  if not isinstance(c.clip_log_params, bool):
    _fail('clip_log_params', 'True or False', c.clip_log_params)
  for field in ('in_memory', 'shared_glyphs', 'flip_pixels'):
    if not isinstance(c.data[field], bool):
      _fail(f'data.{field}', 'True or False', c.data[field])
  _choice(c, 'server_optimizer', server.SERVER_OPTIMIZERS)
  _number(c, 'server_lr', low=0, low_open=True, float32=True)
  _number(c, 'server_momentum', low=0, high=1, high_open=True, float32=True)
  _number(c, 'server_b1', low=0, high=1, high_open=True, float32=True)
  _number(c, 'server_b2', low=0, high=1, high_open=True, float32=True)
  _number(c, 'server_eps', low=0, low_open=True, float32=True)
  _choice(c, 'model.name', models.MODELS)
  hidden = c.model.hidden
  if not (isinstance(hidden, (tuple, list)) and all(
      isinstance(h, int) and not isinstance(h, bool) and h > 0 for h in hidden)):
    _fail('model.hidden', 'a tuple of positive integers, e.g. (64,)', hidden)
  if c.model.name == 'lstm' and len(hidden) != 3:
    _fail('model.hidden', '(embedding, LSTM, dense) widths for model.name lstm, e.g. '
          '(96, 670, 96)', hidden)
  _choice(c, 'model.conv', ('auto',) + models.CONV_FORMS)
  _choice(c, 'model.compute_dtype', tuple(models.COMPUTE_DTYPES))
  _choice(c, 'model.init', models.INITS)
  _number(c, 'model.expected_length', low=0, float32=True)
  if c.model.expected_length and c.model.name not in models.SEQUENCE_MODELS:
    _fail('model.expected_length', f'0 for model.name {c.model.name!r} (it sets the training '
          f'loss of the sequence models, {", ".join(models.SEQUENCE_MODELS)})',
          c.model.expected_length)
  _choice(c, 'data.name', DATASETS)
  _number(c, 'data.seed', low=0, integer=True)
  _number(c, 'data.num_clients', low=1, integer=True)
  if (c.data.num_clients > MAX_GENERATED_CLIENTS  # else a run that sets up for hours, or OOMs
      and 'num_clients' in _DATA_FIELDS.get(c.data.name, ())):
    _fail('data.num_clients', f'at most {MAX_GENERATED_CLIENTS:,} (generated clients are '
          'drawn one by one: a million take about a minute to set up)', c.data.num_clients)
  _number(c, 'data.alpha', low=0)
  _number(c, 'data.beta', low=0)
  _number(c, 'data.size_log_sigma', low=0)
  _number(c, 'data.size_log_mean', low=-20, high=20)
  _number(c, 'data.min_examples', low=1, integer=True)
  _number(c, 'data.max_examples', low=c.data.min_examples, integer=True)
  if c.data.name == 'synthetic':
    # Made whole and held from the start: past the host's memory its set-up ran for minutes,
    # then ended out of memory without a word. Every client holds min_examples at least.
    from fathom_sim.data.plan import host_memory
    from fathom_sim.data.synthetic import SYNTHETIC_DIM
    example = 4 * SYNTHETIC_DIM + 4
    least = c.data.num_clients * c.data.min_examples * example
    host = host_memory()
    if least > host:
      raise ConfigError(
          f'config.data.num_clients={c.data.num_clients:,} with config.data.min_examples='
          f'{c.data.min_examples:,}: the generated set holds {least / 2**30:.1f} GiB at least '
          f'({example} bytes an example), more than the host\'s memory ({host / 2**30:.1f} '
          'GiB); lower either')
  _number(c, 'data.test_fraction', low=0, high=1, high_open=True)
  _number(c, 'data.num_classes', low=0, high=2**31 - 1, integer=True)  # labels are int32
  if c.data.name == 'npz' and not c.data.path:
    _fail('data.path', 'a .npz file or a directory (data.name is npz)', c.data.path)
  field = {'npz': 'path', 'femnist': 'data_dir', 'stackoverflow': 'data_dir'}.get(c.data.name)
  if field and isinstance(c.data.get(field), str) and is_url(c.data[field]):
    _fail(f'data.{field}', f'a local path; for a URL, {MOUNT_HINT}', c.data[field])
  if c.data.name in ('femnist', 'stackoverflow') and not (
      isinstance(c.data.data_dir, str) and c.data.data_dir):
    _fail('data.data_dir', f'the prepared dataset directory (data.name is {c.data.name}; '
          'see README: Real datasets)', c.data.data_dir)
  _number(c, 'num_devices', low=0, integer=True)
  _number(c, 'lanes_per_device', low=0, integer=True)
  _choice(c, 'data_on_device', ('auto', 'yes', 'no'))
  _number(c, 'batch_pad_per_octave', low=1, high=64, integer=True)
  _choice(c, 'local_loop', ('auto', 'device', 'host'))
  _number(c, 'loop_chunk', low=0, high=1024, integer=True)
  _choice(c, 'compile_ahead', ('auto', 'yes', 'no'))
  _choice(c, 'matmul_precision', MATMUL_PRECISIONS)


# FedAvg reads none of these. alpha is not among them: FedAvg's h_glob, logged, is measured
# against the moving average g that alpha decays.
_FATHOM_FIELDS = ('eta_h', 'eta_h0', 'eta_h1', 'eta_h2', 'upper_epochs', 'upper_eta',
                  'upper_batch_size', 'hyper_optimizer', 'clip_log_params')
_SERVER_FIELDS = {'sgd': (), 'momentum': ('server_momentum',),
                  'adam': ('server_b1', 'server_b2', 'server_eps'),
                  'yogi': ('server_b1', 'server_b2', 'server_eps'), 'adagrad': ('server_eps',)}
_DATA_FIELDS = {  # the data.* fields each data.name reads (besides name)
    'synthetic': ('seed', 'num_clients', 'alpha', 'beta', 'size_log_mean', 'size_log_sigma',
                  'min_examples', 'max_examples', 'test_fraction'),
    'femnist_synthetic': ('seed', 'num_clients', 'in_memory', 'test_fraction', 'shared_glyphs'),
    'npz': ('path', 'num_classes', 'test_fraction', 'seed'),
    'femnist': ('data_dir', 'flip_pixels'), 'stackoverflow': ('data_dir',)}
_HIDDEN_MODELS = ('mlp', 'lstm')  # the models whose widths model.hidden sets


def unread_fields(c: ml_collections.ConfigDict, fields: Iterable[str]) -> list[str]:
  """'FIELD=VALUE (why)' for each of `fields` (those a command line or a sweep set) that this
  config does not read: FATHOM's fields under FedAvg, another server optimizer's, model's or
  dataset's. Such a setting changes nothing, which its author may not expect. (A config
  file's own fields are not judged: stackoverflow.py's FATHOM bounds stay under FedAvg.)"""
  why = _unread(c.algorithm, c.server_optimizer, c.model.name, c.data.name, c.data.path)
  return [f'{path}={_get(c, path)!r} ({why[path]})' for path in fields if path in why]


def unread_paths(flat: dict) -> set[str]:
  """The dotted paths of the fields that a config, flattened ({'model.name': ...}) with all its
  fields, does not read (see unread_fields)."""
  return set(_unread(*(str(flat.get(f)) for f in ('algorithm', 'server_optimizer',
                                                    'model.name', 'data.name', 'data.path'))))


def _unread(algorithm: str, server_optimizer: str, model: str, data: str,
            data_path: str) -> dict[str, str]:
  """{path: why} for the fields a config does not read; they follow from these five."""
  why = {}
  if data == 'npz' and os.path.isdir(data_path):  # train.npz and test.npz: no split to draw
    why.update((f'data.{f}', 'data.path is a folder of train.npz and test.npz')
               for f in ('test_fraction', 'seed'))
  if algorithm == 'fedavg':
    why.update((f, 'algorithm is fedavg') for f in _FATHOM_FIELDS)
  read = _SERVER_FIELDS.get(server_optimizer, ())
  why.update((f, f'server_optimizer is {server_optimizer}')
             for f in ('server_momentum', 'server_b1', 'server_b2', 'server_eps') if f not in read)
  if model not in _HIDDEN_MODELS:
    why['model.hidden'] = f'model.name is {model}'
  if model != 'emnist_cnn':
    why['model.conv'] = f'model.name is {model}'
  read = _DATA_FIELDS.get(data, ())
  why.update((f'data.{f}', f'data.name is {data}') for f in _DATA_FIELDS['synthetic']
             + ('in_memory', 'shared_glyphs', 'flip_pixels', 'path', 'num_classes', 'data_dir')
             if f not in read)
  return why

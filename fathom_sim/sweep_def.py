"""A sweep definition: loading its file, naming its settings' runs, and planning them.

A sweep definition is a Python file whose `get_sweep()` returns a dict (or ConfigDict) with
  config     a config file (path relative to the sweep file) or a ConfigDict,
  overrides  a list of {field: value} dicts, one per setting (dotted fields for nested ones),
  seeds      a list of seeds (or an int n for seeds 0..n-1),
  fixed      optional {field: value} applied to every run (not part of run names).
Run i of a setting lands in <out>/<setting name>/seed=<seed> (sweep.py runs them).
"""

from __future__ import annotations

import collections
import dataclasses
import numbers
import os
import re

import ml_collections

from fathom_sim import workdir as workdir_lib
from fathom_sim.config import ConfigError, call_user_file, check_config, typed, unknown_field

KEYS = ('config', 'overrides', 'seeds', 'fixed')  # what get_sweep() may return
_UNSAFE = re.compile(r'[^A-Za-z0-9._=,+-]')


@dataclasses.dataclass
class SweepDef:
  """A loaded sweep definition."""
  config: ml_collections.ConfigDict
  config_source: str
  overrides: list[dict]
  seeds: list[int]
  fixed: dict
  path: str = '<inline>'  # the sweep file, named in errors about its fields


@dataclasses.dataclass
class RunSpec:
  """One run of a sweep: its setting, seed, full config and workdir."""
  name: str
  setting: str
  overrides: dict
  seed: int
  config: ml_collections.ConfigDict
  workdir: str


def _fields(value, where: str, what: str) -> dict:
  """A {field: value} dict of the sweep (overrides, fixed), checked to have string fields."""
  if not hasattr(value, 'keys') or not all(isinstance(k, str) for k in value.keys()):
    raise ConfigError(f'{where}: {what} must be a {{field: value}} dict with field names as '
                      f'strings (dotted for nested fields), got {value!r:.80}')
  return dict(value)


# Seeds of one sweep at most: each is a run with a workdir of its own, planned up front (the
# paper's sensitivity runs take 50). A count of 3e9 was a MemoryError traceback (~100 GB).
MAX_SEEDS = 100_000


def _seeds(value, where: str) -> list[int]:
  """The sweep's seeds: a count n >= 1 (seeds 0..n-1) or a list of distinct integers."""
  def integer(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)
  if (integer(value) and value > MAX_SEEDS) or (
      isinstance(value, (list, tuple)) and len(value) > MAX_SEEDS):
    raise ConfigError(f'{where}: seeds asks for {value if integer(value) else len(value)} '
                      f'seeds; a sweep runs at most {MAX_SEEDS:,} (one workdir each)')
  if integer(value) and value >= 1:
    return list(range(value))
  if isinstance(value, (list, tuple)) and value and all(integer(s) and 0 <= s < 2**31
                                                        for s in value):
    seeds = [int(s) for s in value]
    twice = sorted(s for s, n in collections.Counter(seeds).items() if n > 1)
    if twice:  # two runs would share one workdir
      raise ConfigError(f'{where}: seeds lists {twice[0]} more than once')
    return seeds
  raise ConfigError(f'{where}: seeds must be a count n >= 1 (seeds 0..n-1) or a non-empty list '
                    f'of integers in [0, 2^31), got {value!r:.80}')


def load_sweep(path: str) -> SweepDef:
  """Reads a sweep file; its config path is taken relative to the sweep file.

  A file that cannot be run, or whose get_sweep() returns another shape than the module
  docstring's, raises a ConfigError naming the file and what is accepted.
  """
  if not os.path.isfile(path):
    raise ConfigError(f'--sweep {path!r}: no such sweep file (expected a sweeps/*.py file)')
  where = f'--sweep {path!r}'
  d = call_user_file(path, 'get_sweep', '--sweep')
  if not hasattr(d, 'keys'):
    raise ConfigError(f'{where}: get_sweep() must return a dict with keys {", ".join(KEYS)}; '
                      f'got {type(d).__name__}')
  d = dict(d)
  unknown = sorted(map(str, set(d) - set(KEYS)))
  if unknown:  # a misspelt key would otherwise be ignored silently
    raise ConfigError(f'{where}: get_sweep() returned unknown key(s) {", ".join(unknown)}; '
                      f'accepted: {", ".join(KEYS)}')
  if 'config' not in d:
    raise ConfigError(f'{where}: get_sweep() must return a config (a config file path '
                      'relative to the sweep file, or a ConfigDict)')
  config = d['config']
  if isinstance(config, str):
    source = config if os.path.isabs(config) else os.path.normpath(
        os.path.join(os.path.dirname(os.path.abspath(path)), config))
    if not os.path.isfile(source):
      raise ConfigError(f'sweep {path!r} names config {config!r}, which is not a file')
    what = f'sweep {path!r}: config'
    config = call_user_file(source, 'get_config', what)
    if not isinstance(config, ml_collections.ConfigDict):
      raise ConfigError(f'config {source!r}: get_config() must return a ConfigDict, got '
                        f'{type(config).__name__}')
  elif isinstance(config, ml_collections.ConfigDict):
    source = '<inline>'
  else:
    raise ConfigError(f'{where}: config must be a config file path or a ConfigDict, got '
                      f'{type(config).__name__}')
  seeds = _seeds(d.get('seeds', [0]), where)
  overrides = d.get('overrides', [{}])
  if not isinstance(overrides, (list, tuple)):
    raise ConfigError(f'{where}: overrides must be a list of {{field: value}} dicts, one per '
                      f'setting, got {type(overrides).__name__}')
  if not overrides:  # (e.g. a product over an empty list: it ran the config alone, unsaid)
    raise ConfigError(f'{where}: overrides is empty; give one {{field: value}} dict per setting '
                      '({} for the config as it is), or leave overrides out for that alone')
  overrides = [_fields(o, where, f'overrides[{i}]') for i, o in enumerate(overrides)]
  fixed = _fields(d.get('fixed', {}), where, 'fixed')
  both = sorted(set(fixed) & {k for o in overrides for k in o})
  if both:  # the setting's value won, and fixed's was never used
    raise ConfigError(f'{where}: {", ".join(both)} in both fixed and overrides; a field the '
                      'sweep varies is set by its settings alone')
  return SweepDef(config, source, overrides, seeds, fixed, path)


def _format(value) -> str:
  if isinstance(value, float):
    return f'{value:g}'
  if isinstance(value, (tuple, list)):
    return '-'.join(_format(v) for v in value)
  return str(value)


def setting_name(overrides: dict) -> str:
  """'eta=0.05,batch_size=8' in the overrides' own order; 'base' for no overrides."""
  if not overrides:
    return 'base'
  name = ','.join(f'{k}={_format(v)}' for k, v in overrides.items())
  return _UNSAFE.sub('_', name)[:200]  # one path component, whatever the values hold


def apply_overrides(config: ml_collections.ConfigDict, overrides: dict) -> None:
  """Sets dotted fields in place; an unknown field or a wrong type raises ConfigError."""
  for key, value in overrides.items():
    unknown = unknown_field(config, key)
    if unknown:
      raise ConfigError(unknown)
    node, parts = config, key.split('.')
    for part in parts[:-1]:
      node = node[part]
    if isinstance(node[parts[-1]], ml_collections.ConfigDict):
      # (A dict put in its place dropped the group's other fields, said as one 'missing'.)
      fields = ', '.join(f'{key}.{k}' for k in node[parts[-1]].keys())
      raise ConfigError(f'config.{key} is a group of fields ({fields}); set one of them, e.g. '
                        f"{{'{key}.{next(iter(node[parts[-1]].keys()))}': ...}}")
    try:
      node[parts[-1]] = value  # (a value of another kind: the typed config's ConfigError)
    except ConfigError:
      raise
    except (TypeError, ValueError) as e:
      raise ConfigError(f'config.{key}: cannot be set to {value!r} ({e})') from None


def plan_runs(sweep: SweepDef, out: str, extra: dict | None = None) -> list[RunSpec]:
  """Every (setting, seed) run; `extra` (e.g. from the command line) is applied last."""
  names = [setting_name(o) for o in sweep.overrides]
  for i, name in enumerate(names):
    j = names.index(name)
    if j < i and sweep.overrides[j] == sweep.overrides[i]:
      raise ConfigError(f'the sweep lists the same setting twice: {name}')
    if j < i:
      raise ConfigError(f'the sweep\'s settings {sweep.overrides[j]} and {sweep.overrides[i]} '
                        f'would share the folder {name!r} (a folder is named by the values: a '
                        'float to 6 significant digits, a character unsafe in a path as _, '
                        'the name cut at 200 characters); make them differ there')
  swept = sorted({k for o in sweep.overrides for k in o} & set(extra or {}))
  if swept:
    raise ConfigError(f'--config.{swept[0]} is a field the sweep varies (its settings would '
                      'all become the same run); change it in the sweep file instead')
  where = f'--sweep {sweep.path!r}'

  def apply(config, fields: dict, source: str) -> None:
    if 'seed' in fields:  # it would be overwritten by each run's seed from the seeds list
      raise ConfigError(f'{source}: config.seed cannot be set here; a sweep runs the seeds of '
                        'its seeds list (the sweep file\'s seeds, or --seeds)')
    try:
      apply_overrides(config, fields)
    except ConfigError as e:  # say which part of which file holds the field
      raise ConfigError(f'{source}: {e}') from None

  runs = []
  for i, (overrides, setting) in enumerate(zip(sweep.overrides, names)):
    for seed in sweep.seeds:
      config = typed(ml_collections.ConfigDict(sweep.config.to_dict()))  # (True for a number:
      # refused, where ml_collections took it as 1.0)
      apply(config, sweep.fixed, f'{where}: fixed')
      apply(config, overrides, f'{where}: overrides[{i}]')
      apply(config, dict(extra or {}), 'command line')
      config.seed = seed
      name = f'{setting}/seed={seed}'
      try:  # every run's values, before any run computes
        check_config(config)
      except ConfigError as e:
        raise ConfigError(f'{where}: run {name}: {e}') from None
      runs.append(RunSpec(name, setting, overrides, seed, config, os.path.join(out, name)))
  # Two settings that come to one config (e.g. one sets a field to its default, or one the run
  # does not read: eta_h under FedAvg) would run the same runs twice, and count twice in a grid
  # search.
  first = {}
  for run in runs:
    key = workdir_lib.config_fingerprint(run.config)
    if key in first:
      raise ConfigError(f'{where}: the settings {first[key].setting!r} and {run.setting!r} '
                        'come to the same run (every field it reads alike); drop one')
    first[key] = run
  return runs

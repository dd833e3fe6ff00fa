"""Turning bad command lines and bad input into one clear line and a non-zero exit."""

from __future__ import annotations

import ast
import functools
import logging as pylogging
import os
import re
import signal
import sys
from typing import Callable

from absl import flags, logging

from fathom_sim.errors import (EXIT_BAD_INPUT, Diverged, InputError, OutputError, Preempted,
                               exit_status, first_line)


# Libraries whose INFO lines are chatter in a progress log: orbax's, one per save, JAX's
# backend probe ("Unable to initialize backend 'tpu'" on every machine without a TPU), and
# TFDS's, four at every start on a prepared dataset ("Load dataset info from ...").
_CHATTY = ('/orbax/', '/jax/_src/xla_bridge.py', '/tensorflow_datasets/')


def _quiet_libraries(record) -> bool:
  """Keeps the libraries' INFO chatter out of the progress log (their warnings still show),
  and orbax's ERROR records to their first line: the failures of its background saves and
  reads, each of which the simulator raises and says in its own line, with its cause. A full
  disk printed 100 to 400 lines of orbax's tracebacks above that line, most of them asyncio's
  "Task exception was never retrieved" for orbax's coroutines (dropped: the same errors again).
  One line each stays: a save that fails in the background is raised only at the next one."""
  if record.levelno == pylogging.ERROR:
    if '/asyncio/' in record.pathname and 'orbax' in record.getMessage():
      return False
    if '/orbax/' in record.pathname:
      record.msg, record.args = first_line(Exception(record.getMessage())), ()
      record.exc_info = record.exc_text = None
      return True
  return record.levelno >= pylogging.WARNING or not any(
      part in record.pathname for part in _CHATTY)


def setup_logging() -> None:
  """Progress lines to stdout, without the libraries' chatter."""
  handler = logging.get_absl_handler()
  handler.python_handler.stream = sys.stdout
  handler.addFilter(_quiet_libraries)


def fail(message: str, status: int = EXIT_BAD_INPUT, *, tell_peers: bool = True) -> None:
  """Ends the command with one `error:` line and `status`."""
  distributed = sys.modules.get('fathom_sim.distributed')  # not imported: no run started
  if distributed is not None and tell_peers:
    # In a run of several processes the others would wait for this one in a collective until
    # JAX's heartbeat gives up (100 s); told, they stop now, saying why. (Alone: nothing.)
    # Where a peer stopped first, its line is this process's and this call does not return.
    distributed.stop_peers(message, status)
  print(f'error: {message}', file=sys.stderr)
  sys.exit(status)


def _flag_places(argv: list[str], name: str) -> list[tuple[int, int]]:
  """(index, words) of each --name in argv: 1 for --name=VALUE, 2 for --name VALUE."""
  places = []
  for i, arg in enumerate(argv):
    if arg == '--':
      break
    if arg.startswith(f'--{name}='):
      places.append((i, 1))
    elif arg == f'--{name}' and i + 1 < len(argv):
      places.append((i, 2))
  return places


def _flag_value(argv: list[str], name: str) -> str | None:
  """The value absl takes for --name: the last one given (tpu_pod.sh passes its own --config
  before the user's flags)."""
  places = _flag_places(argv, name)
  if not places:
    return None
  i, words = places[-1]
  return argv[i].split('=', 1)[1] if words == 1 else argv[i + 1]


def expand_flagfiles(argv: list[str]) -> list[str]:
  """argv with each --flagfile=FILE replaced by FILE's flags, as absl reads them; one line and
  exit 2 where one cannot be read. For a command defining --config with config_flags, which
  reads the flag files while the flag is defined (at import: a missing file was a traceback),
  and parse_flags_or_exit, whose checks of --config see only what argv holds."""
  try:
    return flags.FLAGS.read_flags_from_files(argv, force_gnu=False)
  except flags.Error as e:
    fail(f'--flagfile: {str(e).removeprefix("ERROR:: ")}')


def _last_only(argv: list[str], name: str) -> list[str]:
  """argv without the --name flags before the last one: config_flags defines a flag per field
  override for each --config it meets, and with two and an override stopped on "The flag
  'config.num_rounds' is defined twice" (tpu_pod.sh passes its own --config first)."""
  drop = {i + k for i, words in _flag_places(argv, name)[:-1] for k in range(words)}
  return [arg for i, arg in enumerate(argv) if i not in drop]


def _unknown_override(argv: list[str], config) -> str | None:
  """The first --config.PATH override whose PATH is not a field of `config`, described."""
  from fathom_sim.config import unknown_field
  for arg in argv:
    if arg.startswith('--config.'):
      unknown = unknown_field(config, arg[len('--config.'):].split('=', 1)[0])
      if unknown:
        return unknown
  return None


def _bad_tuple_override(argv: list[str], config) -> str | None:
  """The first override of a tuple field of `config` whose value is a dict or a set, said;
  else None. config_flags makes a tuple of a dict's keys, or of a set's elements in hash order,
  and the run went on with that (--config.model.hidden={1:2} trained widths (1,))."""
  import ml_collections
  for i, arg in enumerate(argv):
    if arg == '--':
      break
    if not arg.startswith('--config.'):
      continue
    path, equals, value = arg[len('--config.'):].partition('=')
    if not equals:
      if i + 1 == len(argv):
        continue
      value = argv[i + 1]
    node = config
    for part in path.split('.'):
      node = node.get(part) if isinstance(node, ml_collections.ConfigDict) else None
    if not isinstance(node, tuple):
      continue
    try:
      parsed = ast.literal_eval(value)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
      continue  # (config_flags' own words, or the field's check, say what is wrong)
    if isinstance(parsed, (dict, set, frozenset)):
      return (f'--config.{path}={value}: config.{path} must be a tuple, e.g. '
              f'--config.{path}="{node!r}", got a {type(parsed).__name__}')
  return None


def parse_flags_or_exit(argv: list[str]) -> list[str]:
  """absl flag parsing that reports a bad --config path or field in one line."""
  config_path = _flag_value(argv, 'config')
  config = None
  if config_path is not None:
    file_part = config_path.split(':', 1)[0]
    if not os.path.isfile(file_part) and os.path.isfile(config_path):
      fail(f"--config {config_path!r}: config_flags takes what follows ':' for get_config's "
           "argument, so a path holding ':' cannot be given; link or copy the file to a path "
           'without one')
    if not os.path.isfile(file_part):
      fail(f'--config {file_part!r}: no such config file (expected a configs/*.py file)')
    # Loaded here first: config_flags would let the file's own error (a syntax error, a
    # failed import, get_config raising) out as a traceback.
    from fathom_sim.config import ConfigError, call_user_file
    arg = config_path.partition(':')[2]  # file.py:ARG, as config_flags passes it
    try:
      config = call_user_file(file_part, 'get_config', '--config', *([arg] if arg else []))
    except ConfigError as e:
      fail(str(e))
    except KeyboardInterrupt as e:  # (Ctrl-C while the file ran: a traceback before)
      fail(f'interrupted while --config {file_part!r} was loading; nothing was started',
           exit_status(e))
    import ml_collections
    # (absl's words for None: 'Flag --config must have a value other than None'; for a str,
    # a traceback from the overrides' walk; for a frozen one, 'FrozenConfigDict is
    # immutable. Cannot call lock().')
    if (not isinstance(config, ml_collections.ConfigDict)
        or isinstance(config, ml_collections.FrozenConfigDict)):
      fail(f'--config {file_part!r}: get_config() returned {type(config).__name__}; it must '
           'return the config (an ml_collections.ConfigDict, not frozen: the command line\'s '
           '--config.FIELD overrides set it; e.g. fathom_sim.config.base_config() with changes)')
    bad = _bad_tuple_override(argv, config)
    if bad:
      fail(bad)
  try:
    return flags.FLAGS(_last_only(argv, 'config'))
  except (flags.Error, AttributeError, KeyError, TypeError, ValueError) as e:
    if config is not None:
      unknown = _unknown_override(argv, config)
      if unknown:
        fail(unknown)
    message = str(e).strip().strip('"')
    override = next((a.split('=', 1)[0] for a in argv[1:] if a.startswith('--config.')), None)
    if config is None and override and 'config' in flags.FLAGS:
      fail(f'{override} sets a field of --config, which is not given: add '
           '--config=configs/NAME.py (e.g. configs/quickstart.py)')
    fail(_bad_override_value(message, config) or message)
  return []


# absl's and Python's words for an override that does not parse as its field's type.
_NOT_PARSED = re.compile(r"^flag --config\.([\w.]+)=(.*?): (?:(invalid literal for int\(\))|"
                         r"(could not convert string to float)|(\('Non-boolean argument))")


_GROUP = re.compile(r"^flag --config\.([\w.]+)=(.*?): Failed to parse .* as a ConfigDict")


def _bad_override_value(message: str, config=None) -> str | None:
  """A parse failure of --config.FIELD=VALUE, said as what the field accepts; else None."""
  group = _GROUP.match(message)
  if group is not None:  # (absl's words: "malformed node or string ... <ast.Name object>")
    fields = ''
    if config is not None:
      fields = ' (' + ', '.join(f'{group[1]}.{k}' for k in config[group[1]].keys()) + ')'
    example = f', e.g. --config.{group[1]}.name={group[2]}' if group[2].isidentifier() else ''
    return (f'--config.{group[1]}={group[2]}: config.{group[1]} is a group of fields{fields}; '
            f'set one of them{example}')
  m = _NOT_PARSED.match(message)
  if m is None:
    return None
  accepted = 'an integer' if m[3] else 'a number' if m[4] else 'true or false'
  return f'--config.{m[1]}={m[2]}: config.{m[1]} must be {accepted}, got {m[2]!r}'


def config_overrides(argv: list[str]) -> tuple[dict, list[str]]:
  """Takes the --config.FIELD=VALUE (or --config.FIELD VALUE) overrides out of `argv` (a
  command line, program name first) and parses them as main.py's config flag does, by the
  type of base_config()'s field: '64' for model.hidden is (64,), '20' for batch_size is 20.0,
  and a quoted word keeps its quotes. Returns ({field: value}, the rest of argv); a bad
  override, or a config file (sweep.py's comes from its sweep file), ends the command with one
  line."""
  from ml_collections import config_flags
  from fathom_sim.config import base_config
  if _flag_value(argv, 'config') is not None:  # absl's words: 'Overriding config is not allowed'
    fail(f'--config={_flag_value(argv, "config")}: a sweep takes its config file from the sweep '
         "file's 'config' key; the command line sets fields of it, --config.FIELD=VALUE")
  # Flag files expanded first, as main.py's are: the checks below read argv as given, where
  # config_flags would read the files itself (a dict for model.hidden passed unseen there).
  argv = expand_flagfiles(argv)
  config, values = base_config(), flags.FlagValues()
  bad = _bad_tuple_override(argv, config)
  if bad:
    fail(bad)
  try:  # config_flags reads the overrides from the argv it is given when it is defined
    config_flags.DEFINE_config_dict('config', config, flag_values=values, sys_argv=argv)
    rest = values(argv, known_only=True)
  except (flags.Error, AttributeError, KeyError, TypeError, ValueError) as e:
    message = str(e).strip().strip('"')
    fail(_unknown_override(argv, config) or _bad_override_value(message, config) or message)
  return config_flags.get_override_values(values['config']), rest


@functools.cache
def compilation_cache_flag() -> flags.FlagHolder:
  """--compilation_cache, for the commands that train (main.py, sweep.py); defined once, so
  that both modules can be imported into one process (absl refuses a flag defined twice)."""
  return flags.DEFINE_string(
      'compilation_cache', None, 'Folder of JAX\'s persistent compilation cache: programs '
      'compiled by a run are loaded from it by later runs, resumed runs and sweep members. '
      'Default: $JAX_COMPILATION_CACHE_DIR, else $XDG_CACHE_HOME/fathom_sim/jax '
      '(~/.cache/fathom_sim/jax). An empty value compiles every program.')


def use_compilation_cache(flag: flags.FlagHolder) -> None:
  """Turns the cache on at the flag's folder (or the default one), or off for an empty value.
  A folder given on the command line that cannot be used ends the run; the default one only
  warns, and the run compiles every program."""
  from fathom_sim import compile_cache
  if flag.value == '':
    compile_cache.disable()
    return
  path = flag.value or compile_cache.default_dir()
  # The default folder, in the user's home, is capped: uncapped it grows with every new
  # shape, config and jax version, for ever. A folder named is the user's to manage.
  named = flag.value or os.environ.get('JAX_COMPILATION_CACHE_DIR')
  try:
    compile_cache.enable(path, max_bytes=None if named else compile_cache.MAX_BYTES)
  except OSError as e:
    if flag.value:
      fail(f'--compilation_cache {flag.value!r} cannot be used: {e.strerror or e} '
           '(give a writable folder, or an empty value to compile every program)')
    logging.warning('the compilation cache %r cannot be used (%s); every program is compiled',
                    path, e.strerror or e)
    compile_cache.disable()


def warn_unread(config, fields) -> None:
  """Logs the `fields` (set on the command line) that `config` does not read, in one warning
  (config.unread_fields); a config that fails its checks is left to them."""
  from fathom_sim.config import ConfigError, check_config, unread_fields
  try:
    check_config(config)
  except ConfigError:
    return
  unread = unread_fields(config, fields)
  if unread:
    logging.warning('set on the command line but not read by this run: %s', '; '.join(unread))


def no_arguments(argv: list[str]) -> None:
  """Refuses words after the flags: `config.eta=0.5` without its dashes was dropped without a
  word, and the run went on with the config's own value."""
  if len(argv) > 1:
    fail(f'unexpected argument(s) {" ".join(argv[1:])!r}: give settings as flags, e.g. '
         '--config.eta=0.5')


class Terminated(KeyboardInterrupt):
  """SIGTERM, raised where Ctrl-C's KeyboardInterrupt is (terminate_as_interrupt)."""

  exit_status = 128 + signal.SIGTERM  # the shell's convention (errors.exit_status reads it)


def _raise_terminated(signum, frame):
  raise Terminated


def terminate_as_interrupt() -> None:
  """Makes SIGTERM (`kill`, a scheduler's time limit) stop a command as Ctrl-C does, where
  Python's default ended it at once, with no line: a conversion's scratch folder (GBs for
  Stack Overflow) or a benchmark row's temporary folder and process were left behind. Not for
  training runs, whose SIGTERM is a preemption to checkpoint at (train.py)."""
  signal.signal(signal.SIGTERM, _raise_terminated)


RESUMES = ('stopped by a second Ctrl-C; the same command resumes the run from its last '
           'checkpoint')


def run_or_exit(job: Callable[[], object],
                interrupted: str | Callable[[KeyboardInterrupt], str] = RESUMES) -> None:
  """Runs the job; input errors (config, data, workdir), a run that diverged for good
  (errors.Diverged) and output that cannot be written (errors.OutputError: a checkpoint, a
  metrics row, a prepared dataset) become one line; a run stopped by SIGTERM/SIGINT (after
  checkpointing) ends without one, and a KeyboardInterrupt (a training run's second Ctrl-C,
  another command's first) with `interrupted` (or what it returns for it). The exit status is
  errors.exit_status's."""
  try:
    job()
  except (InputError, OutputError) as e:
    fail(str(e), exit_status(e))
  except Diverged as e:  # every process stopped at the same round: no peer to tell
    fail(str(e), exit_status(e), tell_peers=False)
  except Preempted as e:
    sys.exit(exit_status(e))
  except KeyboardInterrupt as e:  # a second Ctrl-C (train._stop_signals): the files are closed
    fail(interrupted(e) if callable(interrupted) else interrupted, exit_status(e))
  except MemoryError as e:  # numpy's, before any round (rounds say theirs as OutOfMemory)
    fail(f'the host ran out of memory making the run ({e}); the config asks for more than this '
         'machine holds: lower the sizes it sets (data.num_clients, data.max_examples, '
         'model widths), or make femnist_synthetic\'s examples on demand '
         '(data.in_memory=False)', exit_status(e))

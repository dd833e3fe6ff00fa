"""The run's outputs: metrics.jsonl rows, summary.json, the progress line, params digests."""

from __future__ import annotations

import contextlib
import datetime
import errno
import gzip
import hashlib
import json
import math
import os
import re
import zlib
from typing import IO, Callable, Iterator

import numpy as np
from absl import logging

from fathom_sim.errors import OutputError
from fathom_sim.types import Params

METRICS_FILE = 'metrics.jsonl'
SUMMARY_FILE = 'summary.json'


def _plain(value):
  """JSON-ready Python scalars (NaN and inf become null, as JSON has neither)."""
  if isinstance(value, dict):
    return {k: _plain(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_plain(v) for v in value]
  if isinstance(value, (np.generic, np.ndarray)):
    value = value.item() if np.ndim(value) == 0 else value.tolist()
    return _plain(value)
  if isinstance(value, float) and not math.isfinite(value):
    return None
  return value


_RESUMES = ('the run stops, its newest checkpoint stays, and the same command resumes from it '
            'once the file can be written')


def _sync(f: IO[str]) -> None:
  """Puts what was written to `f` on the disk (flush, then fsync); a file that cannot be
  synced (EINVAL: a pipe, a character device) has nothing to put there."""
  f.flush()
  try:
    os.fsync(f.fileno())
  except OSError as e:
    if e.errno != errno.EINVAL:
      raise


def _sync_folder(path: str) -> None:
  """Puts a folder's entries (a rename in it) on the disk, where the filesystem can: the
  file it names is whole either way, so a folder that cannot be synced is passed over."""
  try:
    fd = os.open(path, os.O_RDONLY)
  except OSError:
    return
  try:
    os.fsync(fd)
  except OSError:
    pass
  finally:
    os.close(fd)


def _left_as_it_was(path: str, done: str, error: OSError) -> OutputError:
  """One line for a run's file that could not be read or replaced, and so stays whole."""
  return OutputError(f'{path} could not be {done} ({error.strerror or error}); what it held '
                     'before stays')


def cannot_write(path: str, error: OSError) -> OutputError:
  """One line for a row that cannot be written: a full disk or a lost mount is no bug."""
  return OutputError(f'{path} cannot be written ({error.strerror or error}); {_RESUMES}')


class MetricsWriter:
  """Appends one JSON object per line to <workdir>/metrics.jsonl, flushed per row."""

  def __init__(self, workdir: str):
    self.path = os.path.join(workdir, METRICS_FILE)
    try:
      self._file: IO[str] = open(self.path, 'a', encoding='utf-8')
    except OSError as e:
      raise cannot_write(self.path, e) from None

  def write(self, row: dict) -> None:
    try:
      self._file.write(json.dumps(_plain(row)) + '\n')
      self._file.flush()
    except OSError as e:
      raise cannot_write(self.path, e) from None

  def sync(self) -> None:
    """Puts the rows written so far on the disk (fsync), before the checkpoint they belong
    to: a machine lost afterwards cannot leave that checkpoint without them. On a gcsfuse
    mount, which uploads a file appended to only when it is closed or synced, this is also when
    the bucket gets them (the whole file while it is under 2 MB, then what was appended). The
    file exists before the first row (keep_rows makes it), so gcsfuse stages it even where its
    streaming writes, which finalize a new file only on close, are on."""
    try:
      _sync(self._file)
    except OSError as e:
      raise cannot_write(self.path, e) from None

  def close(self) -> None:
    try:
      self._file.close()
    except OSError as e:
      raise cannot_write(self.path, e) from None


def iter_rows(path: str) -> Iterator[dict]:
  """The rows of a metrics.jsonl (or of a gzipped copy, *.gz), one at a time, up to a torn
  last line; read as a stream, since a long run's file may hold millions of rows.

  Only the last line may be torn (a killed run's unfinished write); a line that is not a row
  with rows after it, a file that is not UTF-8 text or a damaged gzip file raise DataError (a
  ValueError) naming the file, which is left as it is.
  """
  return (row for row, _, _ in _rows_and_lines(path))


_LONE_CR = re.compile(rb'(?<=\r)(?!\n)')  # a line break of its own ('\r' not before '\n')


def _lines(f: IO[bytes]) -> Iterator[bytes]:
  """The lines of a binary file, each with its line break: '\n', '\r\n' or '\r' alone (as
  text mode reads them; an edited file may end its rows so), their lengths adding up to the
  file's."""
  for raw in f:
    if b'\r' in raw:
      yield from (part for part in _LONE_CR.split(raw) if part)
    else:
      yield raw


def _rows_and_lines(path: str) -> Iterator[tuple[dict, int, int]]:
  """iter_rows's rows, each with the byte offsets of its line's start and of just past its
  end (of the file as it is read: a gzipped copy's, uncompressed)."""
  from fathom_sim.data import DataError
  opener = gzip.open if path.endswith('.gz') else open
  bad = None  # (line number, line, parsed) of a line that is no row: torn, if nothing follows
  end = 0

  def not_a_row(number: int, line: str, last: bool) -> DataError:
    return DataError(f'{path}: line {number} is not a row of a run (a JSON object with an '
                     f'integer "round"): {line[:60]!r}'
                     f'{"" if last else "; rows follow it, so it is no torn last write"}. '
                     'The file is left as it is: repair or remove that line')

  # Read as bytes, so that each row's end is known (keep_rows truncates there); rows are
  # ASCII JSON with no raw line breaks inside, and a '\r' before a '\n' is JSON's whitespace.
  with opener(path, 'rb') as f:
    try:
      for number, raw in enumerate(_lines(f), 1):
        end += len(raw)
        line = raw.decode('utf-8').rstrip('\r\n')
        if not line.strip():
          continue  # the end of the last row's line, or a blank line: no row lost
        if bad is not None:  # not a torn write: truncating (keep_rows) would lose this line
          raise not_a_row(bad[0], bad[1], last=False)
        try:
          row = json.loads(line)
        except ValueError:
          row = None
        # JSON's true is a Python int too: a row's round is an integer and not a bool.
        if isinstance(row, dict) and type(row.get('round')) is int:
          yield row, end - len(raw), end
        else:
          bad = (number, line, row)
    except UnicodeDecodeError as e:
      # Rows are written as ASCII JSON, so no torn write makes this: the file is not a
      # run's metrics, and truncating it here (keep_rows) would lose whatever it holds.
      raise DataError(f'{path}: not UTF-8 text ({e.reason}); expected the JSON lines that a '
                      'run writes to metrics.jsonl') from None
    except (gzip.BadGzipFile, EOFError, zlib.error) as e:  # a damaged or cut gzipped copy
      raise DataError(f'{path}: not a whole gzip file ({type(e).__name__}: {e}); expected a '
                      'gzipped copy of a metrics.jsonl') from None
  if bad is not None and bad[2] is not None:  # whole JSON, but not a row: no torn write
    raise not_a_row(bad[0], bad[1], last=True)


def read_rows(path: str) -> list[dict]:
  """Every row of a metrics.jsonl (or of a gzipped copy), as iter_rows reads them."""
  return list(iter_rows(path))


class RowLog:
  """What a run reads back of its own rows while it goes on, in constant memory (a run may
  write millions of rows): the last row, the training loss of the last accepted round
  (loss_jump) and the first row whose evaluation reached `target` (rounds_to_target)."""

  def __init__(self, target: float = 0.0):
    self.target = target
    self.last: dict | None = None
    self.accepted_loss: float | None = None
    self.reached: dict | None = None

  def add(self, row: dict) -> None:
    self.last = row
    loss = row.get('train_loss')
    # Only a loss it can be times of: after a round at 0 (every counted client fitted, or
    # one left) a rise to 2e30 went unwarned, as did any after a non-finite one (null).
    if row.get('accepted', True) and loss is not None and math.isfinite(loss) and loss > 0:
      self.accepted_loss = loss
    if self.target and self.reached is None and reaches(row, self.target):
      self.reached = row


def reaches(row: dict, target: float) -> bool:
  """Whether `row` holds an evaluation at or above `target` (what rounds_to_target counts)."""
  accuracy = row.get('test_accuracy')
  return accuracy is not None and accuracy >= target


def read_summary(workdir: str, rounds: int | None = None) -> dict | None:
  """The workdir's summary.json (written when a run finishes), with `rounds` that of a run
  that ended at that round; None without a readable one (or one of other rounds)."""
  try:
    with open(os.path.join(workdir, SUMMARY_FILE), encoding='utf-8') as f:
      summary = json.load(f)
  except (OSError, ValueError):
    return None
  if not isinstance(summary, dict) or rounds is not None and summary.get('rounds') != rounds:
    return None
  return summary


def finished_rounds(workdir: str) -> int | None:
  """The rounds of the finished run whose summary.json the workdir holds; None without one."""
  try:
    return int((read_summary(workdir) or {})['rounds'])
  except (KeyError, ValueError, TypeError):
    return None


def keep_rows(workdir: str, last_round: int, drop_eval_at: int | None = None, *,
              amend: dict | None = None, into: RowLog | None = None,
              check: bool = True) -> bool:
  """Keeps the rows of rounds 1..last_round (the checkpointed ones) and drops the rest:
  rows_kept's reading, then at once its cut. Returns whether an evaluation was dropped."""
  return rows_kept(workdir, last_round, drop_eval_at, amend=amend, into=into, check=check)()


def rows_kept(workdir: str, last_round: int, drop_eval_at: int | None = None, *,
              amend: dict | None = None, into: RowLog | None = None,
              check: bool = True) -> Callable[[], bool]:
  """Reads the rows of rounds 1..last_round (the checkpointed ones) and returns the cut that
  keeps them and drops the rest, which returns whether an evaluation was dropped. Nothing is
  written before the cut: a command refused for a damaged line, or for anything before the
  cut, leaves the file as it was.

  A run killed after its last checkpoint wrote rows it will write again when resumed, possibly
  with a torn last line; the cut makes metrics.jsonl hold each round exactly once. The row of
  round `drop_eval_at` loses its evaluation (its test_* fields); `amend`'s fields are added to
  the row of `last_round`. The kept rows are fed to `into`. The file is read whole first (a
  damaged line anywhere is refused); then, where no kept row changes, cut after the last kept
  row (no copy: a long run's file may be gigabytes, on a disk without room for a second), else
  copied with its changed rows into a file that replaces it at once, so that a kill leaves it
  as it was. Rows dropped past the checkpoint are said in the log, and, with `check`, rounds
  missing or repeated before it.
  """
  path = os.path.join(workdir, METRICS_FILE)
  dropped, keeping, redone = False, True, 0
  expected, fault = 1, None  # the round the next kept row should be; the first that was not
  kept_end = 0  # the byte offset just past the last kept row's line
  edits: list[tuple[int, int, dict]] = []  # (start, end, new row) of the kept rows that change
  for row, start, end in _rows_read_for_keeping(path):
    keeping = keeping and row['round'] <= last_round
    if not keeping:
      redone += row['round'] > last_round
      continue  # read on all the same: a damaged line further on is refused
    if row['round'] != expected and fault is None:
      fault = (f'round {row["round"]} follows round {expected - 1}' if expected > 1 else
               f'the first row is round {row["round"]}')
    expected, kept_end = row['round'] + 1, end
    kept = row
    if row['round'] == drop_eval_at:
      kept = {k: v for k, v in row.items() if not k.startswith('test_')}
      dropped = dropped or kept != row
    if amend is not None and row['round'] == last_round:
      kept = {**kept, **amend}
    if kept != row:
      edits.append((start, end, kept))
    if into is not None:
      into.add(kept)

  def cut() -> bool:
    _cut_or_copy(path, kept_end, edits)
    if redone:
      logging.info('%s: %d row(s) past the checkpoint of round %d dropped; their rounds are '
                   'run again', path, redone, last_round)
    return dropped

  if not check:
    return cut
  if fault is None and expected != last_round + 1:
    fault = f'the last row is round {expected - 1}' if expected > 1 else 'it holds no row'
  if fault is not None:
    # Rows are synced to the disk before their round's checkpoint is saved (MetricsWriter.sync),
    # so neither a kill nor a lost machine does this; a filesystem that lost synced writes or
    # an edited file can.
    logging.warning('%s does not hold the rows of rounds 1..%d once each, in order (%s); the '
                    'run goes on from its checkpoint of round %d, with its rows as they are',
                    path, last_round, fault, last_round)
  return cut


def _rows_read_for_keeping(path: str) -> Iterator[tuple[dict, int, int]]:
  """_rows_and_lines of `path` (none where it does not exist yet), a read that fails said as
  the file's, in one line."""
  if not os.path.exists(path):
    return
  try:
    yield from _rows_and_lines(path)
  except OSError as e:
    raise _left_as_it_was(path, 'read', e) from None


def _cut_or_copy(path: str, kept_end: int, edits: list[tuple[int, int, dict]]) -> None:
  """Makes `path` hold its bytes up to `kept_end`, the lines of `edits` (start, end, row) in
  their rows' place: cut in place where there are none, else copied, bytes and the changed
  rows, into a file that replaces it. A last kept line without its line break gets one (the
  next row would join it)."""
  whole = True  # whether the last kept line ends with its line break
  try:
    with open(path, 'rb+') as f:
      f.seek(max(kept_end - 1, 0))
      whole = kept_end == 0 or f.read(1) in (b'\n', b'\r')
      if not edits:
        if f.seek(0, os.SEEK_END) > kept_end or not whole:
          f.truncate(kept_end)  # (a kill between the two leaves what the next resume mends)
          if not whole:
            f.seek(kept_end)
            f.write(b'\n')
          _sync(f)
        return
  except FileNotFoundError:
    pass  # (made below: the writer appends to it, and gcsfuse stages it, before any row)
  except OSError as e:
    raise _left_as_it_was(path, "cut to the checkpoint's rows", e) from None
  with replaced(path) as out, contextlib.ExitStack() as stack:
    source = stack.enter_context(open(path, 'rb')) if os.path.exists(path) else None
    at = 0
    for start, end, row in [*edits, (kept_end, kept_end, None)]:
      while at < start:  # the bytes between, copied in bounded pieces
        piece = source.read(min(start - at, 1 << 24))
        if not piece:  # (shorter than when it was read: changed under this process)
          raise OSError(errno.EIO, 'the file changed while it was copied')
        out.buffer.write(piece)
        at += len(piece)
      if row is not None:
        out.buffer.write((json.dumps(_plain(row)) + '\n').encode())
        source.seek(end)
        at = end
    if not whole and edits[-1][1] != kept_end:  # the last kept line, copied as it was
      out.buffer.write(b'\n')


@contextlib.contextmanager
def replaced(path: str) -> Iterator[IO[str]]:
  """A text file that replaces `path` at once when the block ends, and is removed if it
  raises: a reader (another host's process, a resumed run after a kill or a power loss) sees
  the old file or the new one, never half of one. (Synced before the rename: otherwise a
  filesystem may put the rename on the disk before the data, an empty file in `path`'s place;
  and its folder after, so that the rename itself is on the disk.)"""
  tmp = path + '.tmp'
  try:
    with open(tmp, 'w', encoding='utf-8') as f:
      yield f
      _sync(f)
    os.replace(tmp, path)
    _sync_folder(os.path.dirname(os.path.abspath(path)))
  except BaseException as e:
    try:
      os.remove(tmp)
    except OSError:
      pass
    if isinstance(e, OSError):  # (or reading `path` while rewriting it: the file named)
      raise _left_as_it_was(path, 'rewritten', e) from None
    raise


def write_text(path: str, text: str) -> None:
  """Writes `text` to `path` atomically (replaced)."""
  with replaced(path) as f:
    f.write(text)


def write_json(path: str, obj: dict) -> None:
  """Writes `obj` as indented JSON, atomically (write_text)."""
  write_text(path, json.dumps(_plain(obj), indent=2) + '\n')


def update_digest(digest, array) -> None:
  """Adds an array to a hashlib digest: its dtype and shape, then its bytes in C order (read in
  place: no copy of a large array)."""
  a = np.ascontiguousarray(array)
  digest.update(f'{a.dtype.str}{a.shape}'.encode())
  digest.update(memoryview(a.reshape(-1)).cast('B'))


def params_digest(params: Params) -> tuple[float, str]:
  """(L2 norm, sha256 of the leaves' bytes in tree order): identifies a final model exactly."""
  import jax  # only here: the report and sweep commands read metrics without starting JAX
  leaves = [np.asarray(x) for x in jax.tree.leaves(jax.device_get(params))]
  digest = hashlib.sha256()
  for leaf in leaves:
    digest.update(np.ascontiguousarray(leaf).tobytes())
  l2 = math.sqrt(sum(float(np.sum(np.square(leaf, dtype=np.float64))) for leaf in leaves))
  return l2, digest.hexdigest()


def progress_line(row: dict, num_rounds: int, rounds_per_s: float) -> str:
  t = row['round']
  eta_s = (num_rounds - t) / rounds_per_s if rounds_per_s > 0 else float('nan')
  # (timedelta holds under 10^9 days: a crawl through 2^31 rounds can be past it)
  left = str(datetime.timedelta(seconds=round(eta_s))) if 0 <= eta_s < 1e13 else '?'
  # B is FATHOM's real value, which may drift far below 1; the batch used is its integer.
  line = (f'round {t}/{num_rounds} | {rounds_per_s:.2f} rounds/s | ETA {left} | '
          f'loss {row["train_loss"]:.4f} | eta {row["eta"]:.4g} E {row["epochs"]:.3g} '
          f'B {row["batch_size"]:.3g} ({row["batch_size_int"]} used) | '
          f'h_glob {row["h_glob"]:+.3f} h_local {row["h_local"]:+.3f}')
  if 'test_accuracy' in row:
    line += f' | test acc {row["test_accuracy"]:.4f}'
  return line


# A round's training loss this many times the last accepted round's is worth a warning: on an
# H100 at TF32 a run went from ~0.05 to 1e11 in one round with every update finite (so the
# round was accepted) and never recovered (docs/benchmarks.md).
LOSS_JUMP = 100.0


def loss_jump(before: float | None, row: dict, factor: float = LOSS_JUMP
              ) -> tuple[float, float] | None:
  """(`before`, how many times it `row`'s training loss is) if `row` was accepted and that is
  at least `factor`; else None. `before`: the last accepted round's positive, finite loss
  (RowLog)."""
  if not row.get('accepted', True):
    return None
  now = row['train_loss']
  if before is None or now is None or not (math.isfinite(before) and before > 0):
    return None
  ratio = now / before if math.isfinite(now) else math.inf
  return (before, ratio) if ratio >= factor else None

"""Other code's errors, said in one line of ours."""

from __future__ import annotations


def first_line(error: BaseException, limit: int = 200) -> str:
  """The first line of `error`'s message (at most `limit` characters), or its type's name when
  it has no message: a library's multi-line error, named inside one line of ours."""
  text = str(error).strip()
  return text.splitlines()[0][:limit] if text else type(error).__name__

"""Error messages that stay readable when a storage library's own message runs to pages, and the
warning category of data the readers drop."""
from __future__ import annotations


class DataWarning(UserWarning):
  """Data a reader dropped or skipped (annotations, unreadable images), counted and with ids;
  the programs print it as one plain `warning: ...` line (`cli.guarded`)."""


def first_line(error: BaseException, limit: int = 300) -> str:
  """'Type: first non-empty line of the message' (cut at `limit` characters)."""
  line = next((ln.strip() for ln in str(error).splitlines() if ln.strip()), '')
  return f'{type(error).__name__}: {line[:limit]}'

"""Error messages that stay readable when a storage library's own message runs to pages."""
from __future__ import annotations


def first_line(error: BaseException, limit: int = 300) -> str:
  """'Type: first non-empty line of the message' (cut at `limit` characters)."""
  line = next((ln.strip() for ln in str(error).splitlines() if ln.strip()), '')
  return f'{type(error).__name__}: {line[:limit]}'

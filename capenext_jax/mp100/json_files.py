"""Reading a user's text file whatever system wrote it: UTF-8, UTF-8 with a BOM, UTF-16 or
UTF-32 with a BOM. Anything else (latin-1, UTF-16 without a BOM) is refused in one line that
names the file and the problem.

  text = read_text('my_keypoints.txt', 'keypoints file')   # ValueError 'my_keypoints.txt: ...'
"""
from __future__ import annotations

import codecs
import os

# Longest first: the UTF-32-LE BOM starts with the UTF-16-LE one.
_BOMS = ((codecs.BOM_UTF32_LE, 'utf-32'), (codecs.BOM_UTF32_BE, 'utf-32'),
         (codecs.BOM_UTF8, 'utf-8-sig'), (codecs.BOM_UTF16_LE, 'utf-16'),
         (codecs.BOM_UTF16_BE, 'utf-16'))


def decode_text(raw: bytes, path: str) -> str:
  """The text of a file's bytes: by its BOM, else strict UTF-8 (ValueError naming `path`)."""
  for bom, encoding in _BOMS:
    if raw.startswith(bom):
      try:
        return raw.decode(encoding)
      except UnicodeDecodeError as e:
        raise ValueError(f'{path}: starts with a {encoding} byte-order mark but is not valid '
                         f'{encoding} text ({e.reason} at byte {e.start})') from None
  try:
    return raw.decode('utf-8')
  except UnicodeDecodeError as e:
    raise ValueError(f'{path}: not UTF-8 text (byte 0x{raw[e.start]:02x} at offset {e.start}): '
                     f'save it as UTF-8, or UTF-16 with a byte-order mark') from None


def read_text(path: str, what: str = 'file') -> str:
  """A text file's contents (see `decode_text`); a missing file or a folder is a ValueError
  ('<path>: <what> not found')."""
  path = os.fspath(path)
  if not os.path.exists(path):
    raise ValueError(f'{path}: {what} not found')
  if os.path.isdir(path):
    raise ValueError(f'{path}: is a folder, not a {what}')
  with open(path, 'rb') as f:
    return decode_text(f.read(), path)

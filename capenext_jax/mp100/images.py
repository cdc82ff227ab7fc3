"""Image decoding as the official loader sees pixels (cv2 ``imread``, ``IMREAD_COLOR``)."""
from __future__ import annotations

import io
import os

import numpy as np


def load_rgb(path_or_bytes: str | os.PathLike | bytes, expected_wh: tuple[int, int] | None = None
             ) -> np.ndarray:
  """Decodes an image to RGB uint8 [H, W, 3] with PIL (grey, palette, alpha, CMYK, 16-bit).

  EXIF orientation is applied, as cv2 does, unless ``expected_wh`` (an annotation's width and
  height) says the pixels were annotated as stored: then it is applied only when that makes
  the size match.
  """
  from PIL import Image, ImageOps
  src = (io.BytesIO(path_or_bytes) if isinstance(path_or_bytes, (bytes, bytearray))
         else path_or_bytes)
  with Image.open(src) as im:
    im.load()
    upright = ImageOps.exif_transpose(im)
    if expected_wh is not None and tuple(upright.size) != tuple(expected_wh):
      upright = im
    if upright.mode in ('I;16', 'I;16B', 'I;16L', 'I'):
      arr = np.asarray(upright, np.float64)
      upright = Image.fromarray(np.clip(arr / 256.0, 0, 255).astype(np.uint8))
    return np.asarray(upright.convert('RGB'))

"""Image decoding to RGB uint8 for the library (overlays, predict, image checks)."""
from __future__ import annotations

import io
import os

import numpy as np


def load_rgb(path_or_bytes: str | os.PathLike | bytes, expected_wh: tuple[int, int] | None = None
             ) -> np.ndarray:
  """Decodes an image to RGB uint8 [H, W, 3] with PIL (grey, palette, alpha, CMYK, 16-bit).

  EXIF orientation: without ``expected_wh`` it is applied (as cv2 does, for one's own photos);
  with an annotation's (width, height) it is applied only when that makes the size match, so
  the pixels are the ones the tf.data decoder (which ignores EXIF) gives for the same file.
  """
  from PIL import Image, ImageOps
  src = (io.BytesIO(path_or_bytes) if isinstance(path_or_bytes, (bytes, bytearray))
         else path_or_bytes)
  with Image.open(src) as im:
    im.load()
    if expected_wh is None or tuple(im.size) != tuple(expected_wh):
      upright = ImageOps.exif_transpose(im)
      if expected_wh is None or tuple(upright.size) == tuple(expected_wh):
        im = upright
    if im.mode in ('I;16', 'I;16B', 'I;16L', 'I'):
      arr = np.asarray(im, np.float64)
      im = Image.fromarray(np.clip(arr / 256.0, 0, 255).astype(np.uint8))
    return np.asarray(im.convert('RGB'))

"""Image decoding to RGB uint8 for the library (overlays, predict, image checks).

EXIF orientation is applied as the official loader's cv2 `imdecode(..., IMREAD_COLOR)` does:
always, so a photo stored sideways with an orientation tag is seen upright. The tf.data
decoder (data_pipeline/pipeline.py) reads the same tag (`exif_orientation`) and turns its
pixels the same way, so every path sees the same image.
"""
from __future__ import annotations

import io
import os

import numpy as np

EXIF_ORIENTATION_TAG = 0x0112


def exif_orientation(data: bytes | os.PathLike | str) -> int:
  """The EXIF orientation (1-8) of an encoded image; 1 when absent, invalid or unreadable
  (only the header is parsed)."""
  from PIL import Image
  try:
    with Image.open(io.BytesIO(data) if isinstance(data, (bytes, bytearray)) else data) as im:
      value = im.getexif().get(EXIF_ORIENTATION_TAG, 1)
  except Exception:  # noqa: BLE001 - undecodable files are reported by the decoder itself
    return 1
  return value if isinstance(value, int) and 1 <= value <= 8 else 1


def load_rgb(path_or_bytes: str | os.PathLike | bytes, expected_wh: tuple[int, int] | None = None
             ) -> np.ndarray:
  """Decodes an image to upright RGB uint8 [H, W, 3] with PIL (grey, palette, alpha, CMYK,
  16-bit; EXIF orientation applied).

  expected_wh: the annotation's (width, height); ValueError naming the file when the upright
    image has another size (and saying so when it is the EXIF rotation that swaps them).
  Unreadable files raise ValueError naming the file.
  """
  from PIL import Image, ImageOps
  name = '<bytes>' if isinstance(path_or_bytes, (bytes, bytearray)) else str(path_or_bytes)
  src = (io.BytesIO(path_or_bytes) if isinstance(path_or_bytes, (bytes, bytearray))
         else path_or_bytes)
  try:
    with Image.open(src) as im:
      im.load()
      raw_size = im.size
      im = ImageOps.exif_transpose(im)
      if im.mode in ('I;16', 'I;16B', 'I;16L', 'I'):
        arr = np.asarray(im, np.float64)
        im = Image.fromarray(np.clip(arr / 256.0, 0, 255).astype(np.uint8))
      rgb = np.asarray(im.convert('RGB'))
  except FileNotFoundError:
    raise ValueError(f'{name}: no such image file') from None
  except Exception as e:  # noqa: BLE001 - PIL raises many kinds for a broken file
    raise ValueError(f'{name}: cannot read image ({type(e).__name__}: {e})') from None
  if expected_wh is not None and (rgb.shape[1], rgb.shape[0]) != tuple(expected_wh):
    w, h = expected_wh
    rotated = tuple(raw_size) == (w, h)
    raise ValueError(f'{name}: image is {rgb.shape[1]}x{rgb.shape[0]} upright but the json says '
                     f'width x height {w}x{h}' + (
                         ' (its EXIF orientation tag turns it; the official loader, cv2, turns '
                         'it too, so the annotation does not fit the image it trains on)'
                         if rotated else ''))
  return rgb

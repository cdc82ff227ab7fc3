"""MP-100-format data in numpy (no TensorFlow): the annotation reader and validator, the
official keypoint descriptions, episodes and evaluation pairs, top-down geometry, images.

  annotations.py   load_annotations -> MP100Dataset; read_categories (K from the annotations)
  descriptions.py  the official "regular_test" description table
  episodes.py      training episodes, the official val/test pairs, the evaluation mask
  geometry.py      box cleaning, center/scale, affine matrices, crop windows (float64)
  images.py        image decoding to RGB uint8
"""

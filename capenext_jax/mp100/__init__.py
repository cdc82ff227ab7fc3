"""MP-100-format data in numpy (no TensorFlow): the annotation reader and validator, the
official keypoint descriptions, episodes and evaluation pairs, top-down geometry, images.

  annotations.py   load_annotations -> MP100Dataset; read_categories (K from the annotations,
                   0- or 1-based skeletons)
  descriptions.py  the official "regular_test" description table (MP-100's own categories);
                   check_descriptions (empty names, CLIP's 77 tokens)
  json_files.py    read_json: a user's JSON in UTF-8, UTF-8-BOM or UTF-16 with a BOM
  text_variants.py description variants (CapeX synonyms / typo / translate, user files), wrong
                   category prompts
  episodes.py      training episodes, the official val/test pairs, the evaluation mask
  geometry.py      box cleaning, center/scale, affine matrices, crop windows, heatmap side,
                   decoding to image pixels (float64), the ImageNet mean / std
  images.py        image decoding to RGB uint8
"""

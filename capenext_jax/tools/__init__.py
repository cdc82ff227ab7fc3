"""Tools run with `python -m capenext_jax.tools.<name>`.

  check_parity.py      parity against the official fixtures
  bf16_fidelity.py     bfloat16 vs float32 keypoints and losses of the same weights
  mp100_table.py       the paper's MP-100 table from eval reports
  split_categories.py  check a keypoint json, split it by category
"""

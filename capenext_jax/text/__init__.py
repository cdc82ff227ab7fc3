"""Text: CLIP's tokenizer and the frozen text-embedding cache.

  tokenizer.py    the CLIP BPE tokenizer (vocabulary shipped)
  cache.py        per-category keypoint / prompt embeddings, replicated on the mesh
"""

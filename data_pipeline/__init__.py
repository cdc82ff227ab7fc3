"""MP-100 data pipeline (the only place TensorFlow is imported, lazily).

Modules: annotations (reader/validator), descriptions (keypoint text), episodes (sampling),
transforms (float64 geometry), pipeline (tf.data), tfds_mp100 (TFDS builder), synthetic (data
generator). Importing this package does not import TensorFlow.
"""

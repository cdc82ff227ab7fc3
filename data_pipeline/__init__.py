"""MP-100 input pipeline (the only place TensorFlow is imported, lazily).

Modules: pipeline (tf.data episode batches), tfds_mp100 (TFDS builder), synthetic (data
generator). The annotation reader, descriptions, episodes and geometry are numpy and live in
the library (`capenext_jax.mp100`), which never imports this package. Importing this package
does not import TensorFlow.
"""

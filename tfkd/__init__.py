"""tfkd: knowledge distillation for TensorFlow/Keras image classifiers, shipped to the edge.

Modules: ``data`` (datasets and the tf.data pipeline), ``models`` (the zoo), ``teacher`` (the
reconstruction-augmented teacher), ``losses``, ``config``, ``train`` (the CLI).
"""

__version__ = "0.1.0"

"""dpwa adapter for Keras 3 models on the TensorFlow backend."""

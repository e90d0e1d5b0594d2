"""Keras 3 (TensorFlow backend) layer on the fused kernel: `fusedlstm.keras.LSTM` is a drop-in
for `keras.layers.LSTM`. Importing this module imports TensorFlow and registers the layer as
serializable; `load_ops()` loads (building on first use) the compiled op library, which a fresh
process needs before reloading a SavedModel that contains the layer."""
from .build import build_op
from .layer import LSTM
from .ops import load_ops

__all__ = ["LSTM", "load_ops", "build_op"]

"""Keras 3 layer on the fused kernel: `fusedlstm.keras.LSTM` is a drop-in for
`keras.layers.LSTM` on Keras's TensorFlow backend (a compiled TensorFlow op with a registered
gradient) and on its torch backend (a torch.autograd.Function, CPU tensors). Importing this module
registers the layer as serializable; it imports TensorFlow only on the TensorFlow backend.
`load_ops()` loads (building on first use) the compiled op library, which a fresh process needs
before reloading a SavedModel that contains the layer."""

import keras

from .build import build_op
from .layer import LSTM

__all__ = ["LSTM", "load_ops", "build_op"]

if keras.backend.backend() == "tensorflow":
    from .ops import load_ops  # registers the op's gradient with TensorFlow now
else:

    def load_ops():
        """Load the TensorFlow op library (TensorFlow backend only; builds it on first use)."""
        from .ops import load_ops as load

        return load()

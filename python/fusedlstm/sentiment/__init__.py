"""The sentiment application on top of the kernel API: text and data readers, word vectors,
the layers and optimizer of the classic many-to-one classifier, ``SentimentClassifier``, its
training loop (with callbacks) and checkpoints, and the ``fusedlstm train | eval | predict``
commands.

    model.py       SentimentClassifier, ModelConfig: the network, predict, evaluate, save/load
    training.py    fit, TrainOptions, Callback, batches, clip_scale: the training loop
    checkpoint.py  atomic writes, .npz without pickle, the training state
    layers.py, optim.py, text.py, data.py, vectors.py, cli.py
"""

from .model import ModelConfig, SentimentClassifier
from .training import Callback, TrainOptions

__all__ = ["Callback", "ModelConfig", "SentimentClassifier", "TrainOptions"]

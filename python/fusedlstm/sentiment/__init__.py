"""The sentiment application on top of the kernel API: text and data readers, word vectors,
the layers and optimizer of the classic many-to-one classifier, ``SentimentClassifier`` and the
``fusedlstm train | eval | predict`` commands."""

from .model import ModelConfig, SentimentClassifier, TrainOptions

__all__ = ["ModelConfig", "SentimentClassifier", "TrainOptions"]

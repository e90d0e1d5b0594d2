"""fusedlstm for PyTorch: ``fusedlstm.torch.LSTM``, a drop-in for ``torch.nn.LSTM`` on the CPU whose
directions run as fused kernel calls, registered as the ``torch.library`` custom ops
``torch.ops.fusedlstm.lstm`` and ``torch.ops.fusedlstm.lstm_backward`` (``torch.compile`` and
``torch.export`` see them as single opaque calls). Needs torch (the ``torch`` extra)."""

from __future__ import annotations

from .module import LSTM
from .ops import lstm as lstm_op

__all__ = ["LSTM", "lstm_op"]

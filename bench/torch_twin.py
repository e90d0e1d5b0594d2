"""The classifier's LSTM and pooling in plain PyTorch, for the benchmarks' PyTorch twins
(bench_sst2.py trains it, bench_serving.py scores with it): torch.nn.LSTM with the model's layers
and directions, its weights copied from ours, and the same sentence vector."""

from __future__ import annotations

import numpy as np
import torch

from fusedlstm.convert import keras_to_torch


def make_lstm(config, params: dict) -> torch.nn.LSTM:
    """torch.nn.LSTM with the architecture of `config` (a ModelConfig) and the weights `params`
    (by our names) copied in."""
    E = params["embedding"].shape[1]
    lstm = torch.nn.LSTM(
        E, config.units, num_layers=config.layers, bidirectional=config.bidirectional, batch_first=True
    )
    for layer, dirs in enumerate(config.lstm_names()):
        for d, names in enumerate(dirs):
            sfx = f"_l{layer}" + ("_reverse" if d else "")
            for name, v in zip(
                ("weight_ih", "weight_hh", "bias_ih", "bias_hh"), keras_to_torch(*(params[n] for n in names))
            ):
                getattr(lstm, name + sfx).data.copy_(torch.from_numpy(v))
    return lstm


def sentence_vectors(config, lstm: torch.nn.LSTM, x: torch.Tensor, lengths: np.ndarray) -> torch.Tensor:
    """The pooled features [B, D·H] of padded word vectors x [B, T, E] (T = the longest length)."""
    T = x.shape[1]
    lens = torch.from_numpy(np.asarray(lengths).astype(np.int64))
    if config.bidirectional:
        # The reverse direction must start at each sentence's last word, not at the padding: a
        # packed batch, as torch users must do.
        packed = torch.nn.utils.rnn.pack_padded_sequence(x, lens, batch_first=True, enforce_sorted=False)
        out, (h_n, _) = lstm(packed)
        out, _ = torch.nn.utils.rnn.pad_packed_sequence(out, batch_first=True, total_length=T)
        last = torch.cat([h_n[-2], h_n[-1]], dim=1)
    else:
        # One direction: the outputs at valid steps never see the padding, so the padded batch
        # (faster in torch) gives the same results.
        out, _ = lstm(x)
        last = out[torch.arange(len(lens)), lens - 1]
    if config.pooling == "last":
        return last
    valid = (torch.arange(T)[None, :] < lens[:, None])[:, :, None]
    if config.pooling == "max":
        return out.masked_fill(~valid, float("-inf")).max(dim=1).values
    return out.masked_fill(~valid, 0.0).sum(dim=1) / lens[:, None].clamp(min=1)

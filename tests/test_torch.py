"""Agreement with torch.nn.LSTM (weights mapped with fusedlstm.convert): outputs, final states and
gradients for x, weights, biases and initial state; and the converters' exactness."""

import numpy as np
import pytest

import fusedlstm
from fusedlstm.convert import keras_to_torch, torch_to_keras
from helpers import make_problem, requires_torch

pytestmark = requires_torch


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("shape", [(1, 1, 1, 1), (4, 7, 5, 9), (3, 12, 16, 33)])
def test_matches_torch(rng, dtype, shape):
    import torch

    B, T, E, H = shape
    p, up = make_problem(rng, B, T, E, H, dtype=dtype)
    tdt = torch.float64 if dtype == np.float64 else torch.float32
    lstm = torch.nn.LSTM(E, H, batch_first=True).to(tdt)
    wi, wh, bi, bh = keras_to_torch(p["kernel"], p["recurrent_kernel"], p["bias"])
    with torch.no_grad():
        lstm.weight_ih_l0.copy_(torch.from_numpy(wi))
        lstm.weight_hh_l0.copy_(torch.from_numpy(wh))
        lstm.bias_ih_l0.copy_(torch.from_numpy(bi))
        lstm.bias_hh_l0.copy_(torch.from_numpy(bh))
    x = torch.from_numpy(p["x"]).requires_grad_(True)
    h0 = torch.from_numpy(p["h0"])[None].requires_grad_(True)
    c0 = torch.from_numpy(p["c0"])[None].requires_grad_(True)
    y, (hn, cn) = lstm(x, (h0, c0))
    (y * torch.from_numpy(up["d_outputs"])).sum().add_(
        (hn[0] * torch.from_numpy(up["d_h_n"])).sum() + (cn[0] * torch.from_numpy(up["d_c_n"])).sum()
    ).backward()

    out, h_n, c_n, cache = fusedlstm.lstm_forward(**p)
    g = fusedlstm.lstm_backward(cache, **up)
    tol = dict(rtol=1e-9, atol=1e-10) if dtype == np.float64 else dict(rtol=2e-4, atol=2e-5)
    np.testing.assert_allclose(out, y.detach().numpy(), **tol)
    np.testing.assert_allclose(h_n, hn[0].detach().numpy(), **tol)
    np.testing.assert_allclose(c_n, cn[0].detach().numpy(), **tol)
    kd, rd, bd = torch_to_keras(lstm.weight_ih_l0.grad, lstm.weight_hh_l0.grad, lstm.bias_ih_l0.grad)
    np.testing.assert_allclose(g.x, x.grad.numpy(), **tol)
    np.testing.assert_allclose(g.kernel, kd, **tol)
    np.testing.assert_allclose(g.recurrent_kernel, rd, **tol)
    np.testing.assert_allclose(g.bias, bd, **tol)
    np.testing.assert_allclose(g.bias, lstm.bias_hh_l0.grad.numpy(), **tol)  # d/db_ih == d/db_hh
    np.testing.assert_allclose(g.h0, h0.grad[0].numpy(), **tol)
    np.testing.assert_allclose(g.c0, c0.grad[0].numpy(), **tol)


def test_lengths_match_packed_sequences(rng):
    """fusedlstm's lengths == torch's pack_padded_sequence (h_n/c_n at each row's last step)."""
    import torch
    from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

    B, T, E, H = 4, 6, 3, 5
    p, _ = make_problem(rng, B, T, E, H, lengths=[6, 4, 1, 3], state=False)
    lstm = torch.nn.LSTM(E, H, batch_first=True).double()
    wi, wh, bi, bh = keras_to_torch(p["kernel"], p["recurrent_kernel"], p["bias"])
    with torch.no_grad():
        for name, v in zip(("weight_ih_l0", "weight_hh_l0", "bias_ih_l0", "bias_hh_l0"), (wi, wh, bi, bh)):
            getattr(lstm, name).copy_(torch.from_numpy(v))
    packed = pack_padded_sequence(
        torch.from_numpy(p["x"]), torch.from_numpy(p["lengths"]), batch_first=True, enforce_sorted=False
    )
    y, (hn, cn) = lstm(packed)
    y, _ = pad_packed_sequence(y, batch_first=True, total_length=T)
    out, h_n, c_n, _ = fusedlstm.lstm_forward(**p, training=False)
    np.testing.assert_allclose(out, y.detach().numpy(), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(h_n, hn[0].detach().numpy(), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(c_n, cn[0].detach().numpy(), rtol=1e-10, atol=1e-12)


def test_converters_round_trip_exactly(rng):
    import torch

    lstm = torch.nn.LSTM(7, 5)
    k, r, b = torch_to_keras(lstm.weight_ih_l0, lstm.weight_hh_l0, lstm.bias_ih_l0, lstm.bias_hh_l0)
    assert k.shape == (7, 20) and r.shape == (5, 20) and b.shape == (20,)
    wi, wh, bi, bh = keras_to_torch(k, r, b)
    np.testing.assert_array_equal(wi, lstm.weight_ih_l0.detach().numpy())
    np.testing.assert_array_equal(wh, lstm.weight_hh_l0.detach().numpy())
    np.testing.assert_array_equal(bi + bh, (lstm.bias_ih_l0 + lstm.bias_hh_l0).detach().numpy())
    with pytest.raises(ValueError, match="weight_hh"):
        torch_to_keras(np.zeros((4, 3)), np.zeros((4, 3)))

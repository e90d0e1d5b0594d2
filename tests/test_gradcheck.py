"""The NumPy reference's backward against central finite differences in float64 for all six
gradients (with padding, so the masked-step rules are checked too); the compiled kernel is then
checked the same way, independently of the reference."""

import numpy as np
import pytest

import fusedlstm
from fusedlstm import reference
from helpers import make_problem

NAMES = ["x", "kernel", "recurrent_kernel", "bias", "h0", "c0"]


def loss(mod, p, up, reverse):
    out, h, c, _ = mod.lstm_forward(**p, training=False, reverse=reverse)
    return np.sum(out * up["d_outputs"]) + np.sum(h * up["d_h_n"]) + np.sum(c * up["d_c_n"])


@pytest.mark.parametrize("mod", [reference, fusedlstm], ids=["reference", "kernel"])
@pytest.mark.parametrize("lengths", [None, [4, 2, 0]])
@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
def test_central_differences(rng, mod, lengths, reverse):
    p, up = make_problem(rng, 3, 4, 3, 5, lengths="none" if lengths is None else lengths)
    grads = mod.lstm_backward(mod.lstm_forward(**p, reverse=reverse)[3], **up)
    eps = 1e-6
    for name in NAMES:
        arr = p[name]
        num = np.zeros_like(arr)
        for idx in np.ndindex(arr.shape):
            orig = arr[idx]
            arr[idx] = orig + eps
            lp = loss(mod, p, up, reverse)
            arr[idx] = orig - eps
            lm = loss(mod, p, up, reverse)
            arr[idx] = orig
            num[idx] = (lp - lm) / (2 * eps)
        np.testing.assert_allclose(getattr(grads, name), num, rtol=1e-6, atol=1e-8, err_msg=f"d loss / d {name}")

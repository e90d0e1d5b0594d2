"""Hypothesis fuzz of shapes, lengths, initial state, dtype and value scale against the NumPy
reference (short in every CI run)."""
import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fusedlstm
from fusedlstm import reference

from conftest import as64, assert_close


@st.composite
def problems(draw):
    B = draw(st.integers(0, 6))
    T = draw(st.integers(0, 7))
    E = draw(st.integers(0, 9))
    H = draw(st.integers(0, 70))
    dtype = draw(st.sampled_from([np.float32, np.float64]))
    seed = draw(st.integers(0, 2**32 - 1))
    # Scale 5 gives pre-activations near 100 and gradients that are sums of large cancelling
    # terms: float32 roundoff there is inherent (not a kernel error), so it is fuzzed in float64.
    scale = draw(st.sampled_from([0.1, 1.0, 5.0] if dtype == np.float64 else [0.1, 1.0]))
    rng = np.random.default_rng(seed)
    r = lambda *s: (rng.standard_normal(s) * scale).astype(dtype)  # noqa: E731
    p = dict(x=r(B, T, E), kernel=r(E, 4 * H), recurrent_kernel=r(H, 4 * H),
             bias=r(4 * H) if draw(st.booleans()) else None)
    if draw(st.booleans()):
        p["h0"], p["c0"] = r(B, H), r(B, H)
    if draw(st.booleans()):
        p["lengths"] = rng.integers(0, T + 1, size=B)
    up = dict(d_outputs=r(B, T, H), d_h_n=r(B, H), d_c_n=r(B, H))
    return p, up, dtype


# Derandomized: the same 150 examples in every CI run (a run that fails can be replayed).
@settings(max_examples=150, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow])
@given(problems())
def test_fuzz_against_reference(prob):
    p, up, dtype = prob
    out = fusedlstm.lstm_forward(**p)
    ref = reference.lstm_forward(**as64(p))
    g = fusedlstm.lstm_backward(out[3], **up)
    gr = reference.lstm_backward(ref[3], **as64(up))
    pairs = list(zip(("outputs", "h_n", "c_n"), out[:3], ref[:3]))
    pairs += [(name, getattr(g, name), getattr(gr, name)) for name in g._fields]
    for name, a, b in pairs:
        assert a.dtype == dtype and a.shape == b.shape, name
        if dtype == np.float32:
            # float32 roundoff carried through T steps: the bound follows the data's magnitude.
            np.testing.assert_allclose(a, b, rtol=1e-4, err_msg=name,
                                       atol=1e-4 * max(1.0, np.abs(b).max(initial=0)))
        else:
            assert_close(a, b, dtype, name)

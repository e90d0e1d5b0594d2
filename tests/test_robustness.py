"""Numerical robustness: very long sequences and saturating pre-activations give finite outputs
and gradients wherever the float64 reference does, and agree with it. Also a leak check:
thousands of forward/backward calls do not grow the process's memory."""

import gc
import resource
import sys

import numpy as np
import pytest

import fusedlstm
from fusedlstm import reference
from helpers import as64, make_problem


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_ten_thousand_steps(rng, dtype):
    B, T, E, H = 3, 10_000, 4, 8
    p, up = make_problem(rng, B, T, E, H, dtype=dtype, lengths=[T, 7_777, 1])
    out, h, c, cache = fusedlstm.lstm_forward(**p)
    g = fusedlstm.lstm_backward(cache, **up)
    ref = reference.lstm_forward(**as64(p))
    gr = reference.lstm_backward(ref[3], **as64(up))
    tol = 1e-3 if dtype == np.float32 else 1e-9
    for name, a, b in [("outputs", out, ref[0]), ("h_n", h, ref[1]), ("c_n", c, ref[2])] + [
        ("d_" + k, getattr(g, k), getattr(gr, k)) for k in g._fields
    ]:
        assert np.isfinite(a).all(), name
        scale = max(1.0, float(np.abs(b).max()))
        np.testing.assert_allclose(a, b, rtol=tol, atol=tol * scale, err_msg=name)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("scale", [1e2, 1e4, 1e30])
def test_saturating_preactivations(rng, dtype, scale):
    """|z| far beyond where exp overflows (z ~ +-1e30 included): gates saturate to exactly 0/1,
    nothing overflows, and the gradients through saturated gates are (near) zero, as in the
    reference."""
    B, T, E, H = 4, 12, 6, 16
    p, up = make_problem(rng, B, T, E, H, dtype=dtype, lengths="random", scale=1.0)
    p["kernel"] = (p["kernel"] * scale).astype(dtype)
    p["bias"] = (p["bias"] * scale).astype(dtype)
    out, h, c, cache = fusedlstm.lstm_forward(**p)
    g = fusedlstm.lstm_backward(cache, **up)
    ref = reference.lstm_forward(**as64(p))
    gr = reference.lstm_backward(ref[3], **as64(up))
    for name, a, b in [("outputs", out, ref[0]), ("h_n", h, ref[1]), ("c_n", c, ref[2])] + [
        ("d_" + k, getattr(g, k), getattr(gr, k)) for k in g._fields
    ]:
        assert np.isfinite(b).all(), name  # the problem is well posed in float64
        assert np.isfinite(a).all(), name
        assert np.abs(out).max() <= 1.0
        # Saturated gates are exact. A gate that happens to sit near z = 0 has a derivative
        # known to one ULP of 1.0, and d_x multiplies it by a weight of size `scale`: that
        # conditioning (eps * scale) is the dtype's, not the kernel's.
        bound = max(1.0, float(np.abs(b).max()))
        atol = 1e-4 * bound + (8 * np.finfo(dtype).eps * scale if name.startswith("d_") else 0)
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=atol, err_msg=name)


def _rss_mb():
    """Current resident set size in MB (Linux /proc; peak RSS elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * resource.getpagesize() / 2**20
    except OSError:
        scale = 2**20 if sys.platform == "darwin" else 2**10
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / scale


@pytest.mark.skipif(
    bool(fusedlstm.build_info().get("sanitizers")),
    reason="AddressSanitizer's quarantine keeps freed memory resident; the "
    "sanitizer build's leak check is .ci/lsan_leak_check.py",
)
def test_repeated_calls_do_not_leak(rng):
    """3,000 forward+backward calls of varying shapes (training and inference, lengths, every
    buffer-recycling path): resident memory after them is within a few MB of after the first
    round. A leak of one cache per call would be ~0.4 MB x 3,000."""
    shapes = [(8, 20, 16, 32), (8, 20, 16, 32), (5, 9, 7, 24), (16, 3, 32, 8)]
    problems = [make_problem(rng, *s, dtype=np.float32, lengths="random") for s in shapes]

    def round_(k):
        for i in range(k):
            p, up = problems[i % len(problems)]
            out = fusedlstm.lstm_forward(**p)
            fusedlstm.lstm_backward(out[3], **up)
            fusedlstm.lstm_forward(**p, training=False)
            if i % 97 == 0:  # an unused cache dropped on the floor must be freed too
                fusedlstm.lstm_forward(**p)

    round_(200)
    gc.collect()
    before = _rss_mb()
    round_(3_000)
    gc.collect()
    grown = _rss_mb() - before
    assert grown < 8.0, f"resident memory grew by {grown:.1f} MB over 3,000 calls"

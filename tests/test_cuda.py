"""The CUDA kernels (a FUSEDLSTM_CUDA=ON build) against the CPU kernel: forward values and all
six gradients, with lengths (0 and T included), h0/c0 present or not, bias or none, float32 and
float64, forward and reverse; inference stores nothing; repeated runs are bit-identical; a cache is good for one
backward. The device argument is checked in every build; the GPU tests skip, saying why, where
there is no CUDA build or no GPU (.ci/cuda_build compiles the CUDA build wherever nvcc is)."""

import numpy as np
import pytest

import fusedlstm
from fusedlstm import _core
from helpers import make_problem

BUILT = bool(fusedlstm.build_info()["cuda"])
GPU = fusedlstm.cuda_available()
needs_gpu = pytest.mark.skipif(
    not GPU,
    reason="no CUDA GPU here"
    if BUILT
    else "this build has no CUDA (pip install . -Ccmake.define.FUSEDLSTM_CUDA=ON; see .ci/cuda_build)",
)


def test_device_argument_is_checked(rng):
    p, _ = make_problem(rng, 2, 3, 4, 5, dtype=np.float32)
    with pytest.raises(ValueError, match="device: expected 'cpu' or 'cuda', got 'tpu'"):
        fusedlstm.lstm_forward(**p, device="tpu")
    if not GPU:
        why = "no CUDA GPU is visible" if BUILT else "built without CUDA"
        with pytest.raises(RuntimeError, match=why):
            fusedlstm.lstm_forward(**p, device="cuda")
    assert _core.cuda_device_count() >= (1 if GPU else 0)


@pytest.mark.skipif(not BUILT, reason="this build has no CUDA (see .ci/cuda_build)")
def test_cuda_refuses_sizes_cublas_cannot_take():
    # cuBLAS takes int sizes: N*T = 2^32 would be truncated. Refused before any GPU work, so
    # this runs in a CUDA build without a GPU too.
    x = np.zeros((1 << 16, 1 << 16, 0), np.float32)
    k, r = np.zeros((0, 4), np.float32), np.zeros((1, 4), np.float32)
    with pytest.raises(ValueError, match=r"N\*T exceeds 2147483647 \(INT_MAX"):
        _core.forward_cuda(x, k, r, None, None, None, None, True)
    with pytest.raises(TypeError):  # the backward takes only a CudaCache, which carries its shape
        _core.backward_cuda(np.zeros(8, np.float32), None, None, None)


SHAPES = [(1, 1, 1, 1), (3, 6, 5, 17), (7, 5, 12, 70), (33, 9, 20, 129)]


@needs_gpu
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B%d_T%d_E%d_H%d" % s)
@pytest.mark.parametrize("lengths", ["none", "random"])
@pytest.mark.parametrize("state", [False, True])
@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
def test_cuda_matches_cpu(rng, dtype, shape, lengths, state, reverse):
    p, up = make_problem(rng, *shape, dtype=dtype, lengths=lengths, state=state, bias=shape[0] % 2 == 1)
    cpu = fusedlstm.lstm_forward(**p, reverse=reverse)
    gpu = fusedlstm.lstm_forward(**p, device="cuda", reverse=reverse)
    assert gpu[3].device == "cuda" and gpu[3].nbytes > 0 and gpu[3].shape == shape
    assert gpu[3].reverse is reverse
    # Inference on the GPU, reverse included, against the CPU's.
    inf = fusedlstm.lstm_forward(**p, device="cuda", reverse=reverse, training=False)
    tol_inf = dict(rtol=1e-10, atol=1e-11) if dtype == np.float64 else dict(rtol=2e-4, atol=2e-5)
    np.testing.assert_allclose(inf[0], cpu[0], **tol_inf)
    g_cpu = fusedlstm.lstm_backward(cpu[3], **up)
    g_gpu = fusedlstm.lstm_backward(gpu[3], **up)
    tol = dict(rtol=1e-10, atol=1e-11) if dtype == np.float64 else dict(rtol=2e-4, atol=2e-5)
    for name, a, b in zip(("outputs", "h_n", "c_n"), gpu[:3], cpu[:3]):
        assert a.dtype == dtype and a.shape == b.shape, name
        np.testing.assert_allclose(a, b, err_msg=name, **tol)
    for name in g_cpu._fields:
        a, b = getattr(g_gpu, name), getattr(g_cpu, name)
        assert a.dtype == dtype and a.shape == b.shape, name
        np.testing.assert_allclose(a, b, err_msg="d_" + name, **tol)


@needs_gpu
def test_cuda_inference_reproducible_and_cache_single_use(rng):
    p, up = make_problem(rng, 16, 12, 24, 48, dtype=np.float32, lengths="random")
    out, h, c, cache = fusedlstm.lstm_forward(**p, training=False, device="cuda")
    assert cache is None
    np.testing.assert_allclose(out, fusedlstm.lstm_forward(**p, training=False)[0], rtol=2e-4, atol=2e-5)
    runs = []
    for _ in range(2):
        o = fusedlstm.lstm_forward(**p, device="cuda")
        runs.append((o[0], fusedlstm.lstm_backward(o[3], **up)))
    np.testing.assert_array_equal(runs[0][0], runs[1][0])
    for a, b in zip(runs[0][1], runs[1][1]):
        np.testing.assert_array_equal(a, b)
    o = fusedlstm.lstm_forward(**p, device="cuda")
    fusedlstm.lstm_backward(o[3], **up)
    with pytest.raises(ValueError, match="already used"):
        fusedlstm.lstm_backward(o[3], **up)


@needs_gpu
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
def test_cuda_options_match_cpu(rng, dtype, reverse):
    """Activations, recurrent masks and masks with holes on the GPU against the CPU kernel."""
    p, up = make_problem(rng, 7, 6, 5, 33, dtype=dtype)
    p["lengths"] = None
    mask = rng.random((7, 6)) < 0.6
    mask[0] = False
    rmasks = ((rng.random((4, 7, 33)) >= 0.3) / 0.7).astype(dtype)
    kw = dict(activation="relu", recurrent_activation="hard_sigmoid", recurrent_masks=rmasks, mask=mask)
    cpu = fusedlstm.lstm_forward(**p, reverse=reverse, **kw)
    gpu = fusedlstm.lstm_forward(**p, reverse=reverse, device="cuda", **kw)
    tol = dict(rtol=1e-10, atol=1e-11) if dtype == np.float64 else dict(rtol=2e-4, atol=2e-5)
    for a, b in zip(gpu[:3], cpu[:3]):
        np.testing.assert_allclose(a, b, **tol)
    g_cpu, g_gpu = fusedlstm.lstm_backward(cpu[3], **up), fusedlstm.lstm_backward(gpu[3], **up)
    for name in g_cpu._fields:
        np.testing.assert_allclose(getattr(g_gpu, name), getattr(g_cpu, name), err_msg=name, **tol)

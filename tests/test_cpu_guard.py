"""The import guard for native builds: a build compiled for instruction sets this CPU lacks must
raise ImportError naming them, never die with SIGILL; a build whose requirements the CPU meets
imports and runs. The emulated-CPU tests run the interpreter under qemu-x86_64 (user mode) with
an older CPU model; they need qemu-user (.ci/run installs it where apt-get can)."""

from __future__ import annotations

import platform
import shutil
import subprocess
import sys
from types import SimpleNamespace

import pytest

import fusedlstm
from fusedlstm import _cpu, _isa

pytestmark = [pytest.mark.heavy, pytest.mark.isa]

X86 = platform.machine() in ("x86_64", "AMD64", "i686", "i386")
QEMU = shutil.which("qemu-x86_64")
# What qemu's TCG emulates for these CPU models (it has no AVX-512 at all).
NEHALEM = {"sse3", "ssse3", "sse4.1", "sse4.2", "popcnt"}
HASWELL = NEHALEM | {"aes", "pclmul", "avx", "avx2", "fma", "bmi", "bmi2"}


def test_this_cpu_has_what_this_build_needs():
    assert _isa.missing() == []
    for name in _isa.required():
        assert _isa.supported(name) is True, name  # every listed name is one the check knows


def test_required_extensions_follow_the_build_flags():
    info = fusedlstm.build_info()
    req = _isa.required()
    assert info["isa_required"] == req
    assert len(set(req)) == len(req)
    if X86 and info["native"]:
        # -march=native on any x86-64 CPU of the last 15 years enables at least these.
        assert {"sse3", "ssse3", "sse4.1", "sse4.2"} <= set(req)
        if "AVX512" in info["simd"]:
            assert "avx512f" in req
    else:
        assert req == []  # a portable build assumes nothing beyond x86-64 (or is not x86)
    assert _isa.supported("no-such-extension") is None


def test_guard_names_exactly_the_missing_extensions():
    fake = SimpleNamespace(
        required=lambda: ["avx2", "avx512f", "avx512bw", "mystery"],
        supported={"avx2": True, "avx512f": False, "avx512bw": False, "mystery": None}.get,
    )
    assert _cpu.missing_extensions(fake) == ["avx512f", "avx512bw"]
    with pytest.raises(ImportError, match=r"lacks: avx512f, avx512bw\. ") as e:
        _cpu.require_cpu(fake)
    assert "FUSEDLSTM_NATIVE=OFF" in str(e.value) and "avx2," not in str(e.value)
    ok = SimpleNamespace(required=lambda: ["avx2"], supported=lambda n: True)
    assert _cpu.require_cpu(ok) is None


def _under_qemu(cpu: str, code: str) -> subprocess.CompletedProcess:
    return subprocess.run([QEMU, "-cpu", cpu, sys.executable, "-c", code], capture_output=True, text=True, timeout=600)


needs_qemu = pytest.mark.skipif(not (X86 and QEMU), reason="needs x86 and qemu-x86_64 (qemu-user)")


@needs_qemu
def test_on_an_older_cpu_import_is_an_error_not_sigill():
    req = set(_isa.required())
    cpu = "Haswell" if req - HASWELL else "Nehalem" if req - NEHALEM else None
    if cpu is None:
        pytest.skip("this build needs nothing beyond what qemu's oldest model here has")
    r = _under_qemu(cpu, "import fusedlstm")
    assert r.returncode == 1, (r.returncode, r.stderr[-2000:])  # SIGILL would be -4 / 132
    assert "ImportError: fusedlstm: this build was compiled for another CPU" in r.stderr
    want = sorted(req - (HASWELL if cpu == "Haswell" else NEHALEM))
    assert all(n in r.stderr for n in want)


@needs_qemu
def test_runs_on_an_emulated_cpu_that_has_what_it_needs():
    req = set(_isa.required())
    cpu = "Nehalem" if req <= NEHALEM else "Haswell" if req <= HASWELL else None
    if cpu is None:
        pytest.skip(
            "qemu cannot emulate AVX-512, which this build needs (the portable build runs this test in .ci/portable)"
        )
    code = """
import numpy as np, fusedlstm
from fusedlstm import reference
rng = np.random.default_rng(0)
x = rng.standard_normal((3, 5, 4)); k = rng.standard_normal((4, 24)) * .3
r = rng.standard_normal((6, 24)) * .3; b = rng.standard_normal(24) * .1; L = np.array([5, 2, 0])
o, h, c, cache = fusedlstm.lstm_forward(x, k, r, b, lengths=L)
o2, h2, c2, cache2 = reference.lstm_forward(x, k, r, b, lengths=L)
g = fusedlstm.lstm_backward(cache, d_outputs=np.ones_like(o))
g2 = reference.lstm_backward(cache2, d_outputs=np.ones_like(o))
for a, e in [(o, o2), (h, h2), (c, c2), (g.kernel, g2.kernel), (g.recurrent_kernel, g2.recurrent_kernel), (g.x, g2.x)]:
    np.testing.assert_allclose(a, e, rtol=1e-10, atol=1e-12)
print("ok")
"""
    r = _under_qemu(cpu, code)
    assert r.returncode == 0 and r.stdout.strip() == "ok", (r.returncode, r.stderr[-2000:])

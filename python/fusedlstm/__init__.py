"""fusedlstm: a fused, multi-threaded C++ LSTM for NumPy (forward and BPTT, each one call over
whole sequences), with Keras's weight layout. This module is the kernel API; it never imports
TensorFlow, PyTorch or the sentiment application (``fusedlstm.sentiment``, loaded on first use
of ``fusedlstm.SentimentClassifier``)."""

from __future__ import annotations

import platform
import sys
from typing import Any

from . import _cpu, _isa

_cpu.require_cpu(_isa)  # before _core: a native build on the wrong CPU is an ImportError, not SIGILL

from . import _core, convert, reference  # noqa: E402
from ._checks import LstmGrads  # noqa: E402
from .lstm import (  # noqa: E402
    BidirectionalCache,
    BidirectionalGrads,
    LstmCache,
    cuda_available,
    empty_cache,
    lstm_backward,
    lstm_bidirectional_forward,
    lstm_forward,
)
from .prepared import PreparedLSTM, infer_bidirectional, prepare  # noqa: E402
from .stack import StackCache, StackGrads, lstm_stack_backward, lstm_stack_forward  # noqa: E402

try:  # the one version source is the package metadata (pyproject.toml)
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as _dist_version

    __version__ = _dist_version("fusedlstm")
except PackageNotFoundError:  # a source tree on sys.path without an install
    __version__ = "0+unknown"

__all__ = [
    "LstmCache",
    "LstmGrads",
    "lstm_forward",
    "lstm_backward",
    "lstm_bidirectional_forward",
    "BidirectionalCache",
    "BidirectionalGrads",
    "lstm_stack_forward",
    "lstm_stack_backward",
    "StackCache",
    "StackGrads",
    "prepare",
    "infer_bidirectional",
    "PreparedLSTM",
    "reference",
    "convert",
    "set_num_threads",
    "get_num_threads",
    "build_info",
    "empty_cache",
    "cuda_available",
    "bf16_engine",
    "SentimentClassifier",
    "BatchScorer",
    "__version__",
]


def __getattr__(name: str):
    # The sentiment application loads on first use: `import fusedlstm` is the kernel API alone.
    if name == "SentimentClassifier":
        from .sentiment import SentimentClassifier

        return SentimentClassifier
    if name == "BatchScorer":
        from .scoring import BatchScorer

        return BatchScorer
    if name == "sentiment":
        import importlib

        return importlib.import_module(".sentiment", __name__)
    raise AttributeError(f"module 'fusedlstm' has no attribute {name!r}")


def set_num_threads(n: int) -> None:
    """Set how many threads the kernels use (default: all cores, or ``OMP_NUM_THREADS``).

    Results are bit-identical for every thread count.
    """
    if isinstance(n, bool) or not isinstance(n, int):
        raise TypeError(f"set_num_threads: n must be an int, got {type(n).__name__}")
    _core.set_num_threads(n)


def get_num_threads() -> int:
    """Threads the kernels use."""
    return int(_core.get_num_threads())


def bf16_engine() -> str | None:
    """The engine ``precision="bfloat16"`` runs on here: "amx" (AMX tiles), "avx512_bf16"
    (VDPBF16PS), or None where the CPU lacks AVX512_BF16 (bfloat16 then raises RuntimeError)."""
    engine = str(_core.bf16_engine())
    return None if engine == "none" else engine


def build_info() -> dict[str, Any]:
    """How this build was compiled: version, compiler, SIMD, OpenMP, threads."""
    info = dict(_core.build_info())
    info["version"] = __version__
    info["python"] = sys.version.split()[0]
    info["machine"] = platform.machine()
    info["isa_required"] = _isa.required()
    info["bf16_engine"] = bf16_engine()
    return info

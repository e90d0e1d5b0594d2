"""Type stubs of the compiled module fusedlstm._core (csrc/python/*_bindings.cc). Use the
fusedlstm package, not this module: it checks and converts arguments first."""

from typing import Any

import numpy as np

class Cache:
    """A training forward's cache: what backward reads, with its shape, dtype and lengths."""

    @property
    def buffer(self) -> np.ndarray | None: ...
    @property
    def dtype(self) -> np.dtype: ...
    @property
    def lengths(self) -> np.ndarray | None: ...
    @property
    def nbytes(self) -> int: ...
    @property
    def shape(self) -> tuple[int, int, int, int]: ...
    @property
    def used(self) -> bool: ...

class Prepared:
    """Weights packed once for inference (prepared_bindings.cc)."""

    @property
    def dtype(self) -> np.dtype: ...
    @property
    def input_size(self) -> int: ...
    @property
    def nbytes(self) -> int: ...
    @property
    def units(self) -> int: ...
    def infer(
        self,
        x: np.ndarray,
        h0: np.ndarray | None = None,
        c0: np.ndarray | None = None,
        lengths: np.ndarray | None = None,
        return_sequences: bool = True,
        spare: np.ndarray | None = None,
    ) -> tuple[np.ndarray | None, np.ndarray, np.ndarray, np.ndarray]: ...

def prepare(kernel: np.ndarray, recurrent_kernel: np.ndarray, bias: np.ndarray | None = None) -> Prepared: ...
def infer_bidirectional(
    forward: Prepared,
    backward: Prepared,
    x: np.ndarray,
    h0: np.ndarray | None = None,
    c0: np.ndarray | None = None,
    lengths: np.ndarray | None = None,
    return_sequences: bool = True,
    spares: tuple[np.ndarray, ...] = (),
    activation: int = 0,
    recurrent_activation: int = 3,
    mask: np.ndarray | None = None,
) -> tuple[np.ndarray | None, np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]: ...
def forward(
    x: np.ndarray,
    kernel: np.ndarray,
    recurrent_kernel: np.ndarray,
    bias: np.ndarray | None,
    h0: np.ndarray | None,
    c0: np.ndarray | None,
    lengths: np.ndarray | None,
    training: bool,
    spare: np.ndarray | None = None,
    return_sequences: bool = True,
) -> tuple[np.ndarray | None, np.ndarray, np.ndarray, Any]: ...
def backward(
    cache: Cache,
    d_outputs: np.ndarray | None,
    d_h_n: np.ndarray | None,
    d_c_n: np.ndarray | None,
    need_dx: bool = True,
) -> tuple[np.ndarray | None, np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]: ...
def adam_dense(
    param: np.ndarray,
    grad: np.ndarray,
    m: np.ndarray,
    v: np.ndarray,
    lr_t: float,
    eps_t: float,
    beta1: float,
    beta2: float,
    grad_scale: float = 1.0,
    average: np.ndarray | None = None,
    average_keep: float = 0.0,
) -> None: ...
def adam_rows(
    param: np.ndarray,
    m: np.ndarray,
    v: np.ndarray,
    rows: np.ndarray,
    row_grads: np.ndarray,
    lr_t: float,
    eps_t: float,
    beta1: float,
    beta2: float,
    grad_scale: float = 1.0,
) -> None: ...
def embedding_row_grads(
    ids: np.ndarray, lengths: np.ndarray | None, d_x: np.ndarray
) -> tuple[np.ndarray, np.ndarray]: ...
def fma_peak_gflops(threads: int, seconds: float = 0.3) -> float: ...
def build_info() -> dict[str, Any]: ...
def cuda_device_count() -> int: ...
def get_num_threads() -> int: ...
def set_num_threads(n: int, /) -> None: ...

# Only in builds with FUSEDLSTM_CUDA=ON (cuda_bindings.cc).
class CudaCache:
    @property
    def used(self) -> bool: ...

def forward_cuda(
    x: np.ndarray,
    kernel: np.ndarray,
    recurrent_kernel: np.ndarray,
    bias: np.ndarray | None,
    h0: np.ndarray | None,
    c0: np.ndarray | None,
    lengths: np.ndarray | None,
    training: bool,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, CudaCache | None]: ...
def backward_cuda(
    cache: CudaCache,
    d_outputs: np.ndarray | None,
    d_h_n: np.ndarray | None,
    d_c_n: np.ndarray | None,
    need_dx: bool = True,
) -> tuple[np.ndarray | None, np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]: ...

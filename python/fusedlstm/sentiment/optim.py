"""Adam: the dense update for the LSTM and dense weights, and the lazy sparse update for the
embedding table (only the rows present in a batch are read or written, as in TensorFlow's
LazyAdam and torch.optim.SparseAdam; the step count used for bias correction is global). The
optimizer is the only code that changes parameters."""

from __future__ import annotations

import math

import numpy as np

from .. import _core

__all__ = ["Adam"]


class Adam:
    def __init__(
        self,
        params: dict[str, np.ndarray],
        lr: float = 1e-3,
        beta1: float = 0.9,
        beta2: float = 0.999,
        eps: float = 1e-8,
    ) -> None:
        if lr <= 0 or not 0 <= beta1 < 1 or not 0 <= beta2 < 1 or eps <= 0:
            raise ValueError(f"bad Adam hyper-parameters lr={lr} beta1={beta1} beta2={beta2} eps={eps}")
        for k, p in params.items():
            if (
                not isinstance(p, np.ndarray)
                or p.dtype not in (np.float32, np.float64)
                or not p.flags.c_contiguous
                or not p.flags.writeable
            ):
                raise ValueError(
                    f"Adam: parameter {k!r} must be a writeable C-contiguous float32 or "
                    f"float64 array (it is updated in place)"
                )
        self.params = params
        self.lr, self.beta1, self.beta2, self.eps = lr, beta1, beta2, eps
        self.m = {k: np.zeros_like(v) for k, v in params.items()}
        self.v = {k: np.zeros_like(v) for k, v in params.items()}
        self.t = 0

    def step(
        self,
        grads: dict[str, np.ndarray],
        sparse: dict[str, tuple[np.ndarray, np.ndarray]] | None = None,
        *,
        scale: float = 1.0,
        average: tuple[dict[str, np.ndarray], float] | None = None,
    ) -> None:
        """One update, in place, one compiled pass per array (fusedlstm/adam.h). grads: dense
        gradients by name; sparse: name -> (rows, row_grads) with distinct rows. Parameters
        without a gradient this step are left alone.

        scale: every gradient is read multiplied by it (clipping by global norm without
        touching the gradient arrays). average: (arrays by name, keep), moving averages of
        parameters with a dense gradient, updated in the same pass after the step:
        avg -= (1 - keep) (avg - param)."""
        avgs, keep = average if average is not None else ({}, 0.0)
        self._check(grads, sparse or {}, avgs, scale, keep)  # all of it, before anything is written
        self.t += 1
        b1, b2 = self.beta1, self.beta2
        # Bias corrections folded into the step size (the textbook form, as in both frameworks).
        lr_t = self.lr * math.sqrt(1 - b2**self.t) / (1 - b1**self.t)
        eps_t = self.eps * math.sqrt(1 - b2**self.t)
        try:
            for k, g in grads.items():
                p = self.params[k]
                _core.adam_dense(
                    p,
                    np.ascontiguousarray(g, dtype=p.dtype),
                    self.m[k],
                    self.v[k],
                    lr_t,
                    eps_t,
                    b1,
                    b2,
                    scale,
                    avgs.get(k),
                    keep,
                )
            for k, (rows, g) in (sparse or {}).items():
                p = self.params[k]
                _core.adam_rows(
                    p,
                    self.m[k],
                    self.v[k],
                    np.ascontiguousarray(rows, dtype=np.int64),
                    np.ascontiguousarray(g, dtype=p.dtype),
                    lr_t,
                    eps_t,
                    b1,
                    b2,
                    scale,
                )
        except (ValueError, TypeError) as exc:
            raise type(exc)(f"Adam.step: {k!r}: {exc}") from None

    def _check(self, grads, sparse, avgs, scale, keep) -> None:
        if not math.isfinite(scale):
            raise ValueError(f"Adam.step: scale must be finite, got {scale}")
        if avgs and not 0 <= keep < 1:
            raise ValueError(f"Adam.step: the average's keep must be in [0, 1), got {keep}")
        for k, g in grads.items():
            if k not in self.params:
                raise KeyError(f"Adam.step: no parameter named {k!r}")
            if np.shape(g) != self.params[k].shape:
                raise ValueError(f"Adam.step: {k!r}: grad: expected shape {self.params[k].shape}, got {np.shape(g)}")
        for k, a in avgs.items():
            if k not in grads:
                raise KeyError(f"Adam.step: average {k!r}: no dense gradient for it this step")
            p = self.params[k]
            if (
                type(a) is not np.ndarray
                or a.shape != p.shape
                or a.dtype != p.dtype
                or not a.flags.c_contiguous
                or not a.flags.writeable
            ):
                raise ValueError(
                    f"Adam.step: average {k!r} must be a writeable C-contiguous {p.dtype} array of shape {p.shape}"
                )
        for k, (rows, g) in sparse.items():
            if k not in self.params:
                raise KeyError(f"Adam.step: no parameter named {k!r}")
            p, rows = self.params[k], np.asarray(rows)
            if p.ndim != 2 or rows.ndim != 1 or rows.dtype.kind not in "iu":
                raise ValueError(
                    f"Adam.step: {k!r}: sparse updates need a 2-d table and 1-d "
                    f"integer rows, got table {p.shape} and rows {rows.shape} {rows.dtype}"
                )
            bad = np.flatnonzero((rows < 0) | (rows >= p.shape[0]))
            if bad.size:
                raise ValueError(f"Adam.step: {k!r}: rows[{bad[0]}] = {rows[bad[0]]} is outside [0, {p.shape[0]})")
            if np.shape(g) != (len(rows), p.shape[1]):
                raise ValueError(
                    f"Adam.step: {k!r}: row grads: expected shape {(len(rows), p.shape[1])}, got {np.shape(g)}"
                )

    def state(self) -> dict[str, np.ndarray]:
        out = {"t": np.asarray(self.t, np.int64)}
        for k in self.params:
            out[f"m/{k}"], out[f"v/{k}"] = self.m[k], self.v[k]
        return out

    def load_state(self, state: dict[str, np.ndarray]) -> None:
        self.t = int(state["t"])
        for k, p in self.params.items():
            for slot, store in (("m", self.m), ("v", self.v)):
                arr = state[f"{slot}/{k}"]
                if arr.shape != p.shape:
                    raise ValueError(f"optimizer state {slot}/{k}: shape {arr.shape} != {p.shape}")
                store[k] = arr.astype(p.dtype, copy=True)

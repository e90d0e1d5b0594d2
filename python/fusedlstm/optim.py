"""Adam: the dense update for the LSTM and dense weights, and the lazy sparse update for the
embedding table (only the rows present in a batch are read or written, as in TensorFlow's
LazyAdam and torch.optim.SparseAdam; the step count used for bias correction is global). The
optimizer is the only code that changes parameters."""
from __future__ import annotations

from typing import Dict

import numpy as np

__all__ = ["Adam"]


class Adam:
    def __init__(self, params: Dict[str, np.ndarray], lr: float = 1e-3, beta1: float = 0.9,
                 beta2: float = 0.999, eps: float = 1e-8):
        if lr <= 0 or not 0 <= beta1 < 1 or not 0 <= beta2 < 1 or eps <= 0:
            raise ValueError(f"bad Adam hyper-parameters lr={lr} beta1={beta1} beta2={beta2} eps={eps}")
        self.params = params
        self.lr, self.beta1, self.beta2, self.eps = lr, beta1, beta2, eps
        self.m = {k: np.zeros_like(v) for k, v in params.items()}
        self.v = {k: np.zeros_like(v) for k, v in params.items()}
        self.t = 0
        self._work: Dict[str, tuple] = {}

    def step(self, grads: Dict[str, np.ndarray], sparse: Dict[str, tuple] = None) -> None:
        """One update. grads: dense gradients by name; sparse: name -> (rows, row_grads) with
        unique rows. Parameters without a gradient this step are left alone."""
        self.t += 1
        b1, b2 = self.beta1, self.beta2
        # Bias corrections folded into the step size (the textbook form, as in both frameworks).
        lr_t = self.lr * np.sqrt(1 - b2 ** self.t) / (1 - b1 ** self.t)
        eps_t = self.eps * np.sqrt(1 - b2 ** self.t)
        for k, g in grads.items():
            p, m, v = self.params[k], self.m[k], self.v[k]
            s1, s2 = self._scratch(k)
            # In place, in the textbook order: m = b1 m + (1-b1) g; v = b2 v + (1-b2) g²;
            # p -= lr_t m / (sqrt(v) + eps_t)
            m *= b1
            np.multiply(g, 1 - b1, out=s1)
            m += s1
            v *= b2
            np.multiply(g, g, out=s1)
            s1 *= 1 - b2
            v += s1
            np.sqrt(v, out=s1)
            s1 += eps_t
            np.multiply(m, lr_t, out=s2)
            s2 /= s1
            p -= s2
        for k, (rows, g) in (sparse or {}).items():
            p, m, v = self.params[k], self.m[k], self.v[k]
            mr = b1 * m[rows] + (1 - b1) * g
            vr = b2 * v[rows] + (1 - b2) * (g * g)
            m[rows], v[rows] = mr, vr
            p[rows] -= (lr_t * mr / (np.sqrt(vr) + eps_t)).astype(p.dtype)

    def _scratch(self, k: str):
        """Two work arrays shaped like parameter k, kept between steps (no temporaries)."""
        if k not in self._work:
            self._work[k] = (np.empty_like(self.m[k]), np.empty_like(self.m[k]))
        return self._work[k]

    def state(self) -> Dict[str, np.ndarray]:
        out = {"t": np.asarray(self.t, np.int64)}
        for k in self.params:
            out[f"m/{k}"], out[f"v/{k}"] = self.m[k], self.v[k]
        return out

    def load_state(self, state: Dict[str, np.ndarray]) -> None:
        self.t = int(state["t"])
        for k, p in self.params.items():
            for slot, store in (("m", self.m), ("v", self.v)):
                arr = state[f"{slot}/{k}"]
                if arr.shape != p.shape:
                    raise ValueError(f"optimizer state {slot}/{k}: shape {arr.shape} != {p.shape}")
                store[k] = arr.astype(p.dtype, copy=True)

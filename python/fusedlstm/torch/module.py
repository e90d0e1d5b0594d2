"""``fusedlstm.torch.LSTM``: a drop-in for ``torch.nn.LSTM`` (same constructor, attributes, parameter
names, shapes, order and initialization, so state dicts load both ways) whose layers each run as one
fused kernel call: eagerly through ``eager.Layer`` (a ``torch.autograd.Function``), and as the custom
ops of ops.py (``fusedlstm::lstm``, ``fusedlstm::lstm_bidirectional``) wherever the model is traced."""

from __future__ import annotations

import math
import numbers
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import PackedSequence

from ..prepared import PreparedLSTM
from . import eager, ops

__all__ = ["LSTM"]

_DTYPES = (torch.float32, torch.float64)
# What CPU autocast casts to its lower precision (floating, not float64): cast back to float32 for the kernel.
_AUTOCAST_CAST = (torch.bfloat16, torch.float16, torch.float32)
_warned_autocast: set[torch.dtype] = set()


def _check_int(name: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} should be of type int, got: {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be {'greater than zero' if minimum == 1 else f'at least {minimum}'}")


class LSTM(nn.Module):
    """Drop-in for ``torch.nn.LSTM`` on the CPU, float32 and float64.

    ``forward(input, hx=None, lengths=None)`` takes what ``nn.LSTM`` takes (a padded tensor,
    batched or unbatched, or a ``PackedSequence``, sorted or not) and returns what it returns:
    ``(output, (h_n, c_n))``, output a ``PackedSequence`` with the input's ``sorted_indices`` for a
    packed input. ``lengths`` (an extension; padded input only) gives each batch row's valid length
    in 0..T (right padding): outputs past it are zero and h_n/c_n are taken at its last step, as a
    packed sequence would give. ``proj_size > 0`` is not supported.

    Under ``torch.autocast("cpu", dtype=torch.bfloat16)`` a float32 layer runs the kernel with
    bfloat16 products (``precision="bfloat16"``: float32 parameters, sums, gates, state and
    gradients), takes float32, bfloat16 or float16 input and ``hx``, and returns what
    ``torch.nn.LSTM`` returns there: bfloat16 output, h_n and c_n for a padded input, float32
    ones for a ``PackedSequence``. Autocast to float16 computes in float32 and returns float32
    (one warning). On a CPU without AVX512_BF16 the kernel computes in float32 (one warning); the
    dtypes returned are the same.
    """

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        num_layers: int = 1,
        bias: bool = True,
        batch_first: bool = False,
        dropout: float = 0.0,
        bidirectional: bool = False,
        proj_size: int = 0,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        _check_int("input_size", input_size, 1)
        _check_int("hidden_size", hidden_size, 1)
        _check_int("num_layers", num_layers, 1)
        _check_int("proj_size", proj_size, 0)
        if proj_size > 0:
            raise NotImplementedError(
                f"fusedlstm.torch.LSTM: proj_size={proj_size} is not supported (no projection); use torch.nn.LSTM"
            )
        for name, v in (("bias", bias), ("batch_first", batch_first), ("bidirectional", bidirectional)):
            if not isinstance(v, bool):
                raise TypeError(f"{name} should be of type bool, got: {type(v).__name__}")
        if not isinstance(dropout, numbers.Number) or isinstance(dropout, bool) or not 0 <= dropout <= 1:
            raise ValueError(
                "dropout should be a number in range [0, 1] representing the probability of an element being zeroed"
            )
        if dropout > 0 and num_layers == 1:
            warnings.warn(
                "dropout option adds dropout after all but last recurrent layer, so non-zero dropout expects "
                f"num_layers greater than 1, but got dropout={dropout} and num_layers={num_layers}",
                stacklevel=2,
            )
        if dtype is not None and dtype not in _DTYPES:
            raise TypeError(f"dtype: fusedlstm.torch.LSTM supports torch.float32 and torch.float64, got {dtype}")
        self.mode = "LSTM"
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.num_layers = num_layers
        self.bias = bias
        self.batch_first = batch_first
        self.dropout = float(dropout)
        self.bidirectional = bidirectional
        self.proj_size = proj_size
        factory = {"device": device, "dtype": dtype}
        D = 2 if bidirectional else 1
        self._flat_weights_names: list[str] = []
        self._all_weights: list[list[str]] = []
        for layer in range(num_layers):
            for d in range(D):
                In = input_size if layer == 0 else hidden_size * D
                suffix = f"_l{layer}" + ("_reverse" if d == 1 else "")
                params = [
                    ("weight_ih", (4 * hidden_size, In)),
                    ("weight_hh", (4 * hidden_size, hidden_size)),
                ]
                if bias:
                    params += [("bias_ih", (4 * hidden_size,)), ("bias_hh", (4 * hidden_size,))]
                names = []
                for base, shape in params:
                    name = base + suffix
                    self.register_parameter(name, nn.Parameter(torch.empty(shape, **factory)))
                    names.append(name)
                self._flat_weights_names.extend(names)
                self._all_weights.append(names)
        # Prepared (packed) inference weights per (layer, direction) and precision, for
        # eval-mode calls that need no gradient; see _prepared_for.
        self._prepared: dict[tuple[int, str], tuple] = {}
        # Zero-copy NumPy views of the parameters for the eager path (eager.Views).
        self._views = eager.Views()
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Uniform in ±1/sqrt(hidden_size), as nn.LSTM."""
        stdv = 1.0 / math.sqrt(self.hidden_size)
        for w in self.parameters():
            nn.init.uniform_(w, -stdv, stdv)

    @property
    def all_weights(self) -> list[list[nn.Parameter]]:
        return [[getattr(self, name) for name in names] for names in self._all_weights]

    def extra_repr(self) -> str:
        s = f"{self.input_size}, {self.hidden_size}"
        if self.num_layers != 1:
            s += f", num_layers={self.num_layers}"
        if self.bias is not True:
            s += f", bias={self.bias}"
        if self.batch_first is not False:
            s += f", batch_first={self.batch_first}"
        if self.dropout != 0:
            s += f", dropout={self.dropout}"
        if self.bidirectional is not False:
            s += f", bidirectional={self.bidirectional}"
        return s

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_prepared"] = {}  # packed copies of the weights: rebuilt on demand
        state["_views"] = eager.Views()
        return state

    def _weights(self, index: int) -> list[nn.Parameter]:
        return [getattr(self, name) for name in self._all_weights[index]]

    def _prepared_for(self, index: int, weights: list[torch.Tensor], precision: str) -> PreparedLSTM:
        """The packed inference weights of one (layer, direction) for a precision, packed again
        whenever a weight changed: in place (its version counter moves) or replaced (another
        storage). The entry holds detached aliases of the weights, so their storage cannot be
        freed and reused at the same address while it is cached."""
        entry = self._prepared.get((index, precision))
        if entry is not None:
            aliases, versions, prepared = entry
            if all(
                a.data_ptr() == w.data_ptr() and a.shape == w.shape and a.dtype == w.dtype and a._version == v
                for a, v, w in zip(aliases, versions, weights)
            ):
                return prepared
        k, r, b = _keras_weights(weights, self.bias)
        with torch.no_grad():
            b = None if b is None else b.numpy()
            prepared = PreparedLSTM(k.numpy(), r.numpy(), b, "tanh", "sigmoid", precision)
        aliases = [w.detach() for w in weights]
        self._prepared[(index, precision)] = (aliases, [a._version for a in aliases], prepared)
        return prepared

    def train(self, mode: bool = True):
        # A mode switch drops the prepared inference weights: between an eval phase and the next
        # one a training phase may have changed the parameters without moving their version
        # counters (fused optimizers, edits through .data).
        self._prepared.clear()
        return super().train(mode)

    def forward(self, input, hx=None, lengths=None):
        precision, amp_out, amp = self._autocast()
        fast = eager.active()  # plain eager tensors: the kernel through eager.Layer, not the custom ops
        packed = isinstance(input, PackedSequence)
        if packed:
            if lengths is not None:
                raise ValueError("lengths: a PackedSequence carries its own lengths; pass lengths only with a tensor")
            if fast and input.data.device.type == "cpu" and eager.plain((input.data,)):
                x, lens, order = eager.unpack(input)  # rows in the original order, lens int32 NumPy
            else:
                fast = False
                x, lens, order = _unpack(input)
            batched = True
        else:
            if not isinstance(input, torch.Tensor):
                raise TypeError(f"input: expected a Tensor or a PackedSequence, got {type(input).__name__}")
            if input.dim() not in (2, 3):
                raise ValueError(f"LSTM: Expected input to be 2D or 3D, got {input.dim()}D instead")
            batched = input.dim() == 3
            if not batched:
                x = input.unsqueeze(0)
            else:
                x = input if self.batch_first else input.transpose(0, 1)
            lens = None
        if amp and x.dtype in _AUTOCAST_CAST:
            x = x.float()
        self._check_input(x)
        B = x.shape[0]
        if lengths is not None:
            lens = _as_lengths(lengths, B, batched)
        h0, c0 = self._initial_state(hx, x, batched, amp)
        if fast:
            try:  # (what getattr finds, without nn.Module.__getattr__ per name)
                params = [self._parameters[name] for name in self._flat_weights_names]
            except KeyError:  # a parametrization (a property of the class) or another replacement
                params = [getattr(self, name) for name in self._flat_weights_names]
            fast = eager.plain((x, h0, c0)) and eager.plain(params)
        if fast:
            if lens is not None and not isinstance(lens, np.ndarray):
                lens = lens.numpy().astype(np.int32, copy=False)
            out, h_n, c_n = self._forward_eager(x.contiguous(), h0, c0, lens, params, ops.kernel_precision(precision))
        else:
            out, h_n, c_n = self._forward_ops(x, h0, c0, lens, precision)
        if packed:
            data = out.reshape(-1, out.shape[2]).index_select(0, order)
            return (
                PackedSequence(data, input.batch_sizes, input.sorted_indices, input.unsorted_indices),
                (h_n, c_n),
            )
        if amp_out is not None:
            out, h_n, c_n = out.to(amp_out), h_n.to(amp_out), c_n.to(amp_out)
        if not batched:
            return out.squeeze(0), (h_n.squeeze(1), c_n.squeeze(1))
        if not self.batch_first:
            out = out.transpose(0, 1).contiguous()
        return out, (h_n, c_n)

    def _forward_eager(self, x, h0, c0, lens, params, precision: str):
        """Every layer as one eager.Layer (or, in eval under no_grad, on prepared weights):
        (outputs [B, T, D·H], h_n, c_n [L·D, B, H]). ``precision`` as the kernel runs it."""
        D = 2 if self.bidirectional else 1
        per = len(params) // (self.num_layers * D)
        views = self._views.get(params)
        grad = torch.is_grad_enabled()
        prepared = not grad and not self.training
        if grad and self._prepared:
            self._prepared.clear()  # a training step may follow; see train()
        hs, cs = [], []
        layer_in = x
        for layer in range(self.num_layers):
            rows = slice(layer * D, (layer + 1) * D)
            h, c = (None, None) if h0 is None else (h0[rows].contiguous(), c0[rows].contiguous())
            if prepared:
                out, h, c = self._infer_layer(layer, layer_in, h, c, lens, precision)
            else:
                rows = slice(layer * D * per, (layer + 1) * D * per)
                spec = (D, self.bias, lens, precision, views[rows])
                out, h, c = eager.run_layer(spec, layer_in, h, c, params[rows])
            hs.append(h)
            cs.append(c)
            if self.dropout > 0 and self.training and layer < self.num_layers - 1:
                out = F.dropout(out, self.dropout, training=True)
            layer_in = out
        if self.num_layers == 1:
            return layer_in, hs[0], cs[0]
        return layer_in, torch.cat(hs), torch.cat(cs)

    def _infer_layer(self, layer: int, x, h0, c0, lens, precision: str):
        """One layer on prepared weights, each direction one call: (outputs, h_n, c_n [D, B, H])."""
        D = 2 if self.bidirectional else 1
        xa = x.detach().numpy()  # (an input may require grad even under no_grad)
        results = []
        for d in range(D):
            i = layer * D + d
            prepared = self._prepared_for(i, self._weights(i), precision)
            state = (None, None) if h0 is None else (h0[d].detach().numpy(), c0[d].detach().numpy())
            results.append(prepared.infer(xa, *state, lens, reverse=d == 1))
        if D == 1:
            out, h, c = results[0]
            return torch.from_numpy(out), torch.from_numpy(h[None]), torch.from_numpy(c[None])
        out = np.concatenate([r[0] for r in results], axis=2)
        h = np.stack([r[1] for r in results])
        c = np.stack([r[2] for r in results])
        return torch.from_numpy(out), torch.from_numpy(h), torch.from_numpy(c)

    def _forward_ops(self, x, h0, c0, lens, precision: str):
        """Every layer through the custom ops (what torch.compile, torch.export and tracing see):
        (outputs [B, T, D·H], h_n, c_n [L·D, B, H])."""
        lens32 = None if lens is None else lens.to(torch.int32)
        D = 2 if self.bidirectional else 1
        layer_in = x.contiguous()
        h_n, c_n = [], []
        for layer in range(self.num_layers):
            if D == 2 and self._fused(layer_in, h0):
                state = (None, None) if h0 is None else (h0[2 * layer : 2 * layer + 2], c0[2 * layer : 2 * layer + 2])
                layer_in, h, c = self._both_directions(layer, layer_in, state, lens32, precision)
                h_n += [h[0], h[1]]
                c_n += [c[0], c[1]]
                if self.dropout > 0 and self.training and layer < self.num_layers - 1:
                    layer_in = F.dropout(layer_in, self.dropout, training=True)
                continue
            outs = []
            for d in range(D):
                i = layer * D + d
                state = (None, None) if h0 is None else (h0[i], c0[i])
                out, h, c = self._direction(i, layer_in, state, lens32, d == 1, precision)
                outs.append(out)
                h_n.append(h)
                c_n.append(c)
            layer_in = outs[0] if D == 1 else torch.cat(outs, dim=2)
            if self.dropout > 0 and self.training and layer < self.num_layers - 1:
                layer_in = F.dropout(layer_in, self.dropout, training=True)
        return layer_in, torch.stack(h_n), torch.stack(c_n)

    def _autocast(self) -> tuple[str, torch.dtype | None, bool]:
        """Under CPU autocast, for float32 parameters: (the kernel's precision, the dtype a padded
        input's results are returned in, True: cast low-precision inputs to float32). Outside it,
        or for float64 parameters (which autocast leaves alone): ("float32", None, False)."""
        if not torch.is_autocast_enabled("cpu") or self.weight_ih_l0.dtype != torch.float32:
            return "float32", None, False
        dtype = torch.get_autocast_dtype("cpu")
        if dtype == torch.bfloat16:
            return "bfloat16", torch.bfloat16, True
        if dtype not in _warned_autocast and not torch.compiler.is_compiling():  # Dynamo cannot trace a warning
            _warned_autocast.add(dtype)
            warnings.warn(
                f"fusedlstm.torch.LSTM: the kernel has no {dtype} compute; under autocast to {dtype} it computes "
                "in float32 and returns float32 (autocast to torch.bfloat16 runs bfloat16 products)",
                stacklevel=5,  # the caller of the module (through nn.Module's __call__)
            )
        return "float32", None, True

    def _fused(self, x: torch.Tensor, h0) -> bool:
        """Whether a bidirectional layer runs as one two-direction call: always, but for the
        prepared inference path (eval under no_grad, eager), which packs each direction once."""
        return torch.is_grad_enabled() or self.training or torch.compiler.is_compiling()

    def _both_directions(self, layer: int, x: torch.Tensor, state, lens32, precision: str):
        """Both directions of a bidirectional layer in one kernel call (ops.lstm_bidirectional)."""
        kf, rf, bf = _keras_weights(self._weights(2 * layer), self.bias)
        kr, rr, br = _keras_weights(self._weights(2 * layer + 1), self.bias)
        h0, c0 = state
        if h0 is not None:
            h0, c0 = h0.contiguous(), c0.contiguous()
        tensors = (x, kf, rf, bf, kr, rr, br, h0, c0)
        keep = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
        out, h, c, _ = ops.lstm_bidirectional(x, kf, rf, bf, kr, rr, br, h0, c0, lens32, keep, precision)
        return out, h, c

    def _direction(self, index: int, x: torch.Tensor, state, lens32, reverse: bool, precision: str):
        weights = self._weights(index)
        h0, c0 = state
        grad = torch.is_grad_enabled()
        if not grad and not self.training and not torch.compiler.is_compiling():
            prepared = self._prepared_for(index, weights, ops.kernel_precision(precision))
            return ops.infer(prepared, x, h0, c0, lens32, reverse)
        kernel, recurrent_kernel, bias = _keras_weights(weights, self.bias)
        if h0 is not None:
            h0, c0 = h0.contiguous(), c0.contiguous()
        # Keep the kernel's cache only when a backward can follow (the op cannot see grad mode).
        keep = grad and any(t is not None and t.requires_grad for t in (x, kernel, recurrent_kernel, bias, h0, c0))
        out, h, c, _ = ops.lstm(x, kernel, recurrent_kernel, bias, h0, c0, lens32, reverse, True, keep, precision)
        return out, h, c

    def _check_input(self, x: torch.Tensor) -> None:
        if x.device.type != "cpu":
            from ..lstm import cuda_available

            hint = "" if cuda_available() else " (and this fusedlstm has no usable CUDA build)"
            raise RuntimeError(
                f"fusedlstm.torch.LSTM runs on the CPU; input is on {x.device}{hint}: move the model and inputs "
                "to the CPU, or use torch.nn.LSTM on the GPU"
            )
        if x.dtype not in _DTYPES:
            raise TypeError(f"input: fusedlstm.torch.LSTM supports torch.float32 and torch.float64, got {x.dtype}")
        w = self.weight_ih_l0
        if w.device.type != "cpu":
            raise RuntimeError(f"fusedlstm.torch.LSTM runs on the CPU; its parameters are on {w.device}")
        if w.dtype not in _DTYPES:
            raise TypeError(f"fusedlstm.torch.LSTM supports float32 and float64 parameters, got {w.dtype}")
        if x.dtype != w.dtype:
            raise ValueError(f"input must have the type {w.dtype}, got type {x.dtype}")
        if x.shape[-1] != self.input_size:
            raise RuntimeError(
                f"input.size(-1) must be equal to input_size. Expected {self.input_size}, got {x.shape[-1]}"
            )

    def _initial_state(self, hx, x: torch.Tensor, batched: bool, amp: bool = False):
        if hx is None:
            return None, None
        if not isinstance(hx, (tuple, list)) or len(hx) != 2 or not all(isinstance(t, torch.Tensor) for t in hx):
            raise TypeError("hx: expected a tuple (h_0, c_0) of two tensors")
        h0, c0 = hx
        if amp:  # autocast: float32, bfloat16 and float16 states all go to the kernel as float32
            h0, c0 = (t.float() if t.dtype in _AUTOCAST_CAST else t for t in (h0, c0))
        want = 2 if not batched else 3
        if h0.dim() != want or c0.dim() != want:
            kind = "unbatched 2-D" if not batched else "batched 3-D"
            raise RuntimeError(
                f"For {kind} input, hx and cx should also be {want}-D but got ({h0.dim()}-D, {c0.dim()}-D) tensors"
            )
        if not batched:
            h0, c0 = h0.unsqueeze(1), c0.unsqueeze(1)
        D = 2 if self.bidirectional else 1
        expected = (self.num_layers * D, x.shape[0], self.hidden_size)
        for i, t in enumerate((h0, c0)):
            if tuple(t.shape) != expected:
                shape = expected if batched else (expected[0], expected[2])
                got = list(t.shape) if batched else [t.shape[0], t.shape[2]]
                raise RuntimeError(f"Expected hidden[{i}] size {shape}, got {got}")
            if t.dtype != x.dtype:
                raise ValueError(f"hx[{i}]: dtype {t.dtype} does not match the input's {x.dtype}")
            if t.device.type != "cpu":
                raise RuntimeError(f"hx[{i}] is on {t.device}; fusedlstm.torch.LSTM runs on the CPU")
        return h0, c0


def _unpack(packed: PackedSequence):
    """A PackedSequence as a padded [B, T, E] batch in the original row order, its lengths, and
    `order`: for each packed row, its row in the padded [B·T, ·] layout (out.view(B·T, F)[order]
    packs a result back). One gather each way (index_select, whose gradient is one index_add):
    torch's pad_packed_sequence/pack_padded_sequence run a copy per step, forward and backward."""
    data, sizes = packed.data, packed.batch_sizes.to("cpu", torch.int64)
    T, B = len(sizes), int(sizes[0]) if len(sizes) else 0
    lens_sorted = (sizes[None, :] > torch.arange(B)[:, None]).sum(dim=1)
    sorted_to_orig = packed.sorted_indices if packed.sorted_indices is not None else torch.arange(B)
    sorted_to_orig = sorted_to_orig.to("cpu", torch.int64)
    # Packed row i is step t of sorted row b (time-major: each step's rows in sorted order).
    t_of = torch.repeat_interleave(torch.arange(T), sizes)
    starts = torch.cumsum(sizes, 0) - sizes
    b_sorted = torch.arange(len(t_of)) - starts[t_of]
    order = sorted_to_orig[b_sorted] * T + t_of  # padded position of each packed row
    where = torch.full((B * T,), len(t_of), dtype=torch.int64)  # padding reads an appended zero row
    where[order] = torch.arange(len(t_of))
    ext = torch.cat([data, data.new_zeros((1,) + tuple(data.shape[1:]))])
    x = ext.index_select(0, where.to(data.device)).view(B, T, *data.shape[1:])
    lens = torch.empty(B, dtype=torch.int64)
    lens[sorted_to_orig] = lens_sorted
    return x, lens, order.to(data.device)


def _keras_weights(weights, has_bias: bool):
    """nn.LSTM's (weight_ih [4H, E], weight_hh [4H, H], bias_ih, bias_hh) as the kernel's
    (kernel [E, 4H], recurrent_kernel [H, 4H], bias [4H]): same gate order, transposed, the two
    biases summed (differentiably: each bias gets the bias gradient)."""
    kernel = weights[0].t().contiguous()
    recurrent_kernel = weights[1].t().contiguous()
    bias = weights[2] + weights[3] if has_bias else None
    return kernel, recurrent_kernel, bias


def _as_lengths(lengths, B: int, batched: bool) -> torch.Tensor:
    if not batched:
        raise ValueError("lengths: only for batched (3-D) input")
    if not isinstance(lengths, torch.Tensor):
        lengths = torch.as_tensor(np.asarray(lengths))
    if lengths.dtype.is_floating_point or lengths.dtype.is_complex or lengths.dtype == torch.bool:
        raise TypeError(f"lengths: expected an integer tensor, got dtype {lengths.dtype}")
    if tuple(lengths.shape) != (B,):
        raise ValueError(f"lengths: expected shape ({B},) (one per batch row), got {tuple(lengths.shape)}")
    return lengths.cpu()

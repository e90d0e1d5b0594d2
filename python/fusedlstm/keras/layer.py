"""fusedlstm.keras.LSTM: a drop-in for keras.layers.LSTM running the fused kernel, through the
compiled FusedLstm op on Keras's TensorFlow backend and through a torch.autograd.Function
(torch_op.py) on its torch backend; the layer's own logic is keras.ops, shared by both. Same
weights (kernel, recurrent_kernel, bias; gate order i, f, c, o), same outputs and states, same
masking semantics: a mask whose True entries form one contiguous run per row (right- or
left-padded) is run on the fused path by moving each row's run to the front, running with
per-row lengths, and putting the outputs back the way Keras does (state carried through masked
steps, the previous output repeated there). go_backwards is the kernel's reverse pass over each
row's run (x is not flipped); stateful=True keeps [h, c] variables between calls as Keras does."""

from __future__ import annotations

import keras

__all__ = ["LSTM"]

_BACKENDS = ("tensorflow", "torch")


def _is(value, name: str) -> bool:
    if isinstance(value, str):
        return value == name
    return value is getattr(keras.activations, name, None) or getattr(value, "__name__", None) == name


_MASK_HOLES = (
    "fusedlstm.keras.LSTM: the mask must be one contiguous run of True per row "
    "(right- or left-padded); a mask with holes is not supported"
)


def _check_one_run(run, mask) -> None:
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        tf.debugging.assert_equal(run, mask, message=_MASK_HOLES)  # also inside a tf.function
    elif not bool(keras.ops.all(run == mask)):
        raise ValueError(_MASK_HOLES)


def _take_steps(x, idx):
    """x[b, idx[b, t], :] for x [B, T, F] and integer idx [B, T]: whole feature rows per step
    (keras.ops.take_along_axis gathers element by element, which made TensorFlow's masked
    training step about 1.5x slower)."""
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        return tf.gather(x, idx, batch_dims=1)
    import torch

    return x[torch.arange(x.shape[0], device=x.device)[:, None], idx.long()]


def _run_fused(x, kernel, recurrent_kernel, bias, h0, c0, lengths, keep_cache, return_sequences, reverse):
    """outputs, h_n, c_n of the fused kernel, on the backend's own op: the compiled TensorFlow
    op (tensorflow) or an autograd Function over fusedlstm's NumPy API (torch, which decides
    from grad mode whether to keep a cache, so keep_cache applies to TensorFlow only)."""
    if keras.backend.backend() == "tensorflow":
        from .ops import fused_lstm

        return fused_lstm(
            x,
            kernel,
            recurrent_kernel,
            bias,
            h0,
            c0,
            lengths,
            training=keep_cache,
            return_sequences=return_sequences,
            reverse=reverse,
        )[:3]
    from .torch_op import fused_lstm

    return fused_lstm(
        x, kernel, recurrent_kernel, bias, h0, c0, lengths, return_sequences=return_sequences, reverse=reverse
    )


class _Untracked:
    """A holder Keras's attribute tracking does not look into: what it holds is not one of the
    layer's weights (get_weights/set_weights stay keras.layers.LSTM's three)."""

    __slots__ = ("value",)

    def __init__(self, value=None):
        self.value = value


@keras.saving.register_keras_serializable(package="fusedlstm")
class LSTM(keras.layers.Layer):
    """Long short-term memory layer on the fused kernel (arguments as keras.layers.LSTM).

    stateful=True: as Keras's (a batch size fixed at build, each call's final states the next
    call's initial states, reset_state()/reset_states() zero them), plus reset_state([h, c]) sets
    given values, and the states are saved with the model (Keras 3's come back as zeros).
    unroll=True is accepted and changes nothing (a speed hint in Keras).

    Not supported (a clear ValueError at construction): activations other than tanh/sigmoid,
    recurrent_dropout, use_cudnn=True; a Keras backend other than TensorFlow
    or torch (RuntimeError). A mask with holes raises InvalidArgumentError (TensorFlow) or
    ValueError (torch) at call.
    XLA cannot compile a custom op, so the layer opts out of jit_compile (``supports_jit``).
    """

    def __init__(
        self,
        units,
        activation="tanh",
        recurrent_activation="sigmoid",
        use_bias=True,
        kernel_initializer="glorot_uniform",
        recurrent_initializer="orthogonal",
        bias_initializer="zeros",
        unit_forget_bias=True,
        kernel_regularizer=None,
        recurrent_regularizer=None,
        bias_regularizer=None,
        activity_regularizer=None,
        kernel_constraint=None,
        recurrent_constraint=None,
        bias_constraint=None,
        dropout=0.0,
        recurrent_dropout=0.0,
        seed=None,
        return_sequences=False,
        return_state=False,
        go_backwards=False,
        stateful=False,
        unroll=False,
        zero_output_for_mask=False,
        use_cudnn="auto",
        **kwargs,
    ):
        if keras.backend.backend() not in _BACKENDS:
            # Elsewhere a result would sit outside the backend's autodiff: a model would run and
            # its LSTM weights would silently never train.
            raise RuntimeError(
                "fusedlstm.keras.LSTM runs on Keras's TensorFlow backend (a compiled TensorFlow "
                "op) or its torch backend (CPU tensors); this process uses the "
                f"{keras.backend.backend()!r} backend. Set KERAS_BACKEND to tensorflow or torch "
                "before importing keras, or use keras.layers.LSTM here."
            )
        kwargs.pop("implementation", None)  # Keras's cell computation strategy (1 or 2): same results
        super().__init__(activity_regularizer=activity_regularizer, **kwargs)
        if not isinstance(units, int) or isinstance(units, bool) or units < 1:
            raise ValueError(f"units must be a positive integer, got {units!r}")
        if not _is(activation, "tanh"):
            raise ValueError(f"activation={activation!r}: the fused kernel implements tanh only")
        if not _is(recurrent_activation, "sigmoid"):
            raise ValueError(f"recurrent_activation={recurrent_activation!r}: the fused kernel implements sigmoid only")
        if recurrent_dropout:
            raise ValueError(
                f"recurrent_dropout={recurrent_dropout}: not supported by the fused "
                "kernel (use dropout, or keras.layers.LSTM)"
            )
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        if use_cudnn is True:  # "auto" (Keras's default) and False mean: whatever runs here
            raise ValueError(
                "use_cudnn=True: fusedlstm.keras.LSTM always runs the fused kernel, "
                "never cuDNN (use use_cudnn='auto' or False)"
            )
        if use_cudnn not in ("auto", False):
            raise ValueError(f"use_cudnn must be 'auto', True or False, got {use_cudnn!r}")
        self.units = units
        self.use_bias = use_bias
        self.unit_forget_bias = unit_forget_bias
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        self.recurrent_initializer = keras.initializers.get(recurrent_initializer)
        self.bias_initializer = keras.initializers.get(bias_initializer)
        self.kernel_regularizer = keras.regularizers.get(kernel_regularizer)
        self.recurrent_regularizer = keras.regularizers.get(recurrent_regularizer)
        self.bias_regularizer = keras.regularizers.get(bias_regularizer)
        self.kernel_constraint = keras.constraints.get(kernel_constraint)
        self.recurrent_constraint = keras.constraints.get(recurrent_constraint)
        self.bias_constraint = keras.constraints.get(bias_constraint)
        self.dropout = float(dropout)
        self.seed = seed
        self.seed_generator = keras.random.SeedGenerator(seed) if self.dropout else None
        self.return_sequences = return_sequences
        self.return_state = return_state
        self.go_backwards = go_backwards
        # A speed hint in Keras (a Python loop unrolled into the graph), no effect on results;
        # the fused kernel runs the whole sequence either way. Kept for the config.
        self.unroll = bool(unroll)
        self.zero_output_for_mask = bool(zero_output_for_mask)
        # As Keras's RNN layers: the final states of one call are the initial states of the
        # next (variables of the batch size the layer was built with, not among its weights).
        self.stateful = bool(stateful)
        self._expected_batch_size = None
        self.supports_masking = True
        self.supports_jit = False  # a compiled custom op: XLA cannot compile it
        self.state_size = [units, units]
        self._state_vars = _Untracked()  # stateful=True: [h, c] variables once built

    @property
    def states(self):
        """The state variables [h, c] of a stateful layer (None otherwise), as Keras's RNN
        layers have them (read by keras.layers.Bidirectional)."""
        return self._state_vars.value

    def reset_state(self, states=None) -> None:
        """Zero the states of a stateful layer, or set them to `states` ([h, c], each
        [batch, units]). A layer that is not stateful (or not built yet) has none: nothing to zero."""
        if states is None:
            for v in self.states or ():
                v.assign(keras.ops.zeros_like(v.value))
            return
        if self.states is None:
            raise ValueError(
                "reset_state(states=...): the layer has no states to set "
                + ("(build or call it first)" if self.stateful else "(it is not stateful)")
            )
        states = list(states) if isinstance(states, (list, tuple)) else [states]
        if len(states) != 2:
            raise ValueError(f"states must be [h, c] (2 arrays), got {len(states)}")
        values = []
        for name, v, value in zip(("h", "c"), self.states, states):
            value = keras.ops.convert_to_tensor(value, dtype=v.dtype)
            if tuple(value.shape) != tuple(v.shape):
                raise ValueError(f"states ({name}): expected shape {tuple(v.shape)}, got {tuple(value.shape)}")
            values.append(value)
        for v, value in zip(self.states, values):
            v.assign(value)

    def reset_states(self, states=None) -> None:
        """Alias of reset_state (Keras keeps both names)."""
        self.reset_state(states)

    def build(self, input_shape):
        E = input_shape[-1]
        if E is None:
            raise ValueError(f"the last input dimension must be known, got shape {input_shape}")
        u = self.units
        self.kernel = self.add_weight(
            shape=(E, 4 * u),
            name="kernel",
            initializer=self.kernel_initializer,
            regularizer=self.kernel_regularizer,
            constraint=self.kernel_constraint,
        )
        self.recurrent_kernel = self.add_weight(
            shape=(u, 4 * u),
            name="recurrent_kernel",
            initializer=self.recurrent_initializer,
            regularizer=self.recurrent_regularizer,
            constraint=self.recurrent_constraint,
        )
        if self.use_bias:
            if self.unit_forget_bias:
                base = self.bias_initializer

                def bias_init(shape, dtype=None):
                    ones = keras.initializers.get("ones")((u,), dtype=dtype)
                    return keras.ops.concatenate([base((u,), dtype=dtype), ones, base((2 * u,), dtype=dtype)])
            else:
                bias_init = self.bias_initializer
            self.bias = self.add_weight(
                shape=(4 * u,),
                name="bias",
                initializer=bias_init,
                regularizer=self.bias_regularizer,
                constraint=self.bias_constraint,
            )
        else:
            self.bias = None
        if self.stateful:
            if self.states is not None:
                self.reset_state()  # built again: Keras zeros the states
            else:
                batch = input_shape[0]
                if batch is None:
                    raise ValueError(
                        "When using `stateful=True` in a RNN, the batch size must be static "
                        "(keras.Input(batch_shape=...) or the first call's input). Found dynamic "
                        f"batch size: sequence.shape={input_shape}"
                    )
                with keras.name_scope(self.name, caller=self):
                    self._state_vars.value = [
                        keras.Variable(
                            keras.ops.zeros((batch, u), dtype=self.variable_dtype),
                            trainable=False,
                            dtype=self.variable_dtype,
                            name="rnn_state",
                        )
                        for _ in range(2)
                    ]
                self._expected_batch_size = batch
        self.built = True

    # A stateful layer's states are saved with its weights (keras.layers.LSTM's are not: they
    # come back as zeros), so a model saved mid-stream continues where it stopped. The keys are
    # extra entries beside the weights' "0", "1", ...; a file without them loads zero states.
    _STATE_KEYS = ("rnn_state_h", "rnn_state_c")

    def save_own_variables(self, store):
        super().save_own_variables(store)
        for key, v in zip(self._STATE_KEYS, self.states or ()):
            store[key] = v

    def load_own_variables(self, store):
        keys = list(store.keys())
        super().load_own_variables({k: store[k] for k in keys if k not in self._STATE_KEYS})
        saved = [k for k in self._STATE_KEYS if k in keys]
        if saved and self.states is None:
            raise ValueError(
                f"layer {self.name!r}: the file holds the states of a stateful layer, "
                "but this layer is not stateful (or not built)"
            )
        if saved:
            self.reset_state([store[k] for k in self._STATE_KEYS])

    def call(self, sequences, initial_state=None, mask=None, training=None):
        # keras.ops throughout, so one body serves both backends; only the fused op itself and
        # the mask check differ (_run_fused, _check_one_run).
        ops = keras.ops
        x = ops.convert_to_tensor(sequences, dtype=self.compute_dtype)
        # The kernel computes in float32 or float64. Under a mixed-precision policy
        # (mixed_float16, mixed_bfloat16) it runs in float32 and the results are cast to the
        # compute dtype, as Keras's layer returns them (a CPU has no faster half-precision path).
        out_dtype = keras.backend.standardize_dtype(x.dtype)
        dtype = out_dtype if out_dtype in ("float32", "float64") else "float32"
        x = ops.cast(x, dtype)
        if len(x.shape) != 3:
            raise ValueError(f"inputs must be 3-d [batch, time, features], got shape {x.shape}")
        B, T, E = ops.shape(x)
        u = self.units
        if training and self.dropout > 0:  # one input mask per sequence, as Keras's LSTM
            keep = keras.random.dropout(ops.ones((B, 1, E), dtype), self.dropout, seed=self.seed_generator)
            x = x * keep
        if self.stateful:
            if (
                self._expected_batch_size is not None
                and x.shape[0] is not None
                and x.shape[0] != self._expected_batch_size
            ):
                raise ValueError(
                    "If an RNN is stateful, the batch size of the input sequences must be the same as "
                    f"the batch size of the initial state. \n- Expected batch size: {self._expected_batch_size}"
                    f"\n- Received batch size: {x.shape[0]}"
                )
            if initial_state is None:
                initial_state = self.states
        if initial_state is not None:
            h0, c0 = [ops.cast(ops.convert_to_tensor(s), dtype) for s in initial_state]
        else:
            h0 = c0 = ops.zeros((B, u), dtype)
        bias = ops.cast(self.bias, dtype) if self.bias is not None else ops.zeros((4 * u,), dtype)
        steps = ops.expand_dims(ops.arange(T, dtype="int32"), 0)
        if mask is None:
            lengths = ops.full((B,), T, dtype="int32")
            starts = ops.zeros((B,), "int32")
        else:
            m = ops.cast(mask, "bool")
            lengths = ops.sum(ops.cast(m, "int32"), axis=1)
            starts = ops.cast(ops.argmax(ops.cast(m, "int32"), axis=1), "int32")
            run = (steps >= ops.expand_dims(starts, 1)) & (steps < ops.expand_dims(starts + lengths, 1))
            _check_one_run(run, m)
            # Move each row's run to the front.
            src = ops.minimum(steps + ops.expand_dims(starts, 1), T - 1)
            x = _take_steps(x, src)
        # Only an explicit training=False (predict, evaluate) keeps no cache for a backward
        # pass; a gradient taken anyway recomputes the forward (see ops.py). A plain call
        # (training=None: a custom loop's `layer(x)` under a GradientTape) keeps it, or every
        # such training step would run the forward twice.
        # go_backwards is the kernel's reverse pass: it reads each row's run last to first and
        # writes each output at the position of the input it read, so x is never flipped.
        outputs, h_n, c_n = _run_fused(
            x,
            ops.cast(self.kernel, dtype),
            ops.cast(self.recurrent_kernel, dtype),
            bias,
            h0,
            c0,
            lengths,
            keep_cache=training is not False,
            return_sequences=self.return_sequences,
            reverse=self.go_backwards,
        )
        # Keras's outputs are in processing order: with go_backwards, step p of its output read
        # input T-1-p, and the run of valid steps starts at `first` in that order.
        first = T - starts - lengths if self.go_backwards else starts
        has_steps = lengths > 0
        if self.zero_output_for_mask and mask is not None:
            # Keras's last output is the output of the last step processed: zeros if that step
            # was masked.
            has_steps = has_steps & (first + lengths == T)
        last = ops.where(ops.expand_dims(has_steps, 1), h_n, ops.zeros_like(h_n))  # Keras: zeros if nothing valid
        if self.return_sequences:
            if mask is not None:
                # Keras semantics: zeros before the run, the run, then its last output repeated
                # (zero_output_for_mask: zeros there too). The kernel's outputs are the run's,
                # from position 0, in input order.
                end = ops.expand_dims(ops.maximum(lengths - 1, 0), 1)
                idx = ops.clip(steps - ops.expand_dims(first, 1), 0, end)
                if self.go_backwards:
                    idx = end - idx
                outputs = _take_steps(outputs, idx)
                keep = (steps >= ops.expand_dims(first, 1)) & ops.expand_dims(lengths > 0, 1)
                if self.zero_output_for_mask:
                    keep = keep & (steps < ops.expand_dims(first + lengths, 1))
                outputs = ops.where(ops.expand_dims(keep, -1), outputs, ops.zeros_like(outputs))
            elif self.go_backwards:
                outputs = ops.flip(outputs, axis=1)
            result = outputs
        else:
            result = last
        if out_dtype != dtype:
            result, h_n, c_n = (ops.cast(t, out_dtype) for t in (result, h_n, c_n))
        if self.stateful:  # the states as returned (in the compute dtype), as Keras keeps them
            for v, s in zip(self.states, (h_n, c_n)):
                v.assign(ops.cast(s, v.dtype))
        if self.return_state:
            return [result, h_n, c_n]
        return result

    def compute_mask(self, inputs, mask=None):
        if isinstance(mask, (list, tuple)):
            mask = mask[0]
        out = mask if self.return_sequences else None
        if self.return_state:
            return [out, None, None]
        return out

    def compute_output_shape(self, sequences_shape, initial_state_shape=None):
        B, T = sequences_shape[0], sequences_shape[1]
        out = (B, T, self.units) if self.return_sequences else (B, self.units)
        if self.return_state:
            return [out, (B, self.units), (B, self.units)]
        return out

    def get_config(self):
        ser = keras.saving.serialize_keras_object
        config = {
            "units": self.units,
            "activation": "tanh",
            "recurrent_activation": "sigmoid",
            "use_bias": self.use_bias,
            "unit_forget_bias": self.unit_forget_bias,
            "kernel_initializer": ser(self.kernel_initializer),
            "recurrent_initializer": ser(self.recurrent_initializer),
            "bias_initializer": ser(self.bias_initializer),
            "kernel_regularizer": ser(self.kernel_regularizer),
            "recurrent_regularizer": ser(self.recurrent_regularizer),
            "bias_regularizer": ser(self.bias_regularizer),
            "kernel_constraint": ser(self.kernel_constraint),
            "recurrent_constraint": ser(self.recurrent_constraint),
            "bias_constraint": ser(self.bias_constraint),
            "dropout": self.dropout,
            "seed": self.seed,
            "return_sequences": self.return_sequences,
            "return_state": self.return_state,
            "go_backwards": self.go_backwards,
            "stateful": self.stateful,
            "unroll": self.unroll,
            "zero_output_for_mask": self.zero_output_for_mask,
            "activity_regularizer": ser(self.activity_regularizer),
            # Always its default here (anything else is refused), kept so the config has every
            # key keras.layers.LSTM's has and each layer can be built from the other's.
            "recurrent_dropout": 0.0,
        }
        return {**super().get_config(), **config}

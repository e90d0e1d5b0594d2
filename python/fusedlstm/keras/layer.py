"""fusedlstm.keras.LSTM: a drop-in for keras.layers.LSTM running the fused kernel, through the
compiled FusedLstm op on Keras's TensorFlow backend and through a torch.autograd.Function
(torch_op.py) on its torch backend; the layer's own logic is keras.ops, shared by both. Same
weights (kernel, recurrent_kernel, bias; gate order i, f, c, o), same outputs and states, same
masking semantics: the mask goes to the kernel as it is (a right-padded one runs as lengths, any
other, holes included, as a step mask: state carried through masked steps), and the outputs are
put the way Keras has them (the previous output repeated at a masked step, or zeros with
zero_output_for_mask). go_backwards is the kernel's reverse pass (x is not flipped); stateful=True
keeps [h, c] variables between calls as Keras does; dropout and recurrent_dropout draw Keras's
masks from the layer's seed generator in training and the kernel applies them. Under a
bfloat16 compute dtype (mixed_bfloat16) the kernel runs with bfloat16 products on the float32
variables, where the CPU has AVX512_BF16 (float32 products elsewhere, with a warning)."""

from __future__ import annotations

import warnings

import keras

from .. import _core, bf16_engine

__all__ = ["LSTM"]

_BACKENDS = ("tensorflow", "torch")

# The activations the kernel computes, by Keras's names (fusedlstm.lstm_forward).
_ACTIVATIONS = ("tanh", "relu", "linear", "sigmoid", "hard_sigmoid")


def _activation_name(arg: str, value) -> str:
    """Keras's name of a supported activation given as Keras accepts it (a name, None for
    linear, the function itself, its serialized form); anything else is refused by name."""
    refused = ValueError(
        f"{arg}={value!r}: the fused kernel implements {', '.join(_ACTIVATIONS)} (Keras's "
        "functions by those names, or None for linear); use keras.layers.LSTM for another"
    )
    if isinstance(value, str) and value not in _ACTIVATIONS:
        raise refused
    try:
        fn = keras.activations.get(value)
    except (ValueError, TypeError):
        raise refused from None
    for name in _ACTIVATIONS:
        if fn is keras.activations.get(name):
            return name
    raise refused


_bf16_fallback_warned = False


def _kernel_precision(compute_dtype: str) -> str:
    """The kernel's product precision for a layer computing in `compute_dtype`: "bfloat16" for
    a bfloat16 compute dtype (mixed_bfloat16) where the CPU can, else "float32". Where it
    cannot (no AVX512_BF16), a model written for mixed_bfloat16 still runs, with float32
    products, and says so once per process."""
    global _bf16_fallback_warned
    if compute_dtype != "bfloat16":
        return "float32"
    if bf16_engine() is not None:
        return "bfloat16"
    if not _bf16_fallback_warned:
        _bf16_fallback_warned = True
        # "" when the CPU has it but the engine was switched off (fusedlstm._core.set_bf16_engine).
        missing = _core.bf16_missing() or "AVX512_BF16 (the bfloat16 engine is switched off)"
        warnings.warn(
            f"fusedlstm.keras.LSTM: bfloat16 products need {missing}; the layer runs the fused kernel "
            "with float32 products instead (its outputs still come back in bfloat16)",
            RuntimeWarning,
            stacklevel=2,
        )
    return "float32"


def _take_steps(x, idx):
    """x[b, idx[b, t], :] for x [B, T, F] and integer idx [B, T]: whole feature rows per step
    (keras.ops.take_along_axis gathers element by element, which made TensorFlow's masked
    training step about 1.5x slower)."""
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        return tf.gather(x, idx, batch_dims=1)
    import torch

    return x[torch.arange(x.shape[0], device=x.device)[:, None], idx.long()]


def _last_valid(mask):
    """For a bool mask [B, T]: the position of the last True at or before each step, or 0 where
    there is none."""
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        # The count of valid steps so far reached its value at that step: the first position
        # with the same count (batched binary search over each nondecreasing row).
        counts = tf.cumsum(tf.cast(mask, tf.int32), axis=1)
        return tf.searchsorted(counts, counts, side="left", out_type=tf.int32)
    import torch

    steps = torch.arange(mask.shape[1], device=mask.device)
    return torch.cummax(torch.where(mask, steps, 0), dim=1).values


def _run_fused(x, kernel, recurrent_kernel, bias, h0, c0, mask, recurrent_masks, keep_cache, options):
    """outputs, h_n, c_n of the fused kernel, on the backend's own op: the compiled TensorFlow
    op (tensorflow) or an autograd Function over fusedlstm's NumPy API (torch, which decides
    from grad mode whether to keep a cache, so keep_cache applies to TensorFlow only). mask:
    [B, T] bool or None; options: return_sequences, reverse, activation, recurrent_activation,
    precision."""
    if keras.backend.backend() == "tensorflow":
        from .ops import fused_lstm

        return fused_lstm(
            x,
            kernel,
            recurrent_kernel,
            bias,
            h0,
            c0,
            step_mask=mask,  # the op runs a right-padded one as lengths
            recurrent_masks=recurrent_masks,
            training=keep_cache,
            **options,
        )[:3]
    from .torch_op import fused_lstm

    return fused_lstm(x, kernel, recurrent_kernel, bias, h0, c0, mask=mask, recurrent_masks=recurrent_masks, **options)


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

    activation and recurrent_activation: "tanh", "relu", "linear" (or None), "sigmoid",
    "hard_sigmoid" (Keras's functions by those names too). Masks may have holes (any steps
    valid). dropout and recurrent_dropout are Keras's: in training, masks drawn from the layer's
    seed generator in Keras's order and shapes (so the same seed gives the same masks), fixed
    over the steps; recurrent_dropout (or implementation=1) makes the input dropout one mask per
    gate, as Keras's LSTMCell, which runs the input projection on a [B, T, 4E] input.

    Mixed precision: the variables are float32 and the kernel reads them as they are (not
    autocast to the compute dtype), so it gets float32 weights and gives them float32 gradients.
    Under a bfloat16 compute dtype ("mixed_bfloat16") the kernel runs with bfloat16 products
    (``fusedlstm.lstm_forward(..., precision="bfloat16")``; float32 products, with a one-time
    RuntimeWarning, on a CPU without AVX512_BF16); under "mixed_float16" with float32 products.
    Outputs and states come back in the compute dtype, as Keras's LSTM returns them.

    Not supported (a clear ValueError at construction): other activations, use_cudnn=True;
    a Keras backend other than TensorFlow or torch (RuntimeError).
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
        # Keras's cell computation strategy: the same results, except that implementation 1 (which
        # recurrent_dropout implies) draws one input dropout mask per gate.
        implementation = kwargs.pop("implementation", 2)
        super().__init__(activity_regularizer=activity_regularizer, **kwargs)
        if not isinstance(units, int) or isinstance(units, bool) or units < 1:
            raise ValueError(f"units must be a positive integer, got {units!r}")
        act = _activation_name("activation", activation)
        rec_act = _activation_name("recurrent_activation", recurrent_activation)
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        if not 0.0 <= recurrent_dropout < 1.0:
            raise ValueError(f"recurrent_dropout must be in [0, 1), got {recurrent_dropout}")
        if use_cudnn is True:  # "auto" (Keras's default) and False mean: whatever runs here
            raise ValueError(
                "use_cudnn=True: fusedlstm.keras.LSTM always runs the fused kernel, "
                "never cuDNN (use use_cudnn='auto' or False)"
            )
        if use_cudnn not in ("auto", False):
            raise ValueError(f"use_cudnn must be 'auto', True or False, got {use_cudnn!r}")
        self.units = units
        self.activation = keras.activations.get(act)
        self.recurrent_activation = keras.activations.get(rec_act)
        self._kernel_activations = {"activation": act, "recurrent_activation": rec_act}
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
        self.recurrent_dropout = float(recurrent_dropout)
        self.implementation = 1 if self.recurrent_dropout else implementation  # as Keras's LSTMCell
        self.seed = seed
        drops = self.dropout or self.recurrent_dropout
        self.seed_generator = keras.random.SeedGenerator(seed) if drops else None
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
            autocast=False,  # the kernel takes float32 weights under a mixed policy (see call)
            regularizer=self.kernel_regularizer,
            constraint=self.kernel_constraint,
        )
        self.recurrent_kernel = self.add_weight(
            shape=(u, 4 * u),
            name="recurrent_kernel",
            initializer=self.recurrent_initializer,
            autocast=False,
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
                autocast=False,
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

    def _dropout_masks(self, B, E, training):
        """Keras's dropout masks for one call, drawn as its LSTM draws them (the same order,
        shapes and dtype from the same seed generator): the input mask(s) [B, E] (one, or one per
        gate under implementation 1), then the recurrent masks [B, H], one per gate. Keras draws
        them at every call and uses them in training only; outside training the generator is
        only advanced as far, so a seed gives Keras's masks over any sequence of calls."""
        n_x = (4 if self.implementation == 1 else 1) if self.dropout else 0
        n_h = 4 if self.recurrent_dropout else 0
        if not training:
            for _ in range(n_x + n_h):
                self.seed_generator.next()
            return [], []
        ones_x = keras.ops.ones((B, E), self.compute_dtype)
        ones_h = keras.ops.ones((B, self.units), self.compute_dtype)
        inputs = [keras.random.dropout(ones_x, self.dropout, seed=self.seed_generator) for _ in range(n_x)]
        recurrent = [keras.random.dropout(ones_h, self.recurrent_dropout, seed=self.seed_generator) for _ in range(n_h)]
        return inputs, recurrent

    def call(self, sequences, initial_state=None, mask=None, training=None):
        # keras.ops throughout, so one body serves both backends; only the fused op itself and
        # two gathers differ (_run_fused, _take_steps, _last_valid).
        ops = keras.ops
        x = ops.convert_to_tensor(sequences, dtype=self.compute_dtype)
        # The kernel takes float32 or float64 arrays. Under a mixed-precision policy
        # (mixed_float16, mixed_bfloat16) it gets float32 inputs and the float32 variables (not
        # autocast: add_weight(autocast=False), so nothing rounds them and their gradients stay
        # float32), and the results are cast to the compute dtype, as Keras's layer returns them.
        # A bfloat16 compute dtype runs the kernel's bfloat16 products (it rounds the operands
        # itself); float16 has no fast path on a CPU: float32 products.
        out_dtype = keras.backend.standardize_dtype(x.dtype)
        dtype = out_dtype if out_dtype in ("float32", "float64") else "float32"
        precision = _kernel_precision(out_dtype)
        x = ops.cast(x, dtype)
        if len(x.shape) != 3:
            raise ValueError(f"inputs must be 3-d [batch, time, features], got shape {x.shape}")
        B, T, E = ops.shape(x)
        u = self.units
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
        kernel = ops.cast(self.kernel, dtype)
        bias = ops.cast(self.bias, dtype) if self.bias is not None else ops.zeros((4 * u,), dtype)
        recurrent_masks = None
        if self.seed_generator is not None:
            # Keras's masks (in training), fixed over the steps of this call.
            keep_x, keep_h = self._dropout_masks(B, E, training)
            if len(keep_x) == 1:
                x = x * ops.expand_dims(ops.cast(keep_x[0], dtype), 1)
            elif keep_x:
                # One input mask per gate: gate g projects x ⊙ mask_g. The kernel projects
                # [x ⊙ mask_i, x ⊙ mask_f, x ⊙ mask_c, x ⊙ mask_o] ([B, T, 4E]) with the
                # block-diagonal kernel [4E, 4H] whose block g is the kernel's gate-g columns
                # (autodiff takes the gradients back to x and the kernel).
                keep = ops.expand_dims(ops.cast(ops.stack(keep_x), dtype), 2)  # [4, B, 1, E]
                x = ops.reshape(ops.transpose(ops.expand_dims(x, 0) * keep, (1, 2, 0, 3)), (-1, T, 4 * E))
                eye = ops.reshape(ops.eye(4, dtype=dtype), (4, 1, 4, 1))
                kernel = ops.reshape(eye * ops.reshape(kernel, (1, E, 4, u)), (4 * E, 4 * u))
            if keep_h:
                recurrent_masks = ops.cast(ops.stack(keep_h), dtype)  # [4, B, H], gates i, f, c, o
        m = None if mask is None else ops.cast(mask, "bool")
        # Only an explicit training=False (predict, evaluate) keeps no cache for a backward
        # pass; a gradient taken anyway recomputes the forward (see ops.py). A plain call
        # (training=None: a custom loop's `layer(x)` under a GradientTape) keeps it, or every
        # such training step would run the forward twice.
        # go_backwards is the kernel's reverse pass: it reads the steps last to first and writes
        # each output at the position of the input it read, so x is never flipped.
        outputs, h_n, c_n = _run_fused(
            x,
            kernel,
            ops.cast(self.recurrent_kernel, dtype),
            bias,
            h0,
            c0,
            m,
            recurrent_masks,
            keep_cache=training is not False,
            options={
                "return_sequences": self.return_sequences,
                "reverse": self.go_backwards,
                "precision": precision,
                **self._kernel_activations,
            },
        )
        # Keras's outputs are in processing order (with go_backwards, step p read input T-1-p);
        # the kernel's are at their inputs' positions, zero at masked steps.
        if m is None:
            last = h_n
        else:
            # Keras's last output: the last valid step's (h_n), zeros if no step is valid; with
            # zero_output_for_mask, zeros where the last step processed is masked.
            if self.zero_output_for_mask:
                has_out = m[:, 0] if self.go_backwards else m[:, -1]
            else:
                has_out = ops.any(m, axis=1)
            last = ops.where(ops.expand_dims(has_out, 1), h_n, ops.zeros_like(h_n))
        if not self.return_sequences:
            result = last
        elif m is not None and not self.zero_output_for_mask:
            # Keras repeats the previous output at a masked step (zeros before the first valid
            # one, where the kernel's output at that step is zero too): one gather, which also
            # puts a reverse pass's outputs in processing order.
            if self.go_backwards:
                result = _take_steps(outputs, (T - 1) - _last_valid(ops.flip(m, axis=1)))
            else:
                result = _take_steps(outputs, _last_valid(m))
        else:
            result = ops.flip(outputs, axis=1) if self.go_backwards else outputs
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
            "activation": keras.activations.serialize(self.activation),
            "recurrent_activation": keras.activations.serialize(self.recurrent_activation),
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
            "recurrent_dropout": self.recurrent_dropout,
        }
        return {**super().get_config(), **config}

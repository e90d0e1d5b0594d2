"""fusedlstm.keras.LSTM: a drop-in for keras.layers.LSTM (TensorFlow backend) running the fused
kernel through the compiled FusedLstm op. Same weights (kernel, recurrent_kernel, bias; gate
order i, f, c, o), same outputs and states, same masking semantics: a mask whose True entries
form one contiguous run per row (right- or left-padded) is run on the fused path by moving each
row's run to the front, running with per-row lengths, and putting the outputs back the way
Keras does (state carried through masked steps, the previous output repeated there)."""
from __future__ import annotations

import keras
import tensorflow as tf

from .ops import fused_lstm

__all__ = ["LSTM"]


def _is(value, name: str) -> bool:
    if isinstance(value, str):
        return value == name
    return value is getattr(keras.activations, name, None) or getattr(value, "__name__", None) == name


@keras.saving.register_keras_serializable(package="fusedlstm")
class LSTM(keras.layers.Layer):
    """Long short-term memory layer on the fused kernel (arguments as keras.layers.LSTM).

    Not supported (a clear ValueError at construction): activations other than tanh/sigmoid,
    recurrent_dropout, stateful, unroll, use_cudnn=True; a Keras backend other than TensorFlow (RuntimeError). A mask with holes raises InvalidArgumentError at call.
    XLA cannot compile a custom op, so the layer opts out of jit_compile (``supports_jit``).
    """

    def __init__(self, units, activation="tanh", recurrent_activation="sigmoid", use_bias=True,
                 kernel_initializer="glorot_uniform", recurrent_initializer="orthogonal",
                 bias_initializer="zeros", unit_forget_bias=True, kernel_regularizer=None,
                 recurrent_regularizer=None, bias_regularizer=None, activity_regularizer=None,
                 kernel_constraint=None, recurrent_constraint=None, bias_constraint=None,
                 dropout=0.0, recurrent_dropout=0.0, seed=None, return_sequences=False,
                 return_state=False, go_backwards=False, stateful=False, unroll=False,
                 zero_output_for_mask=False, use_cudnn="auto", **kwargs):
        if keras.backend.backend() != "tensorflow":
            # On another backend the op's output would be a tf.Tensor outside the backend's
            # autodiff: the model would run, and its LSTM weights would silently never train.
            raise RuntimeError(
                "fusedlstm.keras.LSTM runs a compiled TensorFlow op and needs Keras's TensorFlow "
                f"backend; this process uses the {keras.backend.backend()!r} backend. Set "
                "KERAS_BACKEND=tensorflow before importing keras, or use keras.layers.LSTM here.")
        super().__init__(activity_regularizer=activity_regularizer, **kwargs)
        if not isinstance(units, int) or isinstance(units, bool) or units < 1:
            raise ValueError(f"units must be a positive integer, got {units!r}")
        if not _is(activation, "tanh"):
            raise ValueError(f"activation={activation!r}: the fused kernel implements tanh only")
        if not _is(recurrent_activation, "sigmoid"):
            raise ValueError(f"recurrent_activation={recurrent_activation!r}: the fused kernel "
                             "implements sigmoid only")
        if recurrent_dropout:
            raise ValueError(f"recurrent_dropout={recurrent_dropout}: not supported by the fused "
                             "kernel (use dropout, or keras.layers.LSTM)")
        if stateful:
            raise ValueError("stateful=True is not supported by fusedlstm.keras.LSTM")
        if unroll:
            raise ValueError("unroll=True is not supported (the fused kernel runs the whole sequence)")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        if use_cudnn is True:  # "auto" (Keras's default) and False mean: whatever runs here
            raise ValueError("use_cudnn=True: fusedlstm.keras.LSTM always runs the fused kernel, "
                             "never cuDNN (use use_cudnn='auto' or False)")
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
        self.zero_output_for_mask = bool(zero_output_for_mask)
        self.stateful = False  # read by keras.layers.Bidirectional
        self.supports_masking = True
        self.supports_jit = False  # a compiled custom op: XLA cannot compile it
        self.state_size = [units, units]

    def build(self, input_shape):
        E = input_shape[-1]
        if E is None:
            raise ValueError(f"the last input dimension must be known, got shape {input_shape}")
        u = self.units
        self.kernel = self.add_weight(shape=(E, 4 * u), name="kernel",
                                      initializer=self.kernel_initializer,
                                      regularizer=self.kernel_regularizer,
                                      constraint=self.kernel_constraint)
        self.recurrent_kernel = self.add_weight(shape=(u, 4 * u), name="recurrent_kernel",
                                                initializer=self.recurrent_initializer,
                                                regularizer=self.recurrent_regularizer,
                                                constraint=self.recurrent_constraint)
        if self.use_bias:
            if self.unit_forget_bias:
                base = self.bias_initializer

                def bias_init(shape, dtype=None):
                    return keras.ops.concatenate([base((u,), dtype=dtype), keras.initializers.get("ones")((u,), dtype=dtype),
                                                  base((2 * u,), dtype=dtype)])
            else:
                bias_init = self.bias_initializer
            self.bias = self.add_weight(shape=(4 * u,), name="bias", initializer=bias_init,
                                        regularizer=self.bias_regularizer,
                                        constraint=self.bias_constraint)
        else:
            self.bias = None
        self.built = True

    def call(self, sequences, initial_state=None, mask=None, training=None):
        x = tf.convert_to_tensor(sequences, dtype=self.compute_dtype)
        # The kernel computes in float32 or float64. Under a mixed-precision policy
        # (mixed_float16, mixed_bfloat16) it runs in float32 and the results are cast to the
        # compute dtype, as Keras's layer returns them (a CPU has no faster half-precision path).
        out_dtype = x.dtype
        if x.dtype not in (tf.float32, tf.float64):
            x = tf.cast(x, tf.float32)
        if x.shape.rank != 3:
            raise ValueError(f"inputs must be 3-d [batch, time, features], got shape {x.shape}")
        B, T = tf.shape(x)[0], tf.shape(x)[1]
        u = self.units
        if self.go_backwards:
            x = tf.reverse(x, [1])
            if mask is not None:
                mask = tf.reverse(mask, [1])
        if training and self.dropout > 0:  # one input mask per sequence, as Keras's LSTM
            keep = keras.random.dropout(tf.ones([B, 1, tf.shape(x)[2]], x.dtype), self.dropout,
                                        seed=self.seed_generator)
            x = x * keep
        if initial_state is not None:
            h0, c0 = [tf.cast(tf.convert_to_tensor(s), x.dtype) for s in initial_state]
        else:
            h0 = c0 = tf.zeros([B, u], x.dtype)
        bias = self.bias if self.bias is not None else tf.zeros([4 * u], x.dtype)
        steps = tf.range(T)[None, :]
        if mask is None:
            lengths = tf.fill([B], T)
            starts = tf.zeros([B], tf.int32)
        else:
            m = tf.cast(mask, tf.bool)
            lengths = tf.reduce_sum(tf.cast(m, tf.int32), axis=1)
            starts = tf.cast(tf.argmax(tf.cast(m, tf.int32), axis=1, output_type=tf.int32), tf.int32)
            run = (steps >= starts[:, None]) & (steps < (starts + lengths)[:, None])
            tf.debugging.assert_equal(
                run, m, message="fusedlstm.keras.LSTM: the mask must be one contiguous run of "
                                "True per row (right- or left-padded); a mask with holes is not supported")
            # Move each row's run to the front.
            x = tf.gather(x, tf.minimum(steps + starts[:, None], T - 1), batch_dims=1)
        # Only an explicit training=False (predict, evaluate) keeps no cache for a backward
        # pass; a gradient taken anyway recomputes the forward (see ops.py). A plain call
        # (training=None: a custom loop's `layer(x)` under a GradientTape) keeps it, or every
        # such training step would run the forward twice.
        keep_cache = training is not False
        outputs, h_n, c_n, _ = fused_lstm(x, tf.cast(self.kernel, x.dtype),
                                          tf.cast(self.recurrent_kernel, x.dtype),
                                          tf.cast(bias, x.dtype), h0, c0, lengths,
                                          training=keep_cache,
                                          return_sequences=self.return_sequences)
        has_steps = (lengths > 0)[:, None]
        last = tf.where(has_steps, h_n, tf.zeros_like(h_n))  # Keras: zeros if nothing was valid
        if self.return_sequences:
            if mask is not None:
                # Keras semantics: zeros before the run, the run, then its last output repeated
                # (zero_output_for_mask: zeros there too).
                idx = tf.clip_by_value(steps - starts[:, None], 0, tf.maximum(lengths - 1, 0)[:, None])
                outputs = tf.gather(outputs, idx, batch_dims=1)
                keep = (steps >= starts[:, None]) & has_steps
                if self.zero_output_for_mask:
                    keep = keep & (steps < (starts + lengths)[:, None])
                outputs = tf.where(keep[:, :, None], outputs, tf.zeros_like(outputs))
            result = outputs
        else:
            result = last
        if out_dtype != x.dtype:
            result, h_n, c_n = (tf.cast(t, out_dtype) for t in (result, h_n, c_n))
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
            "units": self.units, "activation": "tanh", "recurrent_activation": "sigmoid",
            "use_bias": self.use_bias, "unit_forget_bias": self.unit_forget_bias,
            "kernel_initializer": ser(self.kernel_initializer),
            "recurrent_initializer": ser(self.recurrent_initializer),
            "bias_initializer": ser(self.bias_initializer),
            "kernel_regularizer": ser(self.kernel_regularizer),
            "recurrent_regularizer": ser(self.recurrent_regularizer),
            "bias_regularizer": ser(self.bias_regularizer),
            "kernel_constraint": ser(self.kernel_constraint),
            "recurrent_constraint": ser(self.recurrent_constraint),
            "bias_constraint": ser(self.bias_constraint),
            "dropout": self.dropout, "seed": self.seed,
            "return_sequences": self.return_sequences, "return_state": self.return_state,
            "go_backwards": self.go_backwards, "zero_output_for_mask": self.zero_output_for_mask,
            "activity_regularizer": ser(self.activity_regularizer),
            # Always their defaults here (anything else is refused), kept so the config has
            # every key keras.layers.LSTM's has and each layer can be built from the other's.
            "recurrent_dropout": 0.0, "stateful": False, "unroll": False,
        }
        return {**super().get_config(), **config}

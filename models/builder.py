"""Build a ``.tflite`` that trains on the device (authoring time; needs the ``build`` extra).

The model honours the contract in DESIGN.md: signatures ``train``, ``infer``,
``evaluate``, ``get_weights`` and ``set_weights`` over resource variables, from
builtin ops only. ``train(x, y, lr, mu)`` takes one SGD step; ``mu > 0`` adds the
FedProx proximal term ``mu/2 * ||w - anchor||^2``, where the anchor is whatever
``set_weights`` last set (the global model a round starts from).

Gradients are written out by hand, mirroring :mod:`fedge.models.maths` op for op,
because TensorFlow's autodiff emits ops such as ReluGrad that exist only in the Flex
delegate, which device runtimes do not have.
The spec is embedded in the file's metadata (``fedge_spec``) so the numpy reference
runtime can rebuild the same model from the file alone.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from .metadata import add_metadata
from .spec import ModelSpec

SPEC_METADATA_KEY = "fedge_spec"


class BuildError(RuntimeError):
    """TensorFlow is missing or the converter refused the model."""


def _import_tf():  # type: ignore[no-untyped-def]
    try:
        import tensorflow as tf
    except ImportError as exc:
        raise BuildError("building models needs TensorFlow: pip install 'fedge[build]'") from exc
    return tf


def _module(spec: ModelSpec, tf):  # type: ignore[no-untyped-def]
    init = spec.initial_weights()
    names = spec.weight_names()
    acts = spec.activations
    n_out = spec.outputs

    def activate(kind, z):  # type: ignore[no-untyped-def]
        if kind == "relu":
            return tf.nn.relu(z)
        if kind == "tanh":
            return tf.tanh(z)
        if kind == "sigmoid":
            return tf.sigmoid(z)
        return z

    def activation_grad(kind, a):  # type: ignore[no-untyped-def]
        if kind == "relu":
            return tf.cast(a > 0.0, tf.float32)
        if kind == "tanh":
            return 1.0 - a * a
        if kind == "sigmoid":
            return a * (1.0 - a)
        return tf.ones_like(a)

    x_sig = tf.TensorSpec([None, spec.input_size], tf.float32, name="x")
    regression = spec.loss == "mse"
    if regression:
        y_sig = tf.TensorSpec([None, n_out], tf.float32, name="y")
    else:
        y_sig = tf.TensorSpec([None], tf.int32, name="y")

    def loss_and_dz(out, y, n):  # type: ignore[no-untyped-def]
        """The loss and its gradient with respect to the last layer's output."""
        if regression:
            diff = out - y
            return tf.reduce_mean(diff * diff), 2.0 * diff / (n * float(n_out))
        logp = tf.nn.log_softmax(out)
        onehot = tf.one_hot(y, n_out, dtype=tf.float32)
        loss = -tf.reduce_mean(tf.reduce_sum(onehot * logp, axis=1))
        return loss, (tf.exp(logp) - onehot) / n

    lr_sig = tf.TensorSpec([], tf.float32, name="lr")
    mu_sig = tf.TensorSpec([], tf.float32, name="mu")
    w_sigs = [tf.TensorSpec(init[n].shape, tf.float32, name=n) for n in names]

    class Model(tf.Module):
        def __init__(self) -> None:
            super().__init__(name=spec.name)
            self.vars = {n: tf.Variable(init[n], name=n) for n in names}
            # The FedProx anchor: the weights last given to set_weights (the global model).
            self.anchor = {n: tf.Variable(init[n], name=f"anchor_{n}") for n in names}

        def _forward(self, x):  # type: ignore[no-untyped-def]
            out = [x]
            for i, kind in enumerate(acts):
                z = tf.matmul(out[-1], self.vars[f"dense{i}_kernel"]) + self.vars[f"dense{i}_bias"]
                out.append(activate(kind, z))
            return out

        @tf.function(input_signature=[x_sig, y_sig, lr_sig, mu_sig])
        def train(self, x, y, lr, mu):  # type: ignore[no-untyped-def]
            out = self._forward(x)
            n = tf.cast(tf.shape(x)[0], tf.float32)
            loss, dz = loss_and_dz(out[-1], y, n)
            grads = {}
            for i in reversed(range(len(acts))):
                grads[f"dense{i}_kernel"] = tf.matmul(out[i], dz, transpose_a=True)
                grads[f"dense{i}_bias"] = tf.reduce_sum(dz, axis=0)
                if i > 0:
                    back = tf.matmul(dz, self.vars[f"dense{i}_kernel"], transpose_b=True)
                    dz = back * activation_grad(acts[i - 1], out[i])
            for name in names:
                prox = mu * (self.vars[name] - self.anchor[name])
                self.vars[name].assign_sub(lr * (grads[name] + prox))
            return {"loss": loss}

        @tf.function(input_signature=[x_sig])
        def infer(self, x):  # type: ignore[no-untyped-def]
            logits = self._forward(x)[-1]
            if regression:
                return {"logits": logits}
            return {"logits": logits, "probabilities": tf.nn.softmax(logits)}

        @tf.function(input_signature=[x_sig, y_sig])
        def evaluate(self, x, y):  # type: ignore[no-untyped-def]
            logits = self._forward(x)[-1]
            if regression:
                diff = logits - y
                return {
                    "loss": tf.reduce_mean(diff * diff),
                    "metric": tf.reduce_mean(tf.abs(diff)),
                }
            logp = tf.nn.log_softmax(logits)
            onehot = tf.one_hot(y, n_out, dtype=tf.float32)
            loss = -tf.reduce_mean(tf.reduce_sum(onehot * logp, axis=1))
            hits = tf.cast(tf.equal(tf.argmax(logits, axis=1, output_type=tf.int32), y), tf.float32)
            return {"loss": loss, "metric": tf.reduce_mean(hits)}

        @tf.function(input_signature=[])
        def get_weights(self):  # type: ignore[no-untyped-def]
            return {n: tf.identity(self.vars[n]) for n in names}

        @tf.function(input_signature=w_sigs)
        def set_weights(self, *tensors):  # type: ignore[no-untyped-def]
            for name, value in zip(names, tensors, strict=True):
                self.vars[name].assign(value)
                self.anchor[name].assign(value)
            return {"count": tf.constant(len(names), tf.int32)}

    return Model()


SIGNATURES = ("train", "infer", "evaluate", "get_weights", "set_weights")


def build_tflite(spec: ModelSpec) -> bytes:
    """Convert ``spec`` to a ``.tflite`` flatbuffer (bytes) with the contract's signatures."""
    tf = _import_tf()
    module = _module(spec, tf)
    with tempfile.TemporaryDirectory() as tmp:
        tf.saved_model.save(
            module,
            tmp,
            signatures={name: getattr(module, name).get_concrete_function() for name in SIGNATURES},
        )
        converter = tf.lite.TFLiteConverter.from_saved_model(tmp, signature_keys=list(SIGNATURES))
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
        converter.experimental_enable_resource_variables = True
        try:
            flat = converter.convert()
        except Exception as exc:  # the converter raises its own ConverterError and friends
            raise BuildError(f"{spec.name}: conversion failed: {exc}") from exc
    return add_metadata(flat, SPEC_METADATA_KEY, spec.model_dump_json().encode())


def build_file(spec: ModelSpec, out: str | Path) -> Path:
    """Build and write atomically (write, fsync, rename)."""
    import os

    out = Path(out)
    data = build_tflite(spec)
    tmp = out.with_suffix(out.suffix + ".tmp")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, out)
    return out

"""The model maths in numpy: forward pass, loss, hand-written gradients, one SGD step.

This is the reference the ``.tflite`` builder mirrors op for op, and the oracle the
tests hold LiteRT to (agreement to about 1e-5). Everything is float32.
"""

from __future__ import annotations

import numpy as np

from .spec import ModelSpec

Weights = dict[str, np.ndarray]


def activate(kind: str, z: np.ndarray) -> np.ndarray:
    if kind == "relu":
        return np.maximum(z, np.float32(0.0))
    if kind == "tanh":
        return np.tanh(z)
    if kind == "sigmoid":
        return (np.float32(1.0) / (np.float32(1.0) + np.exp(-z))).astype(np.float32)
    return z


def activation_grad(kind: str, a: np.ndarray) -> np.ndarray:
    """d activation / d z, written in terms of the activation's output ``a``."""
    if kind == "relu":
        return (a > 0).astype(np.float32)
    if kind == "tanh":
        return np.float32(1.0) - a * a
    if kind == "sigmoid":
        return a * (np.float32(1.0) - a)
    return np.ones_like(a)


def forward(spec: ModelSpec, w: Weights, x: np.ndarray) -> list[np.ndarray]:
    """Activations of every layer, input first, logits last."""
    acts = [x.astype(np.float32, copy=False)]
    for i, kind in enumerate(spec.activations):
        z = acts[-1] @ w[f"dense{i}_kernel"] + w[f"dense{i}_bias"]
        acts.append(activate(kind, z))
    return acts


def log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))


def loss_and_grads(
    spec: ModelSpec, w: Weights, x: np.ndarray, y: np.ndarray
) -> tuple[float, Weights]:
    acts = forward(spec, w, x)
    n = np.float32(x.shape[0])
    if spec.loss == "mse":
        diff = acts[-1] - y.astype(np.float32).reshape(acts[-1].shape)
        loss = np.mean(diff * diff)
        dz = np.float32(2.0) * diff / (n * np.float32(spec.outputs))
    else:
        logp = log_softmax(acts[-1])
        onehot = np.eye(spec.outputs, dtype=np.float32)[y.astype(np.int64)]
        loss = -np.mean(np.sum(onehot * logp, axis=1))
        dz = (np.exp(logp) - onehot) / n
    grads: Weights = {}
    for i in reversed(range(len(spec.activations))):
        grads[f"dense{i}_kernel"] = acts[i].T @ dz
        grads[f"dense{i}_bias"] = dz.sum(axis=0)
        if i > 0:
            dz = (dz @ w[f"dense{i}_kernel"].T) * activation_grad(spec.activations[i - 1], acts[i])
    return float(loss), grads


def sgd_step(
    spec: ModelSpec,
    w: Weights,
    x: np.ndarray,
    y: np.ndarray,
    lr: float,
    mu: float = 0.0,
    anchor: Weights | None = None,
) -> float:
    """One SGD step in place; returns the data loss before the step.

    With ``mu > 0`` the step also descends the FedProx proximal term
    ``mu/2 * ||w - anchor||^2`` (Li et al. 2020), whose gradient is ``mu * (w - anchor)``;
    ``anchor`` is the global model the round started from.
    """
    loss, grads = loss_and_grads(spec, w, x, y)
    for name, g in grads.items():
        if anchor is not None:
            g = g + np.float32(mu) * (w[name] - anchor[name])
        w[name] = (w[name] - np.float32(lr) * g).astype(np.float32)
    return loss


def evaluate(spec: ModelSpec, w: Weights, x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """Mean cross-entropy and accuracy; for ``mse`` models, mean squared and absolute error."""
    logits = forward(spec, w, x)[-1]
    if spec.loss == "mse":
        diff = logits - y.astype(np.float32).reshape(logits.shape)
        return float(np.mean(diff * diff)), float(np.mean(np.abs(diff)))
    logp = log_softmax(logits)
    loss = -np.mean(logp[np.arange(len(y)), y.astype(np.int64)])
    acc = np.mean(np.argmax(logits, axis=1) == y)
    return float(loss), float(acc)

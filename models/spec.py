"""Model specs: what a dense model looks like, validated before anything is built.

A spec is authored as JSON (``models/specs/*.json``) and read by both the builder
(authoring time, TensorFlow) and the numpy reference runtime (test oracle), so
the two always agree on shapes, activations, the loss and the initial weights.
"""

from __future__ import annotations

import json
from itertools import pairwise
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

Activation = Literal["relu", "tanh", "sigmoid", "linear"]
# softmax_cross_entropy: classes, y holds int labels, the metric is accuracy.
# mse: regression (forecast, autoencode), y holds float targets of shape (n, outputs),
# the metric is the mean absolute error.
Loss = Literal["softmax_cross_entropy", "mse"]


class SpecError(ValueError):
    """A spec file is missing, not JSON, or does not validate."""


class DenseLayer(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    units: int = Field(gt=0, le=65536)
    activation: Activation = "relu"


class ModelSpec(BaseModel):
    """A feed-forward network: ``input_size`` -> hidden ``layers`` -> ``outputs``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")
    input_size: int = Field(gt=0, le=65536)
    layers: tuple[DenseLayer, ...] = ()
    outputs: int = Field(gt=0, le=65536)
    loss: Loss = "softmax_cross_entropy"
    seed: int = 0

    @property
    def layer_sizes(self) -> list[tuple[int, int]]:
        """(fan_in, fan_out) of every weight matrix, input to output."""
        sizes = [self.input_size, *(layer.units for layer in self.layers), self.outputs]
        return list(pairwise(sizes))

    @property
    def activations(self) -> list[Activation]:
        """The activation after every weight matrix; the output layer is linear (logits)."""
        return [*(layer.activation for layer in self.layers), "linear"]

    def weight_names(self) -> list[str]:
        names = []
        for i in range(len(self.layer_sizes)):
            names += [f"dense{i}_kernel", f"dense{i}_bias"]
        return names

    def weight_shapes(self) -> dict[str, tuple[int, ...]]:
        shapes: dict[str, tuple[int, ...]] = {}
        for i, (fan_in, fan_out) in enumerate(self.layer_sizes):
            shapes[f"dense{i}_kernel"] = (fan_in, fan_out)
            shapes[f"dense{i}_bias"] = (fan_out,)
        return shapes

    def parameter_count(self) -> int:
        return sum(int(np.prod(s)) for s in self.weight_shapes().values())

    def initial_weights(self) -> dict[str, np.ndarray]:
        """Glorot-uniform kernels and zero biases, drawn from ``seed`` with numpy only.

        The builder bakes these into the ``.tflite`` so that rebuilding from the same
        spec reproduces the same initial model without depending on TensorFlow's RNG.
        """
        rng = np.random.default_rng(self.seed)
        weights: dict[str, np.ndarray] = {}
        for i, (fan_in, fan_out) in enumerate(self.layer_sizes):
            limit = np.sqrt(6.0 / (fan_in + fan_out))
            weights[f"dense{i}_kernel"] = rng.uniform(-limit, limit, (fan_in, fan_out)).astype(
                np.float32
            )
            weights[f"dense{i}_bias"] = np.zeros(fan_out, dtype=np.float32)
        return weights


def load_spec(path: str | Path) -> ModelSpec:
    """Read and validate a spec file; every failure becomes one :class:`SpecError` line."""
    path = Path(path)
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise SpecError(f"{path}: no such spec file") from exc
    except json.JSONDecodeError as exc:
        raise SpecError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from exc
    try:
        return ModelSpec.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "(top level)"
        raise SpecError(f"{path}: {where}: {first['msg']}") from exc

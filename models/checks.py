"""Does a data set fit a model? Input and output shapes, task kind, label range, finiteness.

One place knows what a model takes: :func:`model_io` reads it from the model's own
signatures (the contract in DESIGN.md: ``train(x, y, ...)`` and ``infer(x) -> {logits}``),
in pure Python over the flatbuffer, so it says the same for every runtime and needs none.
The type of ``train``'s ``y`` is the task: integers are class labels (a classifier with as
many classes as ``logits`` has columns), floats are regression targets.
:func:`check_data` checks a data set against that and returns the arrays in the dtypes the
runtimes take::

    io = model_io(Path("digits_mlp.tflite"))  # ModelIO(sample_shape=(64,), outputs=10, ...)
    x, y = check_data(io, x, y, name="part.npz")

The agent (its data file and its sensor windows), the aggregator (its held-out set) and the
simulator all check here, where data enters, so a bad file is one line at start and not a
reshape error in a runtime, a diverged round or a model that learns from wrong labels.

Errors::

    ValueError
    └── DataError      the data does not fit the model (or cannot be read); one line that
                       names the file
    ModelLoadError     (fedge.models.runtime) the model lacks the train/infer signatures
"""

from __future__ import annotations

import math
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from flatbuffers import number_types as N
from flatbuffers.table import Table

from .runtime import ModelLoadError, read_model
from .tflite_schema import ModelReader, _damaged, _field, _scalar, _string, _tables

Task = Literal["classify", "regress"]

# TensorType in TFLite's schema.fbs
_INTEGER_TYPES = {2: "int32", 3: "uint8", 4: "int64", 7: "int16", 9: "int8"}
_FLOAT_TYPES = {0: "float32", 1: "float16", 10: "float64"}


class DataError(ValueError):
    """The data does not fit the model, or cannot be read. ``str()`` is one line."""


@dataclass(frozen=True)
class ModelIO:
    """What one sample looks like to a model, and what it predicts.

    ``sample_shape``: one sample of ``x`` (``(64,)`` for a dense model of 64 features);
    ``None`` for a dimension the model leaves open. ``outputs``: the number of classes of a
    classifier, or of targets per sample of a regression model (None if the model does
    not say). ``target_shape``: one sample of ``y`` (``()`` for class labels).
    """

    sample_shape: tuple[int | None, ...]
    outputs: int | None
    task: Task
    target_shape: tuple[int | None, ...] = ()

    def describe(self) -> str:
        what = "classes" if self.task == "classify" else "outputs"
        return f"{_shape_text(self.sample_shape)} -> {self.outputs or '?'} {what}"


def _dims(shape: tuple[int | None, ...]) -> str:
    """``(8, 8, 1)``, with ``?`` for an open dimension; ``(5,)`` for one."""
    inner = ", ".join("?" if d is None else str(d) for d in shape)
    return f"({inner},)" if len(shape) == 1 else f"({inner})"


def _shape_text(shape: tuple[int | None, ...]) -> str:
    if len(shape) == 1:
        return f"{shape[0] if shape[0] is not None else 'any number of'} features"
    return _dims(shape)


# -- reading the model ------------------------------------------------------------------------
# schema.fbs field ids: Model.subgraphs = 2, Model.signature_defs = 7; SubGraph.tensors = 0;
# SignatureDef { inputs = 0, outputs = 1, signature_key = 2, subgraph_index = 4 };
# TensorMap { name = 0, tensor_index = 1 }; Tensor { shape = 0, type = 1, shape_signature = 7 }


@dataclass(frozen=True)
class _TensorInfo:
    shape: tuple[int, ...]  # -1 where the model leaves the size open
    type: int


def _ints(table: Table, field_id: int) -> tuple[int, ...]:
    off = _field(table, field_id)
    if not off:
        return ()
    start, count = table.Vector(off), table.VectorLen(off)
    return tuple(int(table.Get(N.Int32Flags, start + 4 * i)) for i in range(count))


def _signatures(data: bytes) -> dict[str, dict[str, _TensorInfo]]:
    """``{signature: {"in:x": tensor, "out:logits": tensor, ...}}``."""
    ModelReader(data)  # a clear ModelFileError for bytes that are not a model
    found: dict[str, dict[str, _TensorInfo]] = {}
    with _damaged():
        root = Table(data, int.from_bytes(data[:4], "little"))
        subgraphs = _tables(root, 2)
        for sig in _tables(root, 7):
            index = _scalar(sig, 4, N.Uint32Flags)
            if not 0 <= index < len(subgraphs):
                continue
            tensors = _tables(subgraphs[index], 0)
            io: dict[str, _TensorInfo] = {}
            for field_id, side in ((0, "in"), (1, "out")):
                for entry in _tables(sig, field_id):
                    t = _scalar(entry, 1, N.Uint32Flags)
                    if 0 <= t < len(tensors):
                        tensor = tensors[t]
                        shape = _ints(tensor, 7) or _ints(tensor, 0)
                        io[f"{side}:{_string(entry, 0)}"] = _TensorInfo(
                            shape, _scalar(tensor, 1, N.Int8Flags)
                        )
            found[_string(sig, 2) or ""] = io
    return found


def model_io(model: bytes | str | Path) -> ModelIO:
    """What ``model`` (a ``.tflite`` file or its bytes) takes and predicts."""
    data = model if isinstance(model, bytes) else read_model(model)
    sigs = _signatures(data)
    train, infer = sigs.get("train", {}), sigs.get("infer", {})
    x, y = train.get("in:x"), train.get("in:y")
    if x is None or y is None:
        raise ModelLoadError("model has no train(x, y) signature (see the model contract)")
    if y.type in _INTEGER_TYPES:
        task: Task = "classify"
    elif y.type in _FLOAT_TYPES:
        task = "regress"
    else:
        raise ModelLoadError(f"model's train signature takes y of TFLite type {y.type}")
    logits = infer.get("out:logits")
    width = logits.shape[-1] if logits is not None and logits.shape else -1
    target = tuple(None if d < 0 else d for d in y.shape[1:])
    if task == "regress" and width < 0 and target and None not in target:
        width = math.prod(d for d in target if d is not None)
    return ModelIO(
        sample_shape=tuple(None if d < 0 else d for d in x.shape[1:]),
        outputs=None if width < 0 else int(width),
        task=task,
        target_shape=target,
    )


# -- reading data ------------------------------------------------------------------------------


def read_npz(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Arrays ``x`` and ``y`` of an ``.npz``, as stored; DataError naming the file if not."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    if not zipfile.is_zipfile(path):
        raise DataError(f"{path}: not an .npz archive (not a zip file)")
    try:
        with np.load(path, allow_pickle=False) as npz:
            if "x" not in npz.files or "y" not in npz.files:
                have = ", ".join(repr(n) for n in sorted(npz.files)) or "none"
                raise DataError(f"{path}: needs arrays 'x' and 'y' (it has: {have})")
            return np.asarray(npz["x"]), np.asarray(npz["y"])
    except DataError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as exc:
        why = " ".join(str(exc).split()) or type(exc).__name__
        raise DataError(f"{path}: not a readable .npz ({why})") from exc


# -- checking data -----------------------------------------------------------------------------


def _non_finite_rows(values: np.ndarray) -> np.ndarray:
    """Indices of the samples (rows) with any NaN or infinite value."""
    return np.flatnonzero(~np.isfinite(values.reshape(len(values), -1)).all(axis=1))


def _fits(shape: tuple[int, ...], want: tuple[int | None, ...]) -> bool:
    if len(shape) != len(want):
        return False
    return all(w is None or s == w for s, w in zip(shape, want, strict=True))


def check_data(io: ModelIO, x: object, y: object, *, name: str) -> tuple[np.ndarray, np.ndarray]:
    """``(x float32, y)`` if the data fits ``io``, else DataError with one line naming ``name``.

    ``y`` comes back as int32 class labels (classifiers) or float32 targets shaped
    ``(samples, *target_shape)`` (regression). Checked: non-empty, numeric, the shape of
    a sample, as many labels as samples, every feature and target finite, labels whole
    numbers in ``0..classes-1``.
    """
    xa, ya = np.asarray(x), np.asarray(y)
    if xa.dtype.kind not in "biuf":
        raise DataError(f"{name}: x must be numeric, got dtype {xa.dtype.str!r}")
    if xa.ndim == 0 or len(xa) == 0:
        raise DataError(f"{name}: no samples")
    if not _fits(xa.shape[1:], io.sample_shape):
        raise DataError(f"{name}: {_sample_text(xa)}, the model takes {_want_text(io)}")
    if ya.ndim == 0 or len(ya) != len(xa):
        rows = "no rows" if ya.ndim == 0 else f"{len(ya)}"
        raise DataError(f"{name}: x has {len(xa)} samples but y has {rows}")
    with np.errstate(over="ignore"):  # a float64 beyond float32's range becomes inf: caught
        xf = np.ascontiguousarray(xa, dtype=np.float32)
    bad = _non_finite_rows(xf)
    if len(bad):
        raise DataError(
            f"{name}: {len(bad)} of {len(xf)} samples have a non-finite feature"
            f" (first at row {bad[0]})"
        )
    if io.task == "classify":
        return xf, _labels(io, ya, name)
    return xf, _targets(io, ya, name)


def _sample_text(x: np.ndarray) -> str:
    if x.ndim == 1:
        return f"x has shape {x.shape} (one number per sample)"
    if x.ndim == 2:
        return f"{x.shape[1]} features per sample"
    return f"samples of shape {x.shape[1:]}"


def _want_text(io: ModelIO) -> str:
    if len(io.sample_shape) == 1 and io.sample_shape[0] is not None:
        return str(io.sample_shape[0])
    return f"samples of shape {_shape_text(io.sample_shape)}"


def _labels(io: ModelIO, y: np.ndarray, name: str) -> np.ndarray:
    classes = io.outputs
    span = f"0-{classes - 1}" if classes else "0 and up"
    if y.ndim != 1:
        raise DataError(
            f"{name}: y has shape {y.shape}; a classifier takes one class label per sample"
            f" (y of shape (samples,), classes {span})"
        )
    if y.dtype.kind not in "biuf":
        raise DataError(f"{name}: labels must be class numbers {span}, got dtype {y.dtype.str!r}")
    if y.dtype.kind == "f":
        bad = _non_finite_rows(y)
        if len(bad):
            raise DataError(
                f"{name}: {len(bad)} of {len(y)} labels are not finite (first at row {bad[0]})"
            )
        fractional = np.flatnonzero(y != np.round(y))
        if len(fractional):
            first = int(fractional[0])
            raise DataError(
                f"{name}: labels must be whole class numbers {span}; row {first} has {y[first]:g}"
            )
    lo, hi = int(y.min()), int(y.max())
    outside = (y < 0) | (y >= classes) if classes else y < 0
    if outside.any():
        shown = f"{lo}-{hi}" if lo >= 0 else f"{lo} to {hi}"
        has = f"{classes} classes ({span})" if classes else f"classes {span}"
        raise DataError(
            f"{name}: labels {shown} but the model has {has};"
            f" {int(outside.sum())} of {len(y)} samples are out of range"
        )
    return np.ascontiguousarray(y, dtype=np.int32)


def _targets(io: ModelIO, y: np.ndarray, name: str) -> np.ndarray:
    if y.dtype.kind not in "biuf":
        raise DataError(f"{name}: targets must be numbers, got dtype {y.dtype.str!r}")
    want = io.target_shape
    if y.ndim == 1 and want in ((1,), (None,)):
        y = y.reshape(-1, 1)  # one target per sample: (n,) and (n, 1) mean the same
    if not _fits(y.shape[1:], want):
        got = int(np.prod(y.shape[1:], dtype=np.int64)) if y.ndim > 1 else 1
        if len(want) == 1 and want[0] is not None and y.ndim <= 2:
            raise DataError(
                f"{name}: {got} target(s) per sample, the model predicts {want[0]}"
                f" (want y of shape (samples, {want[0]}))"
            )
        raise DataError(
            f"{name}: targets of shape {y.shape[1:]} per sample, the model predicts {_dims(want)}"
        )
    with np.errstate(over="ignore"):
        yf = np.ascontiguousarray(y, dtype=np.float32)
    bad = _non_finite_rows(yf)
    if len(bad):
        raise DataError(
            f"{name}: {len(bad)} of {len(yf)} samples have a non-finite target"
            f" (first at row {bad[0]})"
        )
    return yf


__all__ = ["DataError", "ModelIO", "check_data", "model_io", "read_npz"]

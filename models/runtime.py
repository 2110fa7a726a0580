"""Run a fedge model: LiteRT first, tflite-runtime as fallback, numpy as the reference.

All three expose the same small surface (:class:`Runtime`), so the trainer never
knows which one it drives::

    rt = load_runtime("models/artifacts/digits_mlp.tflite")
    rt.set_weights(global_weights)
    loss = rt.train_step(x, y, lr=0.05)

Training always runs on the CPU (XNNPACK): accelerator delegates do not execute
the resource-variable ops of the ``train`` signature. External delegate libraries
named in the config are used for inference only; one that cannot be loaded costs
one warning and inference stays on the CPU. :attr:`Runtime.delegate` says which is
active.

A backend that crashes the process (a segfault is not an exception) cannot be caught
here: the agent loads through :func:`fedge.models.selftest.load_proven_runtime`, which
proves each backend in a child process first.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import logging
import os
import sys
import tempfile
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType

import numpy as np

from . import maths
from .builder import SPEC_METADATA_KEY
from .metadata import read_metadata
from .spec import ModelSpec
from .tflite_schema import ModelFileError

log = logging.getLogger("fedge.models")

BACKENDS = ("litert", "tflite_runtime", "numpy")
# Interpreter backends: the module imported and the distribution that installs it.
_PACKAGES = {
    "litert": ("ai_edge_litert", "ai-edge-litert"),
    "tflite_runtime": ("tflite_runtime", "tflite-runtime"),
}
CONTRACT = ("train", "infer", "evaluate", "get_weights", "set_weights")


class RuntimeError_(Exception):
    """Base of the runtime errors (the trailing underscore keeps the builtin visible)."""


class ModelLoadError(RuntimeError_):
    """The model file is missing, unreadable, or does not honour the signature contract."""


class BackendUnavailable(RuntimeError_):
    """None of the requested backends is installed and working."""


class BackendBroken(RuntimeError_):
    """A backend imports but cannot run here (e.g. tflite-runtime 2.14 beside numpy 2)."""


class Runtime(ABC):
    """One model instance: weights live inside it; methods take and return numpy arrays."""

    backend: str
    delegate: str = "cpu"
    weight_names: list[str]
    supports_prox: bool = True  # the train step takes FedProx's mu

    @abstractmethod
    def train_step(self, x: np.ndarray, y: np.ndarray, lr: float, mu: float = 0.0) -> float:
        """One SGD step on the batch; returns the batch loss before the step.

        ``mu > 0`` adds FedProx's proximal pull towards the weights last set with
        :meth:`set_weights`.
        """

    @abstractmethod
    def infer(self, x: np.ndarray) -> np.ndarray:
        """Logits for a batch."""

    @abstractmethod
    def evaluate(self, x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
        """(mean loss, metric) on a batch; the metric is accuracy for classifiers."""

    @abstractmethod
    def get_weights(self) -> dict[str, np.ndarray]: ...

    @abstractmethod
    def set_weights(self, weights: Mapping[str, np.ndarray]) -> None: ...

    def describe(self) -> str:
        return f"{self.backend} (training on cpu, inference on {self.delegate})"


def embedded_spec(data: bytes) -> ModelSpec | None:
    """The spec a fedge-built model carries in its metadata; None for other models."""
    try:
        raw = read_metadata(data, SPEC_METADATA_KEY)
        return None if raw is None else ModelSpec.model_validate(json.loads(raw))
    except (ModelFileError, ValueError) as exc:
        raise ModelLoadError(f"embedded spec unreadable: {exc}") from exc


class NumpyRuntime(Runtime):
    """The reference: the same maths as the ``.tflite`` in float32 numpy."""

    backend = "numpy"

    def __init__(self, spec: ModelSpec, weights: Mapping[str, np.ndarray] | None = None) -> None:
        self.spec = spec
        self.weight_names = spec.weight_names()
        start = weights or spec.initial_weights()
        self._w = {k: np.array(v, dtype=np.float32) for k, v in start.items()}
        self._anchor = {k: v.copy() for k, v in self._w.items()}

    def train_step(self, x: np.ndarray, y: np.ndarray, lr: float, mu: float = 0.0) -> float:
        anchor = self._anchor if mu else None
        return maths.sgd_step(self.spec, self._w, x, y, lr, mu, anchor)

    def infer(self, x: np.ndarray) -> np.ndarray:
        return maths.forward(self.spec, self._w, x)[-1]

    def evaluate(self, x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
        return maths.evaluate(self.spec, self._w, x, y)

    def get_weights(self) -> dict[str, np.ndarray]:
        return {k: v.copy() for k, v in self._w.items()}

    def set_weights(self, weights: Mapping[str, np.ndarray]) -> None:
        _check_weights(self.weight_names, {k: v.shape for k, v in self._w.items()}, weights)
        self._w = {k: np.array(weights[k], dtype=np.float32) for k in self.weight_names}
        self._anchor = {k: v.copy() for k, v in self._w.items()}


def _check_weights(
    names: Sequence[str], shapes: Mapping[str, tuple[int, ...]], weights: Mapping[str, np.ndarray]
) -> None:
    missing = set(names) - set(weights)
    extra = set(weights) - set(names)
    if missing or extra:
        raise ValueError(
            f"weights do not match the model: missing {sorted(missing)}, extra {sorted(extra)}"
        )
    for name in names:
        if tuple(np.shape(weights[name])) != tuple(shapes[name]):
            raise ValueError(
                f"weight {name}: shape {np.shape(weights[name])} != model's {shapes[name]}"
            )


@contextmanager
def native_stderr(what: str) -> Iterator[None]:
    """Catch what the native runtime prints on stderr (file descriptor 2) meanwhile, e.g.
    LiteRT's "INFO: Created TensorFlow Lite XNNPACK delegate for CPU.": its INFO lines go to
    the log at DEBUG (``fedge -v`` shows them), anything else at WARNING."""
    sys.stderr.flush()
    try:
        saved = os.dup(2)
    except OSError:  # no stderr to take over (a daemon with fd 2 closed)
        yield
        return
    with tempfile.TemporaryFile() as caught:
        os.dup2(caught.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            caught.seek(0)
            for line in caught.read().decode("utf-8", "replace").splitlines():
                if line.strip():
                    level = logging.DEBUG if line.startswith("INFO:") else logging.WARNING
                    log.log(level, "%s said: %s", what, line)


def _import_backend(backend: str) -> ModuleType:
    if backend == "litert":
        from ai_edge_litert import interpreter as mod
    elif backend == "tflite_runtime":
        from tflite_runtime import interpreter as mod  # type: ignore[import-not-found,no-redef]
    else:  # pragma: no cover - guarded by load_runtime
        raise ValueError(backend)
    return mod


def backend_version(backend: str) -> str | None:
    """The installed version of an interpreter backend, found without importing it.

    None when the backend is not installed; "unknown" when it imports but no package
    metadata names its version.
    """
    module, distribution = _PACKAGES[backend]
    try:
        found = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        found = None
    if found is None:
        return None
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


class InterpreterRuntime(Runtime):
    """A ``.tflite`` driven through its signatures by LiteRT or tflite-runtime."""

    def __init__(
        self,
        data: bytes,
        backend: str,
        *,
        delegates: Sequence[str] = (),
        num_threads: int = 1,
    ) -> None:
        self.backend = backend
        self._mod = _import_backend(backend)
        self._data = data
        self._num_threads = num_threads
        with native_stderr(backend):
            self._open(data, num_threads)
        self._infer_interp = self._load_delegated(delegates)
        self._infer_stale = True

    def _open(self, data: bytes, num_threads: int) -> None:
        backend = self.backend
        try:
            self._interp = self._mod.Interpreter(model_content=data, num_threads=num_threads)
        except (ValueError, RuntimeError) as exc:
            raise ModelLoadError(f"{backend} cannot load the model: {exc}") from exc
        except (SystemError, ImportError) as exc:  # a native module built for another numpy
            raise BackendBroken(f"{backend} is installed but unusable: {exc}") from exc
        signatures = self._interp.get_signature_list()
        missing = [s for s in CONTRACT if s not in signatures]
        if missing:
            raise ModelLoadError(
                f"model lacks signature(s) {', '.join(missing)}"
                f" (has {', '.join(sorted(signatures))})"
            )
        self._run = {name: self._interp.get_signature_runner(name) for name in CONTRACT}
        self.weight_names = sorted(signatures["set_weights"]["inputs"])
        self.supports_prox = "mu" in signatures["train"]["inputs"]
        # int32 labels for classifiers, float32 targets for regression (mse) models
        y_details = self._run["train"].get_input_details()["y"]
        self._y_dtype = np.dtype(y_details["dtype"])
        self._shapes = {k: v.shape for k, v in self.get_weights().items()}

    def example_shapes(self) -> tuple[tuple[int, ...], tuple[int, ...], np.dtype]:
        """The shapes of one example's ``x`` and ``y`` (batch axis dropped), and y's dtype."""
        details = self._run["train"].get_input_details()

        def shape(name: str) -> tuple[int, ...]:
            dims = details[name].get("shape_signature", details[name]["shape"])
            return tuple(int(d) for d in dims[1:])

        return shape("x"), shape("y"), self._y_dtype

    def _load_delegated(self, libraries: Sequence[str]):  # type: ignore[no-untyped-def]
        """An inference-only interpreter on the first external delegate that loads."""
        for lib in libraries:
            problem = _preflight_delegate(lib)
            if problem is not None:
                log.warning(
                    "delegate %s could not be loaded (%s); inference runs on the CPU", lib, problem
                )
                continue
            try:
                with native_stderr(f"{self.backend} with {lib}"):
                    delegate = self._mod.load_delegate(lib)
                    interp = self._mod.Interpreter(
                        model_content=self._data,
                        experimental_delegates=[delegate],
                        num_threads=self._num_threads,
                    )
            except (ValueError, OSError, RuntimeError) as exc:
                log.warning(
                    "delegate %s could not be loaded (%s); inference runs on the CPU", lib, exc
                )
                continue
            self.delegate = lib
            log.info("inference delegate %s active", lib)
            return interp
        return None

    def _call(self, name: str, **inputs: np.ndarray) -> dict[str, np.ndarray]:
        return {k: np.array(v) for k, v in self._run[name](**inputs).items()}

    def train_step(self, x: np.ndarray, y: np.ndarray, lr: float, mu: float = 0.0) -> float:
        inputs = {
            "x": np.ascontiguousarray(x, dtype=np.float32),
            "y": np.ascontiguousarray(y, dtype=self._y_dtype),
            "lr": np.float32(lr),
        }
        if self.supports_prox:
            inputs["mu"] = np.float32(mu)
        elif mu:
            raise ValueError("this model's train signature has no mu input: FedProx needs one")
        self._infer_stale = True
        return float(self._call("train", **inputs)["loss"])

    def infer(self, x: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(x, dtype=np.float32)
        if self._infer_interp is None:
            return self._call("infer", x=x)["logits"]
        if self._infer_stale:
            self._infer_interp.get_signature_runner("set_weights")(**self.get_weights())
            self._infer_stale = False
        return np.array(self._infer_interp.get_signature_runner("infer")(x=x)["logits"])

    def evaluate(self, x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
        out = self._call(
            "evaluate",
            x=np.ascontiguousarray(x, dtype=np.float32),
            y=np.ascontiguousarray(y, dtype=self._y_dtype),
        )
        return float(out["loss"]), float(out["metric"])

    def get_weights(self) -> dict[str, np.ndarray]:
        return self._call("get_weights")

    def set_weights(self, weights: Mapping[str, np.ndarray]) -> None:
        _check_weights(self.weight_names, self._shapes, weights)
        self._infer_stale = True
        self._run["set_weights"](
            **{k: np.ascontiguousarray(weights[k], dtype=np.float32) for k in self.weight_names}
        )


def _preflight_delegate(library: str) -> str | None:
    """Why ``library`` cannot be an external delegate, or None if it may be one.

    Checked with ctypes before LiteRT sees it: LiteRT's ``Delegate.__del__`` raises on
    an object whose library failed to load, which would surface as a stray error.
    """
    import ctypes

    try:
        lib = ctypes.CDLL(library)
    except OSError as exc:
        return str(exc)
    if not hasattr(lib, "tflite_plugin_create_delegate"):
        return "not a TFLite external delegate (no tflite_plugin_create_delegate)"
    return None


def read_model(path: str | Path) -> bytes:
    path = Path(path)
    try:
        return path.read_bytes()
    except FileNotFoundError as exc:
        raise ModelLoadError(f"{path}: no such model file") from exc
    except OSError as exc:
        raise ModelLoadError(f"{path}: cannot read model file ({exc.strerror})") from exc


def model_bytes(model: str | Path | bytes) -> bytes:
    """The model's bytes, read from a path if need be, checked to be a TFLite flatbuffer."""
    data = model if isinstance(model, bytes) else read_model(model)
    if data[4:8] != b"TFL3":
        raise ModelLoadError("not a TFLite model (missing TFL3 identifier)")
    return data


def check_backends(prefer: Sequence[str]) -> None:
    """Raise ValueError naming any backend in ``prefer`` that fedge does not know."""
    unknown = [b for b in prefer if b not in BACKENDS]
    if unknown:
        raise ValueError(f"unknown runtime backend(s) {unknown}; choose from {list(BACKENDS)}")


def available_backends() -> list[str]:
    found = []
    for backend in BACKENDS[:-1]:
        try:
            _import_backend(backend)
        except ImportError:
            continue
        found.append(backend)
    return [*found, "numpy"]


def load_runtime(
    model: str | Path | bytes,
    *,
    prefer: Sequence[str] = BACKENDS,
    delegates: Sequence[str] = (),
    num_threads: int = 1,
) -> Runtime:
    """Load ``model`` on the first backend of ``prefer`` that is installed.

    The numpy backend rebuilds the model from the spec embedded in the file; it is
    chosen only when asked for or when neither interpreter is installed. No backend is
    proven here (see :func:`fedge.models.selftest.load_proven_runtime`).
    """
    data = model_bytes(model)
    check_backends(prefer)
    tried = []
    for backend in prefer:
        if backend == "numpy":
            spec = embedded_spec(data)
            if spec is None:
                raise ModelLoadError(
                    "the numpy runtime needs a model built by fedge (no embedded spec)"
                )
            # The builder bakes spec.initial_weights() into the file, so both start equal.
            return NumpyRuntime(spec)
        try:
            return InterpreterRuntime(data, backend, delegates=delegates, num_threads=num_threads)
        except ImportError as exc:
            tried.append(f"{backend} ({exc})")
            log.debug("runtime backend %s unavailable: %s", backend, exc)
        except BackendBroken as exc:
            tried.append(str(exc))
            log.warning("%s; trying the next runtime", exc)
    raise BackendUnavailable("no runtime backend available: " + "; ".join(tried))

"""Compact globals: the change from one global model to the next, compressed, with the
aggregator's error feedback (pure numpy, no I/O).

Every device that follows the fleet holds the same copy of the global model, the
aggregator's *shadow*. At a full sync (the first model, every ``resync_every`` versions, a
device that asks) the shadow is the true model, sent whole on ``global``. Between them the
aggregator sends, on ``global/delta``, the change that brings the shadow toward the true
model::

    d       = true_v - shadow_{v-1}              (what the shadow lacks; error feedback:
                                                  what earlier deltas left out is in it)
    d_hat   = decode(encode(d, codec))           (e.g. int8, or top-k + int8)
    shadow_v = shadow_{v-1} + d_hat               (float32, the same bits on every device)

with the SHA-256 of shadow_v and its distance to the true model, ``max |true_v - shadow_v|``
(``error_bound``), in the header. A device that holds shadow_{v-1} adds d_hat and compares
checksums: equal, it holds exactly the aggregator's shadow_v, within ``error_bound`` of the
true model; any other, or a gap in the versions, and it asks for a full sync (its status
says it is behind). Because d carries what earlier deltas dropped, the shadow never drifts:
with int8 the error is at most half a quantisation step of the latest delta, entry by entry.

    shadow = Shadow(weights, version=0)
    header, tensors = shadow.advance(new_weights, version=1, round_id=1, spec, fleet="f")
    weights = apply_delta(weights, header, tensors)          # on the device
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

import numpy as np

from .codecs import CodecError, CodecSpec, decode_delta, encode_delta
from .messages import GlobalDeltaHeader

Weights = Mapping[str, np.ndarray]


class DeltaMismatch(ValueError):
    """A model delta that does not fit the weights a device holds: another base version,
    other tensors, or a result whose checksum is not the aggregator's."""

    def __init__(self, reason: str, message: str) -> None:
        self.reason = reason
        super().__init__(f"{reason}: {message}")


def checksum(weights: Weights) -> str:
    """SHA-256 over the tensors' names, shapes and float32 bytes, in name order: 16 hex."""
    h = hashlib.sha256()
    for name in sorted(weights):
        value = np.ascontiguousarray(weights[name], dtype="<f4")
        h.update(name.encode() + b"\0" + repr(value.shape).encode() + b"\0")
        h.update(value.tobytes())
    return h.hexdigest()[:16]


def _float32(weights: Weights) -> dict[str, np.ndarray]:
    return {k: np.array(v, dtype=np.float32) for k, v in weights.items()}


class Shadow:
    """The aggregator's copy of what the devices hold, and the deltas that move it."""

    def __init__(self, weights: Weights, version: int) -> None:
        self.weights = _float32(weights)
        self.version = version
        self.error_bound = 0.0  # max |true - shadow| after the last delta; 0 after a sync

    def sync(self, weights: Weights, version: int) -> None:
        """A full model went out: the devices hold the true model now."""
        self.weights = _float32(weights)
        self.version = version
        self.error_bound = 0.0

    def advance(
        self,
        true_weights: Weights,
        *,
        version: int,
        round_id: int,
        spec: CodecSpec,
        fleet: str,
        rng: np.random.Generator | None = None,
    ) -> tuple[GlobalDeltaHeader, dict[str, np.ndarray]]:
        """The delta from the shadow to ``true_weights`` (version ``version``), and the
        shadow moved by it."""
        target = _float32(true_weights)
        gap = {k: (target[k] - self.weights[k]).astype(np.float32) for k in target}
        encoded = encode_delta(gap, spec, rng)
        moved = {k: (self.weights[k] + encoded.decoded[k]).astype(np.float32) for k in target}
        bound = max(
            (float(np.abs(target[k] - moved[k]).max(initial=0.0)) for k in target), default=0.0
        )
        header = GlobalDeltaHeader(
            fleet=fleet,
            base_version=self.version,
            model_version=version,
            round_id=round_id,
            codec=str(spec),
            checksum=checksum(moved),
            error_bound=bound,
        )
        self.weights, self.version, self.error_bound = moved, version, bound
        return header, encoded.tensors


def apply_delta(
    weights: Weights, header: GlobalDeltaHeader, tensors: Mapping[str, np.ndarray]
) -> dict[str, np.ndarray]:
    """The device's next model: ``weights`` (version ``header.base_version``) plus the
    decoded delta; DeltaMismatch if it does not fit or does not give the aggregator's bits."""
    shapes = {k: list(np.shape(v)) for k, v in weights.items()}
    try:
        delta = decode_delta(dict(tensors), {"codec": header.codec, "shapes": shapes})
    except CodecError as exc:
        raise DeltaMismatch("bad_delta", str(exc)) from None
    out = {k: (np.asarray(weights[k], np.float32) + delta[k]).astype(np.float32) for k in weights}
    if not all(np.isfinite(v).all() for v in out.values()):
        raise DeltaMismatch("not_finite", f"model v{header.model_version}")
    got = checksum(out)
    if got != header.checksum:
        raise DeltaMismatch(
            "bad_checksum",
            f"model v{header.model_version}: weights {got}, the aggregator's {header.checksum}",
        )
    return out

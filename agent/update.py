"""The device's update path as named pure steps (no I/O), in the order they run::

    local_delta -> check_trained -> with_residual -> gate -> encode -> remaining

``fedge.agent.daemon`` calls them between training and publishing; a new mechanism (a clip,
DP noise, a mask) is one step added here and tested alone. The residual (error feedback) is
what the codec or the gate held back; ``remaining`` is what stays in it once an update is out.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace

import numpy as np
from fedge.protocol import CodecSpec, Encoded, TrainingConfig, encode_delta, parse_codec

from . import residual
from .gate import GateDecision, decide

Weights = Mapping[str, np.ndarray]


class Diverged(ValueError):
    """Local training produced a non-finite loss or delta: there is nothing to send."""


def local_delta(local: Weights, global_weights: Weights) -> dict[str, np.ndarray]:
    """What local training changed: ``local - global`` per tensor, float32."""
    return {k: (local[k] - global_weights[k]).astype(np.float32) for k in local}


def check_trained(loss: float, delta: Weights) -> None:
    if not np.isfinite(loss) or not all(np.isfinite(d).all() for d in delta.values()):
        raise Diverged(f"training diverged (loss {loss}); the update is dropped")


def with_residual(delta: Weights, held: Weights | None) -> dict[str, np.ndarray]:
    """This round's delta plus what earlier rounds held back (error feedback)."""
    return residual.add(delta, held)


def gate(
    cfg: TrainingConfig,
    delta: Weights,
    global_weights: Weights,
    *,
    consecutive_skips: int,
    last_global_update: Weights | None,
    late: bool,
) -> GateDecision:
    """Upload or hold back (``fedge.agent.gate``), judged on this round's own change: under
    top-k the residual is large by design. A ``late`` update (past the round's deadline)
    would not count, so it is held back whole."""
    decision = decide(
        cfg.gate,
        delta,
        global_weights,
        consecutive_skips=consecutive_skips,
        last_global_update=last_global_update,
        lr=cfg.lr,
    )
    if decision.upload and late:
        return replace(decision, upload=False, reason="other")
    return decision


@dataclass(frozen=True)
class Encoding:
    spec: CodecSpec  # the codec as used (its top-k fraction raised to the minimum entries)
    encoded: Encoded


def encode(update: Weights, cfg: TrainingConfig, rng: np.random.Generator) -> Encoding:
    size = sum(int(v.size) for v in update.values())
    spec = parse_codec(cfg.codec).with_min_entries(size, cfg.topk_min_entries)
    return Encoding(spec, encode_delta(update, spec, rng))


def remaining(update: Weights, encoding: Encoding) -> dict[str, np.ndarray] | None:
    """The residual once ``encoding`` is sent: none after a lossless codec."""
    if str(encoding.spec) == "float32":
        return None
    return residual.subtract(update, encoding.encoded.decoded)

"""The device's update path as named pure steps (no I/O), in the order they run::

    local_delta -> check_trained -> with_residual -> clip -> local_noise -> gate -> encode
    -> remaining                          (under homomorphic encryption: gate -> encrypt)

and, in a secure round (``TrainingConfig.secure``, docs/secure-aggregation.md), ``seal`` in
place of ``encode``: quantise onto the round's shared range and index set, the vector the
device's ``SecAggClient`` masks once its neighbours' shares are in; ``remaining`` then keeps
what the quantisation, the range and the index set left out.

``fedge.agent.daemon`` calls them between training and publishing; a new mechanism (a mask)
is one step added here and tested alone. The residual (error feedback) is what the codec or
the gate held back; ``remaining`` is what stays in it once an update is out.

Under differential privacy (``TrainingConfig.privacy``, docs/privacy.md) the update, its
residual included, is clipped to the round's L2 bound; under local DP Gaussian noise is then
added on the device. What the clip cut off is dropped, not kept as residual: the residual is
only what the codec held back of the clipped (and, under local DP, noised) update, and it is
clipped again with the next round's delta, so no upload exceeds the bound. The gate is off
under DP: a skip decided on the update would tell the aggregator something about the data.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import numpy as np
from fedge.protocol import (
    CodecSpec,
    Encoded,
    PrivacySettings,
    SecureSettings,
    TrainingConfig,
    clip_l2,
    encode_delta,
    parse_codec,
)

from . import residual
from .gate import GateDecision, decide

if TYPE_CHECKING:  # imported where used: a device loads them for a secure or HE round only
    from fedge.protocol.he import HeKeys
    from fedge.protocol.secagg import SecureRound

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


@dataclass(frozen=True)
class Clipped:
    update: dict[str, np.ndarray]  # L2 norm at most the bound
    norm: float  # the norm before clipping
    within: bool  # norm <= bound: the bit the adaptive clip counts


def clip(update: Weights, privacy: PrivacySettings) -> Clipped:
    """``update`` scaled down to an L2 norm of at most ``privacy.clip`` (a no-op within it)."""
    clipped, norm = clip_l2(update, privacy.clip)
    return Clipped(clipped, norm, norm <= privacy.clip)


def local_noise(
    update: Weights, privacy: PrivacySettings, rng: np.random.Generator
) -> dict[str, np.ndarray]:
    """Local DP: ``update`` plus N(0, (noise_multiplier * clip)^2) on every entry; the update
    as it is under central DP (noise multiplier 0), where the aggregator adds the noise."""
    std = privacy.noise_multiplier * privacy.clip
    if std == 0:
        return {k: np.asarray(v, np.float32) for k, v in update.items()}
    return {
        k: (np.asarray(v, np.float64) + rng.normal(0.0, std, np.shape(v))).astype(np.float32)
        for k, v in update.items()
    }


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
    would not count, so it is held back whole. Under differential privacy the gate is off
    (every trained update goes up, reason ``"privacy"``): the skip itself would be a signal
    about the unclipped, un-noised delta."""
    if cfg.privacy is not None:
        return GateDecision(
            upload=not late,
            reason="other" if late else "privacy",
            relative_norm=0.0,
            agreement=None,
        )
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


def remaining(update: Weights, encoding: Encoding | Sealed) -> dict[str, np.ndarray] | None:
    """The residual once ``encoding`` is sent: none after a lossless codec."""
    if isinstance(encoding, Sealed):
        return residual.subtract(update, encoding.sent)
    if str(encoding.spec) == "float32":
        return None
    return residual.subtract(update, encoding.encoded.decoded)


def secure_plan(
    cfg: TrainingConfig,
    secure: SecureSettings,
    *,
    fleet: str,
    round_id: int,
    devices: tuple[str, ...],
    shapes: dict[str, tuple[int, ...]],
) -> SecureRound:
    """The secure round's parameters, tensor order and index set, as the aggregator derives
    them (``fedge.protocol.secagg.rounds``); SecAggError("bad_params") for a bad round."""
    from fedge.protocol.secagg import secure_round

    size = sum(int(np.prod(s)) for s in shapes.values())
    spec = parse_codec(cfg.codec).with_min_entries(size, cfg.topk_min_entries)
    return secure_round(fleet, round_id, devices, secure, shapes, spec)


@dataclass(frozen=True)
class Sealed:
    vector: np.ndarray  # the update in the ring Z_{2^k} (uint32), ready to be masked
    sent: dict[str, np.ndarray]  # what the sum gets of this update (float32 tensors)


def seal(update: Weights, plan: SecureRound, rng: np.random.Generator) -> Sealed:
    """Secure aggregation's encoding: the round's entries of ``update``, clipped to the
    shared range [-clip, clip] and rounded stochastically to ``bits`` bits (unbiased), as
    elements of the ring the masks live in."""
    from fedge.protocol.secagg import quantize, to_ring

    p = plan.params
    q = quantize(plan.flatten(update), p.clip, p.bits, rng)
    scale = p.clip / ((1 << (p.bits - 1)) - 1)
    sent = plan.unflatten(q.astype(np.float64) * scale)
    return Sealed(to_ring(q, p.k), {k: np.asarray(v, np.float32) for k, v in sent.items()})


# -- homomorphic encryption (docs/homomorphic-encryption.md) ---------------------------------


def encrypt(
    update: Weights, keys: HeKeys, num_samples: int, cfg: TrainingConfig
) -> dict[str, np.ndarray]:
    """Under HE, instead of ``encode``: the whole update (no codec, so nothing is left over
    for a residual) encrypted as ``weight * update``, the one uint8 tensor an update carries.
    ``weight`` is what the aggregator weighs the update with: the sample count, or 1 under
    differential privacy (it cannot re-weight a ciphertext). The gate runs before as it does
    without HE: an update it holds back is a trained skip, kept here as the residual."""
    from fedge.protocol.he import as_tensors, encrypt_update

    weight = 1 if cfg.privacy is not None else num_samples
    return as_tensors(encrypt_update(keys, update, weight))

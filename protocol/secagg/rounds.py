"""What both sides of a secure round derive from its announcement (pure, no I/O).

The aggregator announces ``TrainingConfig.secure`` (``SecureSettings``: seed, threshold,
degree, bits, clip) and the selected devices; from those, the model's tensor shapes and the
round's codec, every party builds the same ``SecureRound``: the protocol parameters
(``SecAggParams``), the order in which a model's tensors become one vector (by name), and,
under a top-k codec, the round's shared index set (``ring.shared_indices``: random-k, the
same positions on every device, so the masks cancel)::

    vector  = flatten(update)[indices]           device: quantise, mask, send
    sum     = scatter(dequantised sum, indices)  aggregator: back to tensors

The aggregator's messages on ``secagg/{device}`` and ``secagg`` are signed (kind
``secagg``) over ``address(device, message)``: the device's id (empty for every device), a
zero byte, then the ``wire`` message, so a message for one device cannot be replayed to
another.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from ..codecs import CodecSpec
from ..messages import SecureSettings
from .errors import SecAggError
from .params import SecAggParams, default_threshold
from .ring import shared_indices
from .wire import MAGIC


@dataclass(frozen=True)
class SecureRound:
    params: SecAggParams
    names: tuple[str, ...]  # tensor order in the vector
    shapes: dict[str, tuple[int, ...]]
    indices: np.ndarray | None  # the shared index set under top-k; None: every entry

    @property
    def size(self) -> int:
        return sum(int(np.prod(s)) for s in self.shapes.values())

    def flatten(self, tensors: Mapping[str, np.ndarray]) -> np.ndarray:
        """The round's vector of ``tensors`` (float64): every entry, or the shared ones."""
        flat = np.concatenate(
            [np.asarray(tensors[n], np.float64).ravel() for n in self.names] or [np.zeros(0)]
        )
        return flat if self.indices is None else flat[self.indices]

    def unflatten(self, vector: np.ndarray) -> dict[str, np.ndarray]:
        """Tensors (float64) from a vector of the round's length; zeros off the index set."""
        if self.indices is None:
            flat = np.asarray(vector, np.float64)
        else:
            flat = np.zeros(self.size, np.float64)
            flat[self.indices] = vector
        out, at = {}, 0
        for name in self.names:
            n = int(np.prod(self.shapes[name]))
            out[name] = flat[at : at + n].reshape(self.shapes[name])
            at += n
        return out


def secure_round(
    fleet: str,
    round_id: int,
    devices: Sequence[str],
    settings: SecureSettings,
    shapes: Mapping[str, Sequence[int]],
    codec: CodecSpec,
) -> SecureRound:
    """The round every party derives from the announcement (``codec``: the round's codec
    with its top-k fraction already raised to the minimum entries). SecAggError
    ("bad_params") when the announcement does not make a valid round (too few devices, a
    threshold above the holders, an odd degree, a ring over 32 bits).

    The last round derived is kept: the parameters are immutable, and a process that
    plays many devices (``fedge sim``, ``fedge fleet launch --agents-per-process``) builds
    the round's graph once instead of once per device."""
    dims = tuple((n, tuple(int(d) for d in shapes[n])) for n in sorted(shapes))
    return _derive(fleet, round_id, tuple(devices), settings, dims, codec)


@functools.lru_cache(maxsize=1)  # one round at a time is open
def _derive(
    fleet: str,
    round_id: int,
    devices: tuple[str, ...],
    settings: SecureSettings,
    shapes: tuple[tuple[str, tuple[int, ...]], ...],
    codec: CodecSpec,
) -> SecureRound:
    dims = dict(shapes)
    order = tuple(dims)
    size = sum(int(np.prod(d)) for d in dims.values())
    indices = None
    length = size
    if codec.fraction is not None:
        length = codec.topk_count(size)
        if length < size:
            indices = shared_indices(bytes.fromhex(settings.seed), size, length)
    members = tuple(sorted(set(devices)))
    degree = settings.degree
    if degree is not None and degree >= len(members) - 1:
        degree = None  # the complete graph
    holders = len(members) if degree is None else degree + 1
    try:
        params = SecAggParams(
            fleet=fleet,
            round_id=round_id,
            seed=settings.seed,
            devices=members,
            threshold=settings.threshold or default_threshold(holders),
            degree=degree,
            bits=settings.bits,
            clip=settings.clip,
            length=max(1, length),
        )
    except ValueError as exc:
        raise SecAggError("bad_params", f"round {round_id}: {exc}") from None
    return SecureRound(params, order, dims, indices)


def is_secagg(payload: bytes) -> bool:
    """A secure-aggregation stage message (not an update envelope or a skip notice)."""
    return bytes(payload[:3]) == MAGIC


def address(device: str, message: bytes) -> bytes:
    """What the aggregator signs: the device a message is for ("" for all), then it."""
    return device.encode() + b"\0" + message


def addressed(data: bytes, device: str) -> bytes:
    """The message of ``address(device or "", message)``; SecAggError("unknown_device") if
    it is for another device."""
    name, sep, message = bytes(data).partition(b"\0")
    if not sep or name not in (b"", device.encode()):
        raise SecAggError("unknown_device", "a secure-aggregation message for another device")
    return message

"""The public parameters of one secure round, and what every party derives from them.

They would travel in the round announcement (signed, as the secure-fleet work signs rounds);
until the wiring lands they are built by whoever runs the round. Every party checks them the
same way, and derives the same graph, ring and device positions from them.
"""

from __future__ import annotations

from functools import cached_property
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, model_validator

from ..topics import ID_PATTERN
from . import graph
from .crypto import round_context
from .ring import ring_bits
from .shamir import MAX_HOLDERS

Id = Annotated[str, StringConstraints(pattern=ID_PATTERN)]
MAX_LENGTH = 16_000_000  # entries of a masked vector (the codec's per-tensor bound)


def default_threshold(holders: int) -> int:
    """A strict majority of a device's share holders (its neighbours and itself): tolerates
    just under half of them dropping, and no two disjoint groups can both reconstruct."""
    return holders // 2 + 1


class SecAggParams(BaseModel):
    """One round: who takes part (sorted; a device's position + 1 is its Shamir x), the
    threshold t, the graph's degree k (None: complete), the quantisation and the vector."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    fleet: Id
    round_id: int = Field(ge=0, lt=2**63)
    seed: str = Field(pattern="^[0-9a-f]{64}$")  # 32 bytes in hex: public, fresh each round
    devices: tuple[Id, ...] = Field(min_length=2, max_length=MAX_HOLDERS - 1)
    threshold: int = Field(ge=2)
    degree: int | None = Field(default=None, ge=2)
    bits: int = Field(default=8, ge=2, le=24)
    clip: float = Field(gt=0)
    length: int = Field(ge=1, le=MAX_LENGTH)

    @model_validator(mode="after")
    def _check(self) -> SecAggParams:
        if list(self.devices) != sorted(set(self.devices)):
            raise ValueError("devices must be sorted and distinct")
        if self.degree is not None and self.degree % 2:
            raise ValueError(f"a sparse graph's degree is even, not {self.degree}")
        if self.threshold > self.holders_count:
            raise ValueError(
                f"threshold {self.threshold} above the {self.holders_count} holders of a share"
            )
        ring_bits(self.bits, len(self.devices))  # ValueError if the sum cannot fit 32 bits
        return self

    @property
    def holders_count(self) -> int:
        """Holders of each device's shares: its neighbours and itself."""
        n = len(self.devices)
        return n if self.degree is None or self.degree >= n - 1 else self.degree + 1

    @property
    def k(self) -> int:
        """Bits of the ring Z_{2^k} (``ring.ring_bits``)."""
        return ring_bits(self.bits, len(self.devices))

    @property
    def seed_bytes(self) -> bytes:
        return bytes.fromhex(self.seed)

    @property
    def context(self) -> bytes:
        return round_context(self.fleet, self.round_id, self.seed_bytes)

    @cached_property
    def position(self) -> dict[str, int]:
        return {d: i for i, d in enumerate(self.devices)}

    @cached_property
    def graph(self) -> dict[str, tuple[str, ...]]:
        return graph.neighbours(self.devices, self.seed_bytes, self.degree)

    @cached_property
    def _holders(self) -> dict[str, tuple[str, ...]]:
        at = self.position.__getitem__
        return {d: tuple(sorted((*near, d), key=at)) for d, near in self.graph.items()}

    def holders(self, device: str) -> tuple[str, ...]:
        """Who holds ``device``'s shares: its neighbours and itself, in device order."""
        return self._holders[device]

    def x(self, device: str) -> int:
        """The device's Shamir x coordinate."""
        return self.position[device] + 1

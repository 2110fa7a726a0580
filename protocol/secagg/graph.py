"""Who shares masks and keys with whom: the complete graph, or SecAgg+'s sparse one (pure).

Bonawitz et al. (CCS 2017) pair every device with every other: O(N) keys, shares and masks
per device, O(N^2) for the aggregator. SecAgg+ (Bell et al., CCS 2020) pairs each device
with k neighbours of a k-regular random graph, O(log N) in their analysis. Ours is the
random Harary graph of Bell et al. (as Flower builds it): the round's devices in a random
order, each joined to the k/2 before and the k/2 after it on the ring (k even).

The order is public and the same for everyone: devices sorted by SHA-256(round seed, id).
The round seed comes with the round announcement, so the aggregator picks it; that is fine
against an honest-but-curious aggregator. A malicious one could grind seeds for a graph it
likes (Bell et al. derive it jointly); that is one of the things docs/secure-aggregation.md
lists as not protected.

The aggregator learns the sum over each connected part of the surviving devices' graph, so
a round whose survivors' graph falls apart is aborted (``connected``) before any unmasking.
"""

from __future__ import annotations

import hashlib
from collections.abc import Collection, Mapping, Sequence

from .crypto import field


def ring_order(devices: Sequence[str], seed: bytes) -> list[str]:
    """The round's devices in their public random order."""
    return sorted(devices, key=lambda d: hashlib.sha256(field(seed) + field(d)).digest())


def neighbours(
    devices: Sequence[str], seed: bytes, degree: int | None
) -> dict[str, tuple[str, ...]]:
    """Each device's neighbours (itself excluded), in the order of ``devices``. ``degree``
    None (or >= len(devices) - 1) is the complete graph; otherwise an even k >= 2."""
    n = len(devices)
    if degree is None or degree >= n - 1:
        return {d: tuple(x for x in devices if x != d) for d in devices}
    if degree < 2 or degree % 2:
        raise ValueError(f"a sparse graph has an even degree >= 2, not {degree}")
    ring = ring_order(devices, seed)
    position = {d: i for i, d in enumerate(devices)}
    half = degree // 2
    out = {}
    for i, d in enumerate(ring):
        near = {ring[(i + j) % n] for j in range(-half, half + 1) if j}
        out[d] = tuple(sorted(near, key=position.__getitem__))
    return {d: out[d] for d in devices}


def connected(nodes: Collection[str], graph: Mapping[str, Sequence[str]]) -> bool:
    """Whether ``nodes`` form one connected part of ``graph`` restricted to them."""
    alive = set(nodes)
    if not alive:
        return True
    start = next(iter(alive))
    seen = {start}
    todo = [start]
    while todo:
        for v in graph[todo.pop()]:
            if v in alive and v not in seen:
                seen.add(v)
                todo.append(v)
    return seen == alive

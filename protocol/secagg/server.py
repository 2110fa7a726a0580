"""The aggregator's side of secure aggregation: a state machine with no I/O.

Messages of each stage are added one by one as they arrive (``add_*``; a bad one raises
``SecAggError`` with a reason, and that device then simply counts as a dropout); the stage is
closed when all are in or its deadline passes (``close_*``), which returns what to send next::

    add_advertise ... close_advertise() -> {device: KEYS}       U1: who advertised keys
    add_shares    ... close_shares()    -> {device: FORWARD}    U2: who sent their shares
    add_masked / add_skip ... close_masked() -> SURVIVORS       U3: who sent a masked input
    add_unmask    ... finish()          -> the sum in Z_{2^k}   U4: who answered the unmask

The masked inputs are folded into one running sum as they arrive; no single input is kept,
and no single input can be unmasked: a device's self mask b_u is only reconstructed when it
survived, its pairwise masks only when it dropped, and the devices refuse to help with both.
A device that skips (the upload gate) is a dropout after share-keys: its pairwise masks are
removed through its s seed, and its input is not in the sum.

Each close checks that the round can still finish (every device whose secrets will be
needed keeps at least t holders of its shares, and the survivors' graph is connected) and
raises ``SecAggAbort`` otherwise: nothing of the round may then be used. With the complete
graph every device's KEYS message is the same bytes, so the wiring can publish it once.
"""

from __future__ import annotations

from enum import Enum
from typing import NoReturn

import numpy as np
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from . import crypto, shamir, wire
from .errors import SecAggAbort, SecAggError
from .graph import connected
from .params import SecAggParams
from .ring import packed_size, unpack
from .wire import Kind


class Stage(Enum):
    ADVERTISE = "advertise"
    SHARES = "shares"
    MASKED = "masked"
    UNMASK = "unmask"
    DONE = "done"
    ABORTED = "aborted"


class SecAggServer:
    def __init__(self, params: SecAggParams) -> None:
        self.params = params
        self.stage = Stage.ADVERTISE
        self._context = params.context
        self._probe = X25519PrivateKey.generate()  # tests advertised keys for low order
        self._keys: dict[str, tuple[bytes, bytes]] = {}
        self._seen_keys: set[bytes] = set()
        self._inbox: dict[str, dict[str, bytes]] = {}  # recipient -> sender -> ciphertext
        self._shared: set[str] = set()
        self.u1: frozenset[str] = frozenset()
        self.u2: frozenset[str] = frozenset()
        self.u3: frozenset[str] = frozenset()
        self._masked: set[str] = set()
        self.skipped: set[str] = set()
        self._sum = np.zeros(params.length, dtype=np.uint32)
        self._needed: list[str] = []
        self._answers: dict[str, dict[str, np.ndarray]] = {}  # responder -> device -> share

    # -- who answered the stage that is open ---------------------------------------------------

    @property
    def advertised(self) -> frozenset[str]:
        return frozenset(self._keys)

    @property
    def shared(self) -> frozenset[str]:
        return frozenset(self._shared)

    @property
    def masked(self) -> frozenset[str]:
        return frozenset(self._masked)

    @property
    def unmasked(self) -> frozenset[str]:
        return frozenset(self._answers)

    # -- stage 0: advertise keys ----------------------------------------------------------------

    def add_advertise(self, device: str, payload: bytes) -> None:
        self._expect(Stage.ADVERTISE, device)
        if device in self._keys:
            raise SecAggError("duplicate", f"{device} advertised twice")
        data = wire.body(payload, Kind.ADVERTISE, self.params.round_id, wire.KEYS_BYTES)
        c, s = data[: crypto.KEY_BYTES], data[crypto.KEY_BYTES :]
        if c == s or c in self._seen_keys or s in self._seen_keys:
            raise SecAggError("bad_key", f"{device} advertised a key already in use")
        crypto.agree(self._probe, c)  # bad_key for a low-order point
        crypto.agree(self._probe, s)
        self._keys[device] = (c, s)
        self._seen_keys.update((c, s))

    def close_advertise(self) -> dict[str, bytes]:
        self._expect(Stage.ADVERTISE)
        self.u1 = frozenset(self._keys)
        self._check_holders(self.u1, self.u1, "advertised keys")
        out = {}
        for u in sorted(self.u1):
            holders = self.params.holders(u)
            flags = [h in self.u1 for h in holders]
            parts = [self._keys[h][0] + self._keys[h][1] for h in holders if h in self.u1]
            out[u] = wire.with_bitmap(Kind.KEYS, self.params.round_id, flags, parts)
        self.stage = Stage.SHARES
        return out

    # -- stage 1: share keys ------------------------------------------------------------------

    def add_shares(self, device: str, payload: bytes) -> None:
        self._expect(Stage.SHARES, device, within=self.u1)
        if device in self._shared:
            raise SecAggError("duplicate", f"{device} sent its shares twice")
        recipients = [h for h in self.params.holders(device) if h in self.u1 and h != device]
        data = wire.body(
            payload, Kind.SHARES, self.params.round_id, wire.CIPHERTEXT_BYTES * len(recipients)
        )
        for h, ct in zip(recipients, wire.items(data, wire.CIPHERTEXT_BYTES), strict=True):
            self._inbox.setdefault(h, {})[device] = ct
        self._shared.add(device)

    def close_shares(self) -> dict[str, bytes]:
        self._expect(Stage.SHARES)
        self.u2 = frozenset(self._shared)
        self._check_holders(self.u2, self.u2, "shared keys")
        out = {}
        for v in sorted(self.u2):
            box = self._inbox.get(v, {})
            holders = self.params.holders(v)
            flags = [h in self.u2 and h in box for h in holders]
            parts = [box[h] for h, f in zip(holders, flags, strict=True) if f]
            out[v] = wire.with_bitmap(Kind.FORWARD, self.params.round_id, flags, parts)
        self._inbox.clear()
        self.stage = Stage.MASKED
        return out

    # -- stage 2: masked inputs ---------------------------------------------------------------

    def add_masked(self, device: str, payload: bytes) -> None:
        p = self.params
        self._expect(Stage.MASKED, device, within=self.u2)
        if device in self._masked or device in self.skipped:
            raise SecAggError("duplicate", f"{device} already answered this stage")
        data = wire.body(payload, Kind.MASKED, p.round_id, packed_size(p.length, p.k))
        self._sum += unpack(data, p.k, p.length)  # wraps mod 2^32; reduced mod 2^k at the end
        self._masked.add(device)

    def add_skip(self, device: str) -> None:
        """A device that decided not to upload: a dropout from here on."""
        self._expect(Stage.MASKED, device, within=self.u2)
        if device in self._masked or device in self.skipped:
            raise SecAggError("duplicate", f"{device} already answered this stage")
        self.skipped.add(device)

    def close_masked(self) -> bytes:
        p = self.params
        self._expect(Stage.MASKED)
        self.u3 = frozenset(self._masked)
        if len(self.u3) < p.threshold:
            self._abort("too_few", f"{len(self.u3)} masked inputs, threshold {p.threshold}")
        if not connected(self.u3, p.graph):
            self._abort("disconnected", "the survivors' graph is split: partial sums would leak")
        dropped = self.u2 - self.u3
        self._needed = [
            u
            for u in p.devices
            if u in self.u3 or (u in dropped and any(v in self.u3 for v in p.graph[u]))
        ]
        # Holders of u's shares: u and its neighbours in U2; those that may answer are in U3.
        for u in self._needed:
            alive = sum(1 for h in p.holders(u) if h in self.u2 and h in self.u3)
            if alive < p.threshold:
                self._abort("too_few", f"{u}: {alive} holders survived, threshold {p.threshold}")
        self.stage = Stage.UNMASK
        return wire.header(Kind.SURVIVORS, p.round_id) + wire.bitmap(
            [d in self.u3 for d in p.devices]
        )

    # -- stage 3: unmask ----------------------------------------------------------------------

    def add_unmask(self, device: str, payload: bytes) -> None:
        self._expect(Stage.UNMASK, device, within=self.u3)
        if device in self._answers:
            raise SecAggError("duplicate", f"{device} answered the unmask twice")
        held_from = [h for h in self.params.holders(device) if h in self.u2]
        data = wire.body(
            payload, Kind.UNMASK, self.params.round_id, shamir.SHARE_BYTES * len(held_from)
        )
        shares = [shamir.decode_share(b) for b in wire.items(data, shamir.SHARE_BYTES)]
        self._answers[device] = dict(zip(held_from, shares, strict=True))

    def finish(self) -> np.ndarray:
        """The sum of the survivors' inputs in Z_{2^k} (uint32); ``u3`` says whose."""
        p = self.params
        self._expect(Stage.UNMASK)
        k, n = p.k, p.length
        coefficients: dict[tuple[int, ...], np.ndarray] = {}
        secrets: dict[str, bytes] = {}
        for u in self._needed:
            responders = [h for h in p.holders(u) if h in self._answers and u in self._answers[h]]
            if len(responders) < p.threshold:
                self._abort(
                    "too_few", f"{u}: {len(responders)} holders answered, threshold {p.threshold}"
                )
            # Two different sets of t shares must agree (when more than t answered): a bad
            # share is detected (not corrected), and the round aborts instead of yielding a
            # wrong sum. A dropout's s seed is checked against its advertised key below.
            found = {
                self._reconstruct(u, chosen, coefficients)
                for chosen in {tuple(responders[: p.threshold]), tuple(responders[-p.threshold :])}
            }
            if len(found) != 1:
                self._abort("bad_share", f"{u}: two sets of shares give different secrets")
            secrets[u] = found.pop()
        total = self._sum
        for u in self._needed:
            if u in self.u3:
                total -= crypto.prg(crypto.self_mask_key(secrets[u], self._context, u), n, k)
                continue
            s_key = crypto.mask_key(secrets[u], self._context)
            if crypto.public_bytes(s_key) != self._keys[u][1]:
                self._abort(
                    "bad_share", f"{u}: the reconstructed mask key is not the one advertised"
                )
            for v in p.graph[u]:
                if v not in self.u3:
                    continue
                shared = crypto.agree(s_key, self._keys[v][1])
                mask = crypto.prg(crypto.pair_mask_key(shared, self._context, v, u), n, k)
                if p.x(v) < p.x(u):  # v added +mask, so take it off; else v subtracted it
                    total -= mask
                else:
                    total += mask
        total &= np.uint32((1 << k) - 1) if k < 32 else np.uint32(0xFFFFFFFF)
        self._answers.clear()
        self.stage = Stage.DONE
        return total

    # -- helpers ------------------------------------------------------------------------------

    def _reconstruct(
        self, u: str, holders: tuple[str, ...], cache: dict[tuple[int, ...], np.ndarray]
    ) -> bytes:
        xs = tuple(self.params.x(h) for h in holders)
        if xs not in cache:
            cache[xs] = shamir.lagrange_at_zero(np.array(xs))
        shares = np.stack([self._answers[h][u] for h in holders])
        try:
            return shamir.from_field(shamir.combine(shares, cache[xs]))
        except SecAggError as exc:
            self._abort("bad_share", f"{u}: {exc}")

    def _expect(
        self, stage: Stage, device: str | None = None, within: frozenset[str] | None = None
    ) -> None:
        if self.stage is not stage:
            raise SecAggError(
                "wrong_stage", f"the round is at {self.stage.value}, not {stage.value}"
            )
        if device is not None and (
            device not in self.params.position or (within is not None and device not in within)
        ):
            raise SecAggError("unknown_device", f"{device} has no part in this stage")

    def _check_holders(self, devices: frozenset[str], alive: frozenset[str], what: str) -> None:
        p = self.params
        if len(devices) < p.threshold:
            self._abort("too_few", f"{len(devices)} devices {what}, threshold {p.threshold}")
        for u in devices:
            count = sum(1 for h in p.holders(u) if h in alive)
            if count < p.threshold:
                self._abort("too_few", f"{u}: {count} holders {what}, threshold {p.threshold}")

    def _abort(self, reason: str, message: str) -> NoReturn:
        self.stage = Stage.ABORTED
        self._inbox.clear()
        self._answers.clear()
        raise SecAggAbort(reason, message)

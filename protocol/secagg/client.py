"""The device's side of secure aggregation: a state machine with no I/O.

One ``SecAggClient`` per device and round, its methods called in order as the aggregator's
messages arrive; each returns the bytes to publish (``wire`` has the layouts)::

    advertise()              -> ADVERTISE   two fresh X25519 public keys (c: shares, s: masks)
    share_keys(KEYS)         -> SHARES      Shamir shares of b_u and of the s seed, one
                                            encrypted pair per neighbour that advertised
    receive_shares(FORWARD)                 the neighbours' encrypted shares, kept for unmask
    masked_input(x)          -> MASKED      y = x + PRG(b_u) + sum_v +-PRG(s_uv)  mod 2^k
    unmask(SURVIVORS)        -> UNMASK      for each neighbour: its b share if it survived,
                                            its s-seed share if it dropped; never both

The checks that keep the aggregator from unmasking one device's input are here, where the
secrets are: a neighbour is never revealed both ways (one answer per round; survivors and
dropouts are one bitmap, so they are disjoint), survivors must be among those who shared
keys with us, at least t of our holders must survive, and the survivors' graph must be
connected (else the aggregator would learn partial sums). Any ``SecAggError`` leaves the
client ``aborted``: it forgets its secrets and answers nothing more this round.

Randomness (key pairs, seeds, polynomial coefficients) comes from ``random_bytes``, the OS's
by default; tests pass a seeded one.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from enum import Enum
from typing import TypeVar

import numpy as np
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from . import crypto, shamir, wire
from .errors import SecAggAbort, SecAggError
from .graph import connected
from .params import SecAggParams
from .ring import pack
from .wire import Kind

T = TypeVar("T")


class Stage(Enum):
    NEW = "new"
    ADVERTISED = "advertised"
    SHARED = "shared"
    READY = "ready"  # holds its neighbours' shares; may mask
    MASKED = "masked"
    DONE = "done"
    ABORTED = "aborted"


class SecAggClient:
    def __init__(
        self,
        params: SecAggParams,
        device: str,
        *,
        random_bytes: crypto.RandomBytes = os.urandom,
    ) -> None:
        if device not in params.position:
            raise SecAggError("unknown_device", f"{device} is not in round {params.round_id}")
        self.params = params
        self.device = device
        self.stage = Stage.NEW
        self._random = random_bytes
        self._holders = params.holders(device)
        self._context = params.context
        self._c: X25519PrivateKey | None = None
        self._s: X25519PrivateKey | None = None
        self._b = self._s_seed = b""
        self._keys: dict[str, tuple[bytes, bytes]] = {}
        self._shared_c: dict[str, bytes] = {}
        self._held: dict[str, np.ndarray] = {}  # holder's (b, s-seed) shares of each sender
        self._senders: tuple[str, ...] = ()

    # -- stages -------------------------------------------------------------------------------

    def advertise(self) -> bytes:
        self._expect(Stage.NEW)
        self._c = crypto.encryption_key(self._random)
        self._s_seed = self._random(crypto.SEED_BYTES)
        self._s = crypto.mask_key(self._s_seed, self._context)
        self._b = self._random(crypto.SEED_BYTES)
        self.stage = Stage.ADVERTISED
        own = crypto.public_bytes(self._c) + crypto.public_bytes(self._s)
        return wire.header(Kind.ADVERTISE, self.params.round_id) + own

    def share_keys(self, payload: bytes) -> bytes:
        return self._guarded(Stage.ADVERTISED, lambda: self._share_keys(payload))

    def receive_shares(self, payload: bytes) -> None:
        self._guarded(Stage.SHARED, lambda: self._receive_shares(payload))

    def masked_input(self, x: np.ndarray) -> bytes:
        """``x``: this device's quantised update in the ring (``ring.to_ring``), ``length``
        entries below 2^k. A device that skips the round calls nothing and sends its skip
        notice instead: the aggregator counts it as a dropout."""
        return self._guarded(Stage.READY, lambda: self._masked_input(x))

    def unmask(self, payload: bytes) -> bytes:
        return self._guarded(Stage.MASKED, lambda: self._unmask(payload))

    def abort(self) -> None:
        """Forget every secret of this round; nothing more will be answered."""
        self.stage = Stage.ABORTED
        self._c = self._s = None
        self._b = self._s_seed = b""
        self._held.clear()
        self._shared_c.clear()

    # -- the work -----------------------------------------------------------------------------

    def _share_keys(self, payload: bytes) -> bytes:
        p = self.params
        flags, parts = wire.read_with_bitmap(
            payload, Kind.KEYS, p.round_id, len(self._holders), wire.KEYS_BYTES
        )
        present = [h for h, f in zip(self._holders, flags, strict=True) if f]
        keys = {
            h: (part[: crypto.KEY_BYTES], part[crypto.KEY_BYTES :])
            for h, part in zip(present, parts, strict=True)
        }
        assert self._c is not None and self._s is not None
        own = (crypto.public_bytes(self._c), crypto.public_bytes(self._s))
        if keys.get(self.device) != own:
            raise SecAggError("bad_keylist", "the key list does not hold this device's own keys")
        every = [k for pair in keys.values() for k in pair]
        if len(set(every)) != len(every):
            raise SecAggError("bad_key", "the key list repeats a public key")
        if len(present) < p.threshold:
            raise SecAggAbort(
                "too_few", f"{len(present)} holders advertised, threshold {p.threshold}"
            )
        secrets = np.stack([shamir.to_field(self._b), shamir.to_field(self._s_seed)])
        xs = np.array([p.x(h) for h in present])
        shares = shamir.split(secrets, xs, p.threshold, self._random)  # (holders, 2, 5)
        shared = {h: crypto.agree(self._c, keys[h][0]) for h in present if h != self.device}
        out = []
        for h, share in zip(present, shares, strict=True):
            if h == self.device:
                self._held[h] = share
                continue
            plaintext = shamir.encode_share(share[0]) + shamir.encode_share(share[1])
            out.append(crypto.encrypt_share(shared[h], self._context, self.device, h, plaintext))
        self._keys, self._shared_c = keys, shared
        self.stage = Stage.SHARED
        return wire.header(Kind.SHARES, p.round_id) + b"".join(out)

    def _receive_shares(self, payload: bytes) -> None:
        p = self.params
        flags, cts = wire.read_with_bitmap(
            payload, Kind.FORWARD, p.round_id, len(self._holders), wire.CIPHERTEXT_BYTES
        )
        senders = tuple(h for h, f in zip(self._holders, flags, strict=True) if f)
        if self.device in senders or not set(senders) <= set(self._shared_c):
            raise SecAggError("bad_bitmap", "shares from a device that was not in the key list")
        if len(senders) + 1 < p.threshold:
            raise SecAggAbort(
                "too_few", f"{len(senders) + 1} holders shared, threshold {p.threshold}"
            )
        held = {}
        for h, ct in zip(senders, cts, strict=True):
            plaintext = crypto.decrypt_share(self._shared_c[h], self._context, h, self.device, ct)
            share = shamir.SHARE_BYTES
            held[h] = np.stack(
                [shamir.decode_share(plaintext[:share]), shamir.decode_share(plaintext[share:])]
            )
        self._held.update(held)
        self._senders = senders
        self.stage = Stage.READY

    def _masked_input(self, x: np.ndarray) -> bytes:
        p = self.params
        k = p.k
        x = np.asarray(x)
        if (
            x.shape != (p.length,)
            or x.dtype.kind not in "iu"
            or (x.size and (x.min() < 0 or x.max() >= 1 << k))
        ):
            raise ValueError(f"a masked input is {p.length} ring elements in [0, 2^{k})")
        y = x.astype(np.uint32)  # uint32 wraps mod 2^32, a multiple of 2^k: masked at the end
        y += crypto.prg(crypto.self_mask_key(self._b, self._context, self.device), p.length, k)
        assert self._s is not None
        mine = p.x(self.device)
        for h in self._senders:
            shared = crypto.agree(self._s, self._keys[h][1])
            mask = crypto.prg(
                crypto.pair_mask_key(shared, self._context, self.device, h), p.length, k
            )
            if mine < p.x(h):
                y += mask
            else:
                y -= mask
        y &= np.uint32((1 << k) - 1) if k < 32 else np.uint32(0xFFFFFFFF)
        self.stage = Stage.MASKED
        return wire.header(Kind.MASKED, p.round_id) + pack(y, k)

    def _unmask(self, payload: bytes) -> bytes:
        p = self.params
        data = wire.body(payload, Kind.SURVIVORS, p.round_id, wire.bitmap_size(len(p.devices)))
        alive = wire.read_bitmap(data, len(p.devices))
        survivors = {d for d, f in zip(p.devices, alive, strict=True) if f}
        if self.device not in survivors:
            raise SecAggError("bad_bitmap", "survivors without this device, which sent its input")
        near = set(self._holders)
        shared_with = set(self._senders) | {self.device}
        if (survivors & near) - shared_with:
            raise SecAggError("bad_bitmap", "a survivor that never shared keys with this device")
        if len(survivors & near) < p.threshold:
            raise SecAggAbort(
                "too_few", f"{len(survivors & near)} holders survived, threshold {p.threshold}"
            )
        if not connected(survivors, p.graph):
            raise SecAggAbort(
                "disconnected", "the survivors' graph is split: partial sums would leak"
            )
        out = []
        for h in self._holders:
            if h in shared_with:
                # b_u of a survivor, or the s seed of a dropout: exactly one of the two, once.
                out.append(shamir.encode_share(self._held[h][0 if h in survivors else 1]))
        self.abort()  # nothing more to answer this round
        self.stage = Stage.DONE
        return wire.header(Kind.UNMASK, p.round_id) + b"".join(out)

    # -- helpers ------------------------------------------------------------------------------

    def _expect(self, stage: Stage) -> None:
        if self.stage is not stage:
            raise SecAggError(
                "wrong_stage", f"{self.device} is {self.stage.value}, not {stage.value}"
            )

    def _guarded(self, stage: Stage, step: Callable[[], T]) -> T:
        self._expect(stage)
        try:
            return step()
        except SecAggError:
            self.abort()
            raise

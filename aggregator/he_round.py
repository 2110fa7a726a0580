"""Homomorphic encryption on the aggregator (docs/homomorphic-encryption.md): it adds
ciphertexts and keeps the global model only as ciphertexts, with the fleet's PUBLIC key.

::

    intake (an update)  parse -> validate -> take: its count within the caps, then
                        HeSum.check (the payload whole, its weight = the declared count)
                        -> kept in the store -> HeAccumulator.add (folded into S)
    intake (a skip)     parse -> validate -> take: its count within the caps
                        -> a trained skip is HeAccumulator.hold: HeSum.add_zero (W only)
    close               E_t = apply_sum(E_{t-1}, S, values, server_lr)   HeModel.advance
    publish             GlobalModelHeader + E_t (one uint8 tensor), retained and signed

The coordinator (``coordinator.py``) calls these at a few marked places. What it holds as
``weights`` under HE is a template of zeros in the model's shapes (it sizes the round's
sum and the expected update); the store's ``models`` table keeps that template for each
version and ``he_models`` (here) its ciphertexts, written in the same transaction. A
restart resumes from the newest E_t, and an open round folds its kept ciphertexts in again.

What HE takes away (each said once in the log, and in ``rounds.jsonl`` under ``he``): the
held-out evaluation (the model cannot be read: the devices' federated evaluation remains),
clipping sample counts relative to the round's median (a count is fixed inside its
ciphertext: only the fixed caps apply, and a count over one is refused), robust combiners
and server optimisers (refused by the config).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping

import numpy as np
from fedge.protocol import SkipNotice, UpdateHeader
from fedge.protocol.he import (
    KIND_MODEL,
    CheckedUpdate,
    HeError,
    HeKeys,
    HeSum,
    apply_sum,
    as_tensors,
    encrypt_model,
    from_tensors,
    read_payload,
)

from .accumulate import RoundAnswers
from .store import Store, StoreError

log = logging.getLogger("fedge.aggregator")

Weights = Mapping[str, np.ndarray]
KEEP = 3  # encrypted models kept (as the coordinator's KEEP_MODELS)
SCHEMA = """
CREATE TABLE IF NOT EXISTS he_models (
    version  INTEGER PRIMARY KEY,    -- the models row of the same version holds zeros
    payload  BLOB NOT NULL           -- E_t: a fedge.protocol.he "model" payload
);
"""
SUMMARY = {
    "encrypted": True,
    "server_eval": "not possible: the aggregator holds the model encrypted (see fed_eval)",
}


class HeAccumulator(RoundAnswers):
    """A round's encrypted running sum S and total weight W (``HeSum``); O(model) memory."""

    keeps_deltas = False

    def __init__(self, keys: HeKeys, values: int) -> None:
        super().__init__()
        self.sum = HeSum(keys, values)
        self._checked: dict[str, tuple[bytes, CheckedUpdate]] = {}

    def check(self, device: str, tensors: Weights, weight: int) -> dict[str, np.ndarray]:
        """The update's payload whole (HeError with a reason otherwise), held for ``add``;
        returns what the store keeps of it (its tensors)."""
        payload = from_tensors(tensors)
        self._checked[device] = (payload, self.sum.check(payload, weight=weight))
        return as_tensors(payload)

    def add(self, device: str, delta: Weights, n: int) -> None:
        """Fold in an update (the one ``check`` just passed, or one kept, on a resume)."""
        if device in self.declared:
            raise ValueError(f"{device} is already in the round")
        payload = from_tensors(delta)
        held = self._checked.pop(device, None)
        if held is not None and held[0] == payload:
            checked = held[1]
        else:
            checked = self.sum.check(payload, weight=n)
        self.sum.add_checked(checked)
        self._enter(device, n, uploaded=True)

    def hold(self, device: str, n: int) -> None:
        """A device that trained and held its update back: its weight in W, nothing in S."""
        super().hold(device, n)
        self.sum.add_zero(n)

    def mean(
        self, used: Mapping[str, int], fetch: Callable[[str], Weights], combiner: object
    ) -> dict[str, np.ndarray]:
        raise TypeError("an encrypted sum has no plain mean: HeModel.advance moves the model")


class HeModel:
    """The global model E_t, and what the coordinator does with it under HE."""

    def __init__(self, keys: HeKeys, template: Weights, payload: bytes, server_lr: float) -> None:
        self.keys = keys
        self.template = {k: np.zeros(np.shape(w), np.float32) for k, w in template.items()}
        self.values = sum(int(np.size(w)) for w in template.values())
        self.payload = payload
        self.server_lr = server_lr

    def tensors(self) -> dict[str, np.ndarray]:
        """What the global topic carries after the header: E_t."""
        return as_tensors(self.payload)

    def accumulator(self) -> HeAccumulator:
        return HeAccumulator(self.keys, self.values)

    def take(
        self,
        acc: object,
        header: UpdateHeader | SkipNotice,
        tensors: Weights,
        weight: int,
        cap: int | None,
    ) -> tuple[dict[str, np.ndarray], str | None]:
        """The intake step under HE, after ``intake.validate``: (what the store keeps, None)
        or ({}, the reason it is refused). A count over ``cap`` is refused: a ciphertext
        cannot be re-weighted."""
        if cap is not None and header.num_samples > cap:
            return {}, "samples_over_cap"
        if isinstance(header, SkipNotice):
            return {}, None
        assert isinstance(acc, HeAccumulator)
        try:
            return acc.check(header.device_id, tensors, weight), None
        except HeError as exc:
            return {}, f"he_{exc.reason}"

    def advance(self, acc: object) -> dict[str, np.ndarray]:
        """E_t = E_{t-1} + server_lr * S / W, in place; returns the plain step the strategy
        then applies to the template: zeros (the model moved inside its ciphertexts)."""
        assert isinstance(acc, HeAccumulator)
        self.payload = apply_sum(
            self.keys, self.payload, acc.sum.to_bytes(), self.values, self.server_lr
        )
        return {k: np.zeros_like(w) for k, w in self.template.items()}

    def save(self, store: Store, version: int) -> None:
        """E_t as model ``version`` (inside the coordinator's transaction); the oldest go."""
        store.db.execute(
            "INSERT OR REPLACE INTO he_models(version, payload) VALUES (?, ?)",
            (version, self.payload),
        )
        store.db.execute("DELETE FROM he_models WHERE version<?", (version - KEEP + 1,))


def _stored(store: Store, version: int) -> bytes | None:
    exists = store.db.execute(
        "SELECT 1 FROM sqlite_master WHERE type='table' AND name='he_models'"
    ).fetchone()
    if exists is None:
        return None
    row = store.db.execute("SELECT payload FROM he_models WHERE version=?", (version,)).fetchone()
    return None if row is None else bytes(row[0])


def start(
    keys: HeKeys | None, store: Store, version: int, weights: Weights, server_lr: float | None
) -> HeModel | None:
    """The encrypted model at ``version`` (None without HE).

    From the store's ``he_models`` when it has that version; otherwise ``weights`` are the
    plain model the store holds (the shipped initial model at v0, or the last model before HE
    was turned on), encrypted now with the public key and kept. Without HE, a state whose
    model is encrypted is refused: its ``models`` row is a template of zeros.
    """
    stored = _stored(store, version)
    if keys is None:
        if stored is not None:
            raise StoreError(
                f"the global model v{version} in {store.path} is encrypted (homomorphic"
                " encryption) and this aggregator cannot decrypt it: configure [he] key_file"
                " again, or start afresh with `fedge aggregator --config CONFIG --reset-state`"
            )
        return None
    store.db.execute(SCHEMA)
    values = sum(int(np.size(w)) for w in weights.values())
    lr = 1.0 if server_lr is None else server_lr
    if stored is not None:
        try:
            read_payload(stored, keys, kind=KIND_MODEL, values=values)
        except HeError as exc:
            raise StoreError(
                f"the encrypted global model v{version} in {store.path} does not fit the"
                f" configured keys and model ({exc}): start afresh with --reset-state"
            ) from exc
        model = HeModel(keys, weights, stored, lr)
    else:
        model = HeModel(keys, weights, encrypt_model(keys, dict(weights)), lr)
        with store.transaction():
            model.save(store, version)
        if version > 0:
            log.warning(
                "homomorphic encryption turned on at model v%d: it is encrypted now; the plain"
                " copies of v%d and older leave the state as rounds go by",
                version,
                version,
            )
    log.info(
        "homomorphic encryption: the model is kept and published encrypted (%d values,"
        " server_lr %g); server-side evaluation is not possible, the devices' federated"
        " evaluation remains; sample counts over a fixed cap are refused, the median cap"
        " does not apply",
        values,
        lr,
    )
    return model


def cap_of(device: str, caps: Mapping[str, int], max_per_device: int) -> int | None:
    """The fixed cap on ``device``'s declared count: its own and the fleet-wide one."""
    limits = [c for c in (caps.get(device), max_per_device or None) if c is not None]
    return min(limits) if limits else None

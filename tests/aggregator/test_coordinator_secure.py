"""The round coordinator with secure aggregation ([secure]), over the in-memory link: devices
run the protocol's client (``SecAggClient``) by hand, so each test decides who answers which
stage. The aggregator only ever unmasks the sum: exact against the plain sum of the
quantised updates, with a third of the devices dropping after masking, with a device that
holds its update back, and a clean failure when too few are left."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from fedge.aggregator.config import AggregatorConfig
from fedge.protocol import (
    MemoryBroker,
    RoundAnnouncement,
    SkipNotice,
    UpdateHeader,
    encode,
    encode_skip,
    parse_codec,
)
from fedge.protocol.secagg import (
    SecAggClient,
    addressed,
    quantize,
    secure_round,
    to_ring,
)
from fedge.protocol.secagg.wire import Kind
from helpers import DIGITS_MODEL
from pydantic import ValidationError
from test_coordinator import Clock, Device, T, close_stores, make, pump, weights  # noqa: F401

pytestmark = pytest.mark.link

CLIP, BITS = 1.0, 8
Q = (1 << (BITS - 1)) - 1


class SecureDevice(Device):
    """A device that runs the client by hand: each stage is one call of the test."""

    def __init__(self, broker: MemoryBroker, device_id: str, value: float) -> None:
        super().__init__(broker, device_id)
        self.link.subscribe(T.secagg(device_id))
        self.link.subscribe(T.secagg_all)
        self.value = value
        self.client: SecAggClient | None = None
        self.q: np.ndarray | None = None  # the quantised update it sends

    def join(self) -> None:
        ann = self.last(RoundAnnouncement).msg  # type: ignore[union-attr]
        assert ann.config.secure is not None
        shapes = {k: v.shape for k, v in weights().items()}
        plan = secure_round(
            ann.fleet, ann.round_id, ann.selected, ann.config.secure, shapes, parse_codec("float32")
        )
        self.plan, self.round_id = plan, ann.round_id
        self.client = SecAggClient(plan.params, self.id)
        self.link.publish(T.update(self.id), self.client.advertise())

    def inbox(self, kind: Kind) -> bytes:
        """The aggregator's message of ``kind`` for this device (for it, or for all)."""
        found = None
        while (msg := self.link.get(0)) is not None:
            if msg.topic in (T.secagg(self.id), T.secagg_all):
                message = addressed(msg.payload, self.id)
                if message[4] == kind:
                    found = message
        assert found is not None, f"{self.id} got no {kind.name}"
        return found

    def share(self) -> None:
        assert self.client is not None
        self.link.publish(T.update(self.id), self.client.share_keys(self.inbox(Kind.KEYS)))

    def mask(self) -> None:
        assert self.client is not None
        self.client.receive_shares(self.inbox(Kind.FORWARD))
        update = {k: np.full(v.shape, self.value, np.float32) for k, v in weights().items()}
        rng = np.random.default_rng(hash(self.id) % 1000)
        self.q = quantize(self.plan.flatten(update), CLIP, BITS, rng)
        masked = self.client.masked_input(to_ring(self.q, self.plan.params.k))
        header = UpdateHeader(
            device_id=self.id,
            round_id=self.round_id,
            update_id=f"{self.id}-{self.round_id}",
            base_version=self.round_id - 1,
            num_samples=50,
            codec="secagg",
        )
        self.link.publish(
            T.update(self.id), encode(header, {"masked": np.frombuffer(masked, np.uint8)})
        )

    def unmask(self) -> None:
        assert self.client is not None
        self.link.publish(T.update(self.id), self.client.unmask(self.inbox(Kind.SURVIVORS)))


def secure_fleet(
    tmp_path: Path, count: int, **cfg: object
) -> tuple[object, Clock, list[SecureDevice]]:
    broker, clock = MemoryBroker(), Clock()
    agg = make(
        tmp_path,
        broker,
        clock,
        min_devices=count,
        rounds=1,
        secure={"clip": CLIP, "bits": BITS, "stage_timeout": 5.0},
        **cfg,
    )
    devices = [SecureDevice(broker, f"d{i}", value=0.01 * (i + 1)) for i in range(count)]
    pump(agg)
    for d in devices:
        d.join()
    pump(agg)
    for d in devices:
        d.share()
    pump(agg)
    return agg, clock, devices


def plain_mean(quantised: list[np.ndarray], count: int) -> np.ndarray:
    return np.sum(quantised, axis=0).astype(np.float64) * (CLIP / Q) / count


def test_the_unmasked_mean_is_exactly_the_plain_one_with_a_third_dropping(
    tmp_path: Path,
) -> None:
    agg, clock, devices = secure_fleet(tmp_path, 6)
    survivors, dropped = devices[:4], devices[4:]  # a third drop after sharing their keys
    for d in survivors:
        d.mask()
    pump(agg)
    assert agg.current is not None and agg.version == 0  # waiting for the other two
    clock.now += 11  # the round's deadline: the masked stage closes without them
    pump(agg)
    for d in survivors:
        d.unmask()
    pump(agg)
    assert agg.done and agg.version == 1
    want = plain_mean([d.q for d in survivors], len(survivors))  # type: ignore[misc]
    got = np.concatenate([agg.weights[n].ravel() for n in sorted(agg.weights)])
    np.testing.assert_allclose(got, want.astype(np.float32), rtol=1e-6, atol=1e-9)
    line = json.loads((tmp_path / "rounds.jsonl").read_text())
    assert line["participants"] == [d.id for d in survivors]
    assert line["missing"] == [d.id for d in dropped]
    assert line["weights"] == dict.fromkeys((d.id for d in survivors), 1)
    secure = line["secure"]
    assert secure["survivors"] == 4 and secure["dropped_after_sharing"] == 2
    assert secure["threshold"] == 4 and secure["ring_bits"] == 8 + 3  # 6 devices: 3 bits


def test_a_device_that_holds_its_update_back_is_a_dropout_and_a_zero(tmp_path: Path) -> None:
    agg, _clock, devices = secure_fleet(tmp_path, 4)
    held = devices[3]
    notice = SkipNotice(
        device_id=held.id,
        round_id=1,
        update_id="0d" * 8,
        reason="gate",
        trained=True,
        num_samples=50,
    )
    held.link.publish(T.update(held.id), encode_skip(notice))
    for d in devices[:3]:
        d.mask()
    pump(agg)  # every device has answered: the survivors go out at once
    for d in devices[:3]:
        d.unmask()
    pump(agg)
    assert agg.done and agg.version == 1
    want = plain_mean([d.q for d in devices[:3]], 4)  # type: ignore[misc]  # the held one is a zero
    got = np.concatenate([agg.weights[n].ravel() for n in sorted(agg.weights)])
    np.testing.assert_allclose(got, want.astype(np.float32), rtol=1e-6, atol=1e-9)
    line = json.loads((tmp_path / "rounds.jsonl").read_text())
    assert line["skipped"] == [held.id] and line["secure"]["survivors"] == 3


def test_too_few_survivors_fail_the_round_and_nothing_is_unmasked(tmp_path: Path) -> None:
    agg, clock, devices = secure_fleet(tmp_path, 5)  # threshold 3 of 5
    for d in devices[:2]:
        d.mask()
    clock.now += 11
    pump(agg)
    assert agg.version == 0
    line = json.loads((tmp_path / "rounds.jsonl").read_text())
    assert line["status"] == "failed"
    assert "secure aggregation aborted at masked" in line["why"] and "too_few" in line["why"]
    assert agg.current is not None and agg.current.round_id == 2  # the next round starts


def test_a_masked_input_of_the_wrong_size_is_refused(tmp_path: Path) -> None:
    agg, _clock, devices = secure_fleet(tmp_path, 3)
    d = devices[0]
    d.inbox(Kind.FORWARD)
    header = UpdateHeader(
        device_id=d.id,
        round_id=1,
        update_id="bad-1",
        base_version=0,
        num_samples=5,
        codec="secagg",
    )
    d.link.publish(T.update(d.id), encode(header, {"masked": np.zeros(3, np.uint8)}))
    plain = UpdateHeader(
        device_id=d.id, round_id=1, update_id="bad-2", base_version=0, num_samples=5
    )
    d.link.publish(T.update(d.id), encode(plain, weights()))  # an unmasked update
    pump(agg)
    assert agg.rejected["secagg_bad_magic"] == 1 or agg.rejected["secagg_too_short"] == 1
    assert agg.rejected["codec_mismatch"] == 1
    assert agg.current is not None and not agg.current.uploaded


def test_a_restart_abandons_the_open_secure_round(tmp_path: Path) -> None:
    agg, clock, _devices = secure_fleet(tmp_path, 3)
    agg.store.close()
    again = make(
        tmp_path,
        MemoryBroker(),
        clock,
        min_devices=3,
        rounds=1,
        secure={"clip": CLIP, "bits": BITS},
    )
    assert again.current is None  # its keys and shares were in memory: it starts afresh
    assert again.next_round_id == 2


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"min_devices": 2}, r"min_devices \(and devices_per_round, if set\) of at least 3"),
        ({"devices_per_round": 2}, "not 3 \\(2\\)"),
        ({"strategy": {"robust": "median"}}, 'robust = "mean"'),
        ({"secure": {"degree": 3}}, "degree must be even"),
        ({"training": {"secure": {"seed": "0" * 64, "clip": 1.0}}}, "set by the aggregator"),
    ],
)
def test_the_config_refuses_what_secure_aggregation_cannot_do(
    tmp_path: Path, extra: dict, message: str
) -> None:
    fields = {"model": DIGITS_MODEL, "state_dir": tmp_path, "min_devices": 3, "secure": {}}
    with pytest.raises(ValidationError, match=message):
        AggregatorConfig(**(fields | extra))

"""The status heartbeat is plain JSON; the envelope form of older agents is still read."""

from __future__ import annotations

import json

import pytest
from fedge.protocol import DecodeError, RoundAnnouncement, Status, TrainingConfig, encode
from fedge.protocol.status import MAX_STATUS, decode_status, encode_status

pytestmark = pytest.mark.unit

FULL = Status(
    device_id="pi-07",
    state="idle",
    timestamp=1764612000.5,
    anomaly_score=0.25,
    model_version=12,
    last_round=12,
    outcome="skipped",
    skip_reason="battery_low",
    train_loss=0.31,
    readings={"battery_percent": 18.0, "cpu_temp_c": 48.5},
    bytes_up_today=1900,
    bytes_down_today=61000,
    sensor={"samples": 5000, "bad_crc": 2},
    store_bytes=81920,
    agent_version="0.1.0",
    uptime_s=3600.0,
)


def test_round_trip_as_readable_json() -> None:
    payload = encode_status(FULL)
    obj = json.loads(payload)  # what mosquitto_sub prints is one JSON object
    assert obj["kind"] == "status" and obj["model_version"] == 12
    assert "wants_model" not in obj  # unset fields stay out
    assert decode_status(payload) == (FULL, False)
    bare = Status(device_id="d", state="offline", timestamp=0.0)
    assert encode_status(bare) == (
        b'{"kind":"status","device_id":"d","state":"offline","timestamp":0.0}'
    )


def test_listening_is_said_only_when_set() -> None:
    """A quiet device whose inbox has brought nothing yet says it listens; the others send
    the bytes they sent before the field, and a status without it reads as not listening."""
    quiet = Status(device_id="d", state="idle", timestamp=1.0, quiet=True)
    assert encode_status(quiet) == (
        b'{"kind":"status","device_id":"d","state":"idle","timestamp":1.0,"quiet":true}'
    )
    assert decode_status(encode_status(quiet))[0].listening is False
    listening = quiet.model_copy(update={"listening": True})
    payload = encode_status(listening)
    assert payload.endswith(b'"quiet":true,"listening":true}')
    assert decode_status(payload) == (listening, False)


def test_the_envelope_form_of_older_agents_is_read() -> None:
    old = Status(device_id="d", state="idle", timestamp=1.0, model_version=-1)
    assert decode_status(encode(old)) == (old, True)


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (b'{"kind":"status","device_id":"d","state":"idle","timestamp":NaN}', "bad_header_json"),
        (
            b'{"kind":"status","device_id":"d","state":"idle","state":"offline","timestamp":1}',
            "bad_header_json",
        ),
        (b'{"kind":"status","device_id":"d","state":"idle","timestamp":"1"}', "schema"),
        (b'{"kind":"status","device_id":"d/e","state":"idle","timestamp":1}', "schema"),
        (b'{"kind":"status","device_id":"d","state":"idle","timestamp":1,"x":1}', "schema"),
        (
            b'{"kind":"status","device_id":"d","state":"idle","timestamp":1,"sensor":{"a":-1}}',
            "schema",
        ),
        (
            b'{"kind":"status","device_id":"d","state":"idle","timestamp":1,"readings":{"A B":1}}',
            "schema",
        ),
        (b'{"kind":"status","device_id":"d","state":"idle","timestamp":1,"uptime_s":-1}', "schema"),
        (b"{" + b" " * MAX_STATUS + b"}", "too_large"),
        (b"{\xff}", "bad_header_json"),
        (b"[1]", "too_short"),
        (b"[1, 2, 3, 4, 5]", "bad_magic"),
    ],
)
def test_bad_statuses_are_one_decode_error(payload: bytes, reason: str) -> None:
    with pytest.raises(DecodeError) as caught:
        decode_status(payload)
    assert caught.value.reason == reason


def test_too_many_readings_or_another_message_kind_are_refused() -> None:
    many = {f"r{i}": 1.0 for i in range(17)}
    text = json.dumps(
        {"kind": "status", "device_id": "d", "state": "idle", "timestamp": 1, "readings": many}
    )
    with pytest.raises(DecodeError, match="schema"):
        decode_status(text.encode())
    ann = RoundAnnouncement(
        fleet="f", round_id=1, model_version=0, deadline=1.0, selected=(), config=TrainingConfig()
    )
    with pytest.raises(DecodeError, match="a round message where a status belongs"):
        decode_status(encode(ann))

"""The intake's pure steps, each alone."""

from __future__ import annotations

import numpy as np
import pytest
from fedge.aggregator import intake
from fedge.protocol import (
    CodecError,
    DecodeError,
    Evaluation,
    SkipNotice,
    Status,
    UpdateHeader,
    encode,
    encode_delta,
    encode_skip,
    parse_codec,
)

pytestmark = pytest.mark.unit
HEADER = UpdateHeader(device_id="a", round_id=3, update_id="u1", base_version=2, num_samples=5)
OPEN = intake.OpenRoundView(round_id=3, selected={"a", "b"}, answered=set())


def test_parse_takes_updates_and_skip_notices_and_nothing_else() -> None:
    parsed = intake.parse(encode(HEADER, {"w": np.zeros(2, np.float32)}), "a")
    assert parsed.header == HEADER and list(parsed.tensors) == ["w"]
    skip = SkipNotice(device_id="a", round_id=3, update_id="00" * 8, reason="busy")
    assert intake.parse(encode_skip(skip), "a").header == skip
    with pytest.raises(DecodeError):
        intake.parse(encode(Status(device_id="a", state="idle", timestamp=0.0)), "a")
    with pytest.raises(DecodeError):
        intake.parse(b"\x00garbage", "a")


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({}, None),
        ({"topic_device": "b"}, "topic_mismatch"),
        ({"seen": True}, "duplicate"),
        ({"round_": None}, "wrong_round"),
        ({"round_": intake.OpenRoundView(4, {"a"}, set())}, "wrong_round"),
        ({"round_": intake.OpenRoundView(3, {"b"}, set())}, "not_selected"),
        ({"round_": intake.OpenRoundView(3, {"a"}, {"a"})}, "already_answered"),
        ({"model_version": 3}, "stale_base"),
    ],
)
def test_validate_says_why_an_answer_does_not_count(changes: dict, reason: str | None) -> None:
    kwargs = {"topic_device": "a", "round_": OPEN, "model_version": 2, "seen": False} | changes
    assert intake.validate(HEADER, **kwargs) == reason


@pytest.mark.parametrize(
    ("header", "reason"),
    [
        (HEADER.model_copy(update={"evaluation": Evaluation(count=5, loss=1, accuracy=1)}), None),
        # more examples held out than it says it trained on
        (
            HEADER.model_copy(update={"evaluation": Evaluation(count=6, loss=1, accuracy=1)}),
            "bad_evaluation",
        ),
        (
            SkipNotice(
                device_id="a",
                round_id=3,
                update_id="u",
                reason="small_update",
                trained=True,
                num_samples=5,
                evaluation=Evaluation(count=2, loss=1, mae=0.5),
            ),
            None,
        ),
        # a device that sat out did not evaluate
        (
            SkipNotice(
                device_id="a",
                round_id=3,
                update_id="u",
                reason="busy",
                evaluation=Evaluation(count=2, loss=1, accuracy=0.5),
            ),
            "bad_evaluation",
        ),
    ],
)
def test_validate_checks_an_evaluation_against_the_answer(
    header: object, reason: str | None
) -> None:
    kwargs = {"topic_device": "a", "round_": OPEN, "model_version": 2, "seen": False}
    assert intake.validate(header, **kwargs) == reason  # type: ignore[arg-type]


def test_decode_checks_the_model_shapes() -> None:
    rng = np.random.default_rng(0)
    delta = {"w": rng.standard_normal((4, 5)).astype(np.float32)}
    enc = encode_delta(delta, parse_codec("int8"), rng)
    header = HEADER.model_copy(update={"codec": "int8"})
    out = intake.decode(header, enc.tensors, {"w": [4, 5]})
    np.testing.assert_allclose(out["w"], enc.decoded["w"])
    with pytest.raises(CodecError):
        intake.decode(header, enc.tensors, {"w": [5, 4]})


def test_an_update_must_use_the_codec_the_round_announced() -> None:
    expected = intake.expected_codec("topk:0.02+int8", 512, 4810)  # raised to keep 512
    assert expected == "topk:0.1065+int8"
    topk = HEADER.model_copy(update={"codec": expected})
    dense = HEADER.model_copy(update={"codec": "float32"})
    kwargs = {"topic_device": "a", "round_": OPEN, "model_version": 2, "seen": False}
    assert intake.validate(topk, codec=expected, **kwargs) is None
    assert intake.validate(dense, codec=expected, **kwargs) == "codec_mismatch"
    assert intake.validate(dense, codec=None, **kwargs) is None

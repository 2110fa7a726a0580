from __future__ import annotations

import pytest
from fedge.protocol import InvalidId, ProtocolError, Topics, topic_matches, validate_id
from fedge.protocol.topics import validate_filter

pytestmark = pytest.mark.unit


def test_topic_names() -> None:
    t = Topics("plant-7")
    assert t.round == "fedge/v1/plant-7/round"
    assert t.global_model == "fedge/v1/plant-7/global"
    assert t.update("pi_01") == "fedge/v1/plant-7/update/pi_01"
    assert t.updates == "fedge/v1/plant-7/update/+"
    assert t.status("pi.2") == "fedge/v1/plant-7/status/pi.2"
    assert t.statuses == "fedge/v1/plant-7/status/+"
    assert Topics("f", prefix="test-1/fedge/v1").round == "test-1/fedge/v1/f/round"


@pytest.mark.parametrize("value", ["a", "A-z_0.9", "x" * 64, ".", "..", "-"])
def test_valid_ids(value: str) -> None:
    assert validate_id("device id", value) == value


@pytest.mark.parametrize(
    "value", ["", "x" * 65, "a/b", "a+", "#", "a b", "a\n", "é", "a\0", None, 7]
)
def test_invalid_ids_name_kind_and_value(value: object) -> None:
    with pytest.raises(InvalidId) as caught:
        validate_id("device id", value)  # type: ignore[arg-type]
    assert isinstance(caught.value, ProtocolError)
    assert caught.value.kind == "device id" and caught.value.value == value
    assert "device id" in str(caught.value) and repr(value) in str(caught.value)


@pytest.mark.parametrize(
    ("fleet", "prefix"),
    [
        ("a/b", "fedge/v1"),
        ("", "fedge/v1"),
        ("f", ""),
        ("f", "fedge//v1"),
        ("f", "/fedge"),
        ("f", "fedge/#"),
        ("f", "fedge/+/v1"),
        ("f", "fedge/v1/"),
    ],
)
def test_topics_validate_fleet_and_prefix(fleet: str, prefix: str) -> None:
    with pytest.raises(InvalidId):
        Topics(fleet, prefix=prefix)


def test_topics_reject_bad_device_ids() -> None:
    with pytest.raises(InvalidId):
        Topics("f").update("a/b")
    with pytest.raises(InvalidId):
        Topics("f").status("+")


def test_device_of() -> None:
    t = Topics("f", prefix="p/v1")
    assert t.device_of("p/v1/f/update/dev-1") == "dev-1"
    assert t.device_of(t.status("dev.2")) == "dev.2"


@pytest.mark.parametrize(
    "topic",
    [
        "p/v1/f/round",
        "p/v1/f/global",
        "p/v1/f/update/",
        "p/v1/f/update/a/b",
        "p/v1/g/update/a",  # another fleet
        "q/v1/f/update/a",
        "p/v1/f/updates/a",
        "p/v1/f/update/+",
        "p/v1/fupdate/a",
        "",
    ],
)
def test_device_of_rejects_other_topics(topic: str) -> None:
    with pytest.raises(InvalidId):
        Topics("f", prefix="p/v1").device_of(topic)


@pytest.mark.parametrize(
    ("topic_filter", "topic", "expected"),
    [
        ("a/b", "a/b", True),
        ("a/b", "a/b/c", False),
        ("a/+", "a/b", True),
        ("a/+", "a/b/c", False),
        ("a/+", "a/", True),  # + matches an empty level
        ("a/+/c", "a/b/c", True),
        ("+/+", "a/b", True),
        ("+", "a/b", False),
        ("a/#", "a", True),  # the parent too
        ("a/#", "a/b/c", True),
        ("a/#", "ab", False),
        ("#", "a/b", True),
        ("#", "$SYS/x", False),  # first-level wildcards skip $ topics
        ("+/x", "$SYS/x", False),
        ("$SYS/#", "$SYS/x", True),
        ("fedge/v1/f/update/+", "fedge/v1/f/update/d1", True),
        ("fedge/v1/f/update/+", "fedge/v1/f/status/d1", False),
    ],
)
def test_topic_matches(topic_filter: str, topic: str, expected: bool) -> None:
    assert topic_matches(topic_filter, topic) is expected


@pytest.mark.parametrize("topic_filter", ["", "a/#/b", "a#", "a/b+", "#/a", "a\0"])
def test_invalid_filters(topic_filter: str) -> None:
    with pytest.raises(InvalidId):
        validate_filter(topic_filter)
    with pytest.raises(InvalidId):
        topic_matches(topic_filter, "a/b")

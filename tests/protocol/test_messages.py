from __future__ import annotations

import math

import pytest
from fedge.protocol import (
    GlobalModelHeader,
    Header,
    RoundAnnouncement,
    SkipNotice,
    Status,
    TrainingConfig,
    UpdateHeader,
)
from pydantic import TypeAdapter, ValidationError

pytestmark = pytest.mark.unit

CONFIG = TrainingConfig(epochs=1, batch_size=32, lr=0.01)


def test_defaults_and_kinds() -> None:
    msgs = [
        RoundAnnouncement(
            fleet="f", round_id=1, model_version=0, deadline=1.5, selected=("a",), config=CONFIG
        ),
        GlobalModelHeader(fleet="f", model_version=0, round_id=0),
        UpdateHeader(device_id="d", round_id=1, update_id="u", base_version=0, num_samples=1),
        SkipNotice(device_id="d", round_id=1, update_id="u", reason="battery low"),
        Status(device_id="d", state="online", timestamp=0.0),
    ]
    assert [m.kind for m in msgs] == ["round", "global", "update", "skip", "status"]
    assert msgs[2].codec == "float32" and msgs[2].train_loss is None
    adapter = TypeAdapter(Header)
    for m in msgs:
        assert adapter.validate_python(m.model_dump()) == m


@pytest.mark.parametrize(
    "fields",
    [
        {"device_id": "a/b"},
        {"device_id": ""},
        {"device_id": "x" * 65},
        {"device_id": "d\n"},
        {"update_id": "u u"},
        {"round_id": 0},
        {"base_version": -1},
        {"num_samples": 0},
        {"codec": "int9"},
        {"train_loss": math.nan},
        {"train_loss": math.inf},
        {"evaluation": {"count": 5, "loss": 0.5, "accuracy": 1.5}},
        {"evaluation": {"count": 5, "loss": math.nan, "accuracy": 0.5}},
        {"evaluation": {"count": 5, "loss": 0.5, "mae": -0.1}},
        {"evaluation": {"count": 0, "loss": 0.5, "accuracy": 0.5}},
        {"evaluation": {"count": 5, "loss": 0.5}},  # neither metric
        {"evaluation": {"count": 5, "loss": 0.5, "accuracy": 0.5, "mae": 0.1}},  # both
        {"kind": "skip"},
        {"extra": 1},
    ],
)
def test_update_header_rejects(fields: dict[str, object]) -> None:
    base = {"device_id": "d", "round_id": 1, "update_id": "u", "base_version": 0, "num_samples": 1}
    with pytest.raises(ValidationError):
        UpdateHeader(**(base | fields))


@pytest.mark.parametrize(
    "fields",
    [
        {"epochs": 0},
        {"epochs": 1001},
        {"batch_size": 0},
        {"batch_size": 65537},
        {"lr": 0},
        {"lr": 10.5},
        {"lr": math.nan},
        {"eval_fraction": -0.1},
        {"eval_fraction": 0.6},  # would hold out more than it trains on
        {"eval_min_samples": 0},
    ],
)
def test_training_config_bounds(fields: dict[str, object]) -> None:
    with pytest.raises(ValidationError):
        TrainingConfig(**({"epochs": 1, "batch_size": 1, "lr": 1.0} | fields))


def test_other_constraints() -> None:
    with pytest.raises(ValidationError):
        RoundAnnouncement(
            fleet="f",
            round_id=1,
            model_version=0,
            deadline=1.0,
            selected=("ok", "not/ok"),
            config=CONFIG,
        )
    with pytest.raises(ValidationError):
        RoundAnnouncement(
            fleet="f", round_id=1, model_version=0, deadline=math.inf, selected=(), config=CONFIG
        )
    with pytest.raises(ValidationError):
        SkipNotice(device_id="d", round_id=1, update_id="u", reason="x" * 65)
    with pytest.raises(ValidationError):
        Status(device_id="d", state="asleep", timestamp=0.0)
    with pytest.raises(ValidationError):
        GlobalModelHeader(fleet="f", model_version=0, round_id=-1)


def test_messages_are_frozen() -> None:
    status = Status(device_id="d", state="idle", timestamp=1.0)
    with pytest.raises(ValidationError):
        status.state = "online"  # type: ignore[misc]


def test_header_union_dispatches_on_kind() -> None:
    adapter = TypeAdapter(Header)
    msg = adapter.validate_python(
        {"kind": "status", "device_id": "d", "state": "offline", "timestamp": 3}
    )
    assert isinstance(msg, Status)
    with pytest.raises(ValidationError):
        adapter.validate_python({"kind": "nope"})


def test_an_unset_evaluation_costs_no_bytes() -> None:
    base = {"device_id": "d", "round_id": 1, "update_id": "u", "base_version": 0, "num_samples": 1}
    assert "evaluation" not in UpdateHeader(**base).model_dump(mode="json")
    scored = UpdateHeader(**base, evaluation={"count": 1, "loss": 0.2, "mae": 0.1})
    assert scored.model_dump(mode="json")["evaluation"] == {"count": 1, "loss": 0.2, "mae": 0.1}


def test_settings_added_later_stay_off_the_wire_at_their_defaults() -> None:
    """Devices of the version before refuse keys they do not know: an announcement with the
    fleet's default settings must carry only the keys that version had."""
    first = {"epochs", "batch_size", "lr", "mu", "codec", "topk_min_entries", "gate"}
    assert set(TrainingConfig().model_dump(mode="json")) == first
    changed = TrainingConfig(eval_fraction=0.2, eval_min_samples=5).model_dump(mode="json")
    assert set(changed) == first | {"eval_fraction", "eval_min_samples"}
    assert TrainingConfig.model_validate(changed) == TrainingConfig(
        eval_fraction=0.2, eval_min_samples=5
    )

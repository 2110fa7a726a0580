"""The example configs in deploy/examples stay valid as the config schemas change."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from fedge.agent.config import AgentConfig
from fedge.aggregator.config import AggregatorConfig

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

pytestmark = pytest.mark.unit
EXAMPLES = Path(__file__).resolve().parent.parent / "deploy" / "examples"


def test_agent_example(tmp_path: Path) -> None:
    raw = tomllib.loads((EXAMPLES / "agent.toml").read_text())
    np.savez(tmp_path / "p.npz", x=np.zeros((2, 64), np.float32), y=np.zeros(2, np.int32))
    raw["data"] = str(tmp_path / "p.npz")  # the example names a path on a device
    cfg = AgentConfig.model_validate(raw, context={"base_dir": EXAMPLES})
    assert cfg.model.is_file() and cfg.eligibility is not None


def test_aggregator_example() -> None:
    raw = tomllib.loads((EXAMPLES / "aggregator.toml").read_text())
    cfg = AggregatorConfig.model_validate(raw, context={"base_dir": EXAMPLES})
    assert cfg.strategy.name == "fedadam" and cfg.training.codec == "topk:0.02+int8"
    assert cfg.training.gate.threshold == 0.1


def test_serial_agent_example() -> None:
    raw = tomllib.loads((EXAMPLES / "agent-serial.toml").read_text())
    cfg = AgentConfig.model_validate(raw, context={"base_dir": EXAMPLES})
    assert cfg.serial is not None and cfg.task is not None and cfg.data is None
    assert cfg.task.window * len(cfg.task.center or ()) == 80  # the forecaster's input size


def test_aggregator_example_shards_table() -> None:
    text = (EXAMPLES / "aggregator.toml").read_text()
    for line in ("[shards]", 'workers = ["w1", "w2"]', "close_timeout = 30.0"):
        assert f"# {line}" in text
        text = text.replace(f"# {line}", line)
    cfg = AggregatorConfig.model_validate(tomllib.loads(text), context={"base_dir": EXAMPLES})
    assert cfg.shards is not None and cfg.shards.workers == ["w1", "w2"]

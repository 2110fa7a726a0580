"""What the agent remembers across restarts, kept as one small JSON file.

Replaced atomically (write, fsync, rename) so a power cut leaves the old or the new
file, never half of one.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path

log = logging.getLogger("fedge.agent")


@dataclass
class AgentState:
    last_round: int = 0  # the last round this device answered (update or skip)
    round_seen: int = 0  # the newest round announced (verified); older ones are replays
    model_version: int = -1  # the last global model applied
    consecutive_skips: int = 0  # rounds in a row the gate held the update back
    upload_budget: dict | None = None  # ByteBudget.to_dict() when a daily budget is set
    # Key ids (hex) of the aggregator keys pinned when the rounds and versions above were seen.
    trusted_keys: list[str] | None = None


def load_state(path: Path) -> AgentState:
    try:
        raw = json.loads(path.read_text())
        return AgentState(
            last_round=int(raw["last_round"]),
            round_seen=int(raw.get("round_seen", raw["last_round"])),
            model_version=int(raw["model_version"]),
            consecutive_skips=int(raw.get("consecutive_skips", 0)),
            upload_budget=raw.get("upload_budget"),
            trusted_keys=raw.get("trusted_keys"),
        )
    except FileNotFoundError:
        return AgentState()
    except (OSError, ValueError, KeyError, TypeError) as exc:
        log.warning("state file %s unreadable (%s); starting fresh", path, exc)
        return AgentState()


def save_state(path: Path, state: AgentState) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w") as fh:
        json.dump(asdict(state), fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)

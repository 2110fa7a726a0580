"""The outbox: the latest answer that changed the residual, kept until the next one.

An answer (an update, or a skip notice of a device that trained and holds its update back)
changes two files: the residual (what is still to be sent) and the state (which round was
answered). A crash between them would either send what was just sent again (counted twice)
or lose it. So the agent first writes the outbox (the publishes, and the residual that
remains once they are out), then publishes, then saves residual and state. After a restart
the outbox is sent again with the same update id (the aggregator applies an update id once
per device): that also covers a publish still unacknowledged when the power went. If the
state does not yet say the round was answered, the outbox's residual and round are saved
then. The outbox is removed after that one resend, or replaced by the next answer.

One ``.npz`` file, replaced atomically (write, fsync, rename).
"""

from __future__ import annotations

import json
import logging
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

log = logging.getLogger("fedge.agent")

_META = "__outbox__"
_PART = "part/"
_KEPT = "kept/"


@dataclass(frozen=True)
class Pending:
    round_id: int
    update_id: str
    topic: str
    parts: list[bytes]
    kept: dict[str, np.ndarray] | None  # the residual once the parts are out
    kind: str = "update"  # or "skip": a trained device holding its update back


class Outbox:
    def __init__(self, path: Path) -> None:
        self.path = path

    def put(self, pending: Pending) -> None:
        meta = {
            "round_id": pending.round_id,
            "update_id": pending.update_id,
            "topic": pending.topic,
            "parts": len(pending.parts),
            "kept": pending.kept is not None,
            "kind": pending.kind,
        }
        arrays: dict[str, np.ndarray] = {_META: np.frombuffer(json.dumps(meta).encode(), np.uint8)}
        for i, part in enumerate(pending.parts):
            arrays[f"{_PART}{i}"] = np.frombuffer(part, np.uint8)
        for name, value in (pending.kept or {}).items():
            arrays[f"{_KEPT}{name}"] = np.asarray(value, np.float32)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        with open(tmp, "wb") as fh:
            np.savez(fh, **arrays)  # type: ignore[arg-type]
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.path)

    def take(self) -> Pending | None:
        """What a crash left on its way, or None. An unreadable outbox is dropped (logged):
        it was written whole or not at all, so that is a damaged disk, not a crash."""
        try:
            with np.load(self.path, allow_pickle=False) as npz:
                meta = json.loads(bytes(npz[_META]).decode())
                parts = [bytes(npz[f"{_PART}{i}"]) for i in range(int(meta["parts"]))]
                kept = {
                    k[len(_KEPT) :]: np.asarray(npz[k], np.float32)
                    for k in npz.files
                    if k.startswith(_KEPT)
                }
            return Pending(
                round_id=int(meta["round_id"]),
                update_id=str(meta["update_id"]),
                topic=str(meta["topic"]),
                parts=parts,
                kept=kept if meta["kept"] else None,
                kind=str(meta.get("kind", "update")),
            )
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError, zipfile.BadZipFile) as exc:
            log.warning("outbox %s unreadable (%s); dropped", self.path, exc)
            self.clear()
            return None

    def clear(self) -> None:
        self.path.unlink(missing_ok=True)

"""What the agent remembers across restarts, kept as one small JSON file.

Replaced atomically (write, fsync, rename) so a power cut leaves the old or the new
file, never half of one; the state saved before stays as ``.bak``. A missing file starts
fresh; one that exists but cannot be read is refused (``StateCorrupt``), never silently
replaced: starting fresh would forget which rounds were answered and which models applied.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass, replace
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


class StateCorrupt(RuntimeError):
    """The state file exists but cannot be trusted; the message says what to do."""


def state_from_dict(raw: dict) -> AgentState:
    """An ``AgentState`` from its JSON form (``asdict``); raises ValueError, KeyError,
    TypeError or AttributeError when it is not one."""
    return AgentState(
        last_round=int(raw["last_round"]),
        round_seen=int(raw.get("round_seen", raw["last_round"])),
        model_version=int(raw["model_version"]),
        consecutive_skips=int(raw.get("consecutive_skips", 0)),
        upload_budget=raw.get("upload_budget"),
        trusted_keys=raw.get("trusted_keys"),
    )


def load_state(path: Path, *, answered: AgentState | None = None) -> AgentState:
    """The state file, or ``answered`` (the state the outbox holds, ``fedge.agent.outbox``)
    when that is newer: an answer commits with its outbox, and the state file catches up
    later. Newer means a later round answered under the same pinned keys (any save after the
    answer has its round). A model noted since (``note_state``) raises the model version."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        if answered is None:
            log.info("no state file %s yet: starting fresh", path)
            return AgentState()
        # Answers committed before the first state save (and perhaps a model noted since).
        log.info("no state file %s yet: the state comes from the outbox", path)
        state = replace(answered)
    except OSError as exc:
        raise _corrupt(path, f"cannot be read ({exc.strerror})") from exc
    else:
        try:
            state = state_from_dict(json.loads(text))
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            what = "is empty" if not text.strip() else f"is not a fedge agent state ({exc})"
            raise _corrupt(path, what) from exc
        if answered is not None:
            state = _newer(state, answered)
    noted = _noted_version(path, state)
    if noted is not None and noted > state.model_version:
        state.model_version = noted
    return state


def _newer(state: AgentState, answered: AgentState) -> AgentState:
    if answered.last_round > state.last_round and answered.trusted_keys == state.trusted_keys:
        log.info(
            "the state as round %d's answer left it comes from the outbox", answered.last_round
        )
        return replace(answered)
    return state


def _corrupt(path: Path, what: str) -> StateCorrupt:
    backup = backup_path(path)
    restore = f"restore {backup} (copy it over it)" if backup.is_file() else "restore it"
    return StateCorrupt(
        f"agent state {path} {what}: {restore}, or start afresh with"
        " `fedge agent --config CONFIG --reset-state`"
    )


def backup_path(path: Path) -> Path:
    return path.with_name(path.name + ".bak")


def _write(path: Path, data: str, *, durable: bool = True) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as fh:
        fh.write(data)
        if durable:
            fh.flush()
            os.fsync(fh.fileno())
    os.replace(tmp, path)


def note_path(path: Path) -> Path:
    return path.with_name(path.name + ".model")


def note_state(path: Path, state: AgentState) -> None:
    """Note the model version (with the keys it was checked against) beside the state file,
    without an fsync and without a rename: between durable saves (``save_state``), a rename
    over a file costs about as much as an fsync here (ext4 flushes a file renamed over
    another). One small write in place survives a crash of the process; a power cut may leave
    the note old or torn, and a torn note is ignored (``load_state``), never the state file.
    Shorter text is padded with spaces, which JSON ignores, so the file is never truncated."""
    note = {"model_version": state.model_version, "trusted_keys": state.trusted_keys}
    data = json.dumps(note).encode()
    fd = os.open(note_path(path), os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        os.pwrite(fd, data.ljust(os.fstat(fd).st_size, b" "), 0)
    finally:
        os.close(fd)


def _noted_version(path: Path, state: AgentState) -> int | None:
    """The model version noted after the last durable save, if the note is whole and was
    made under the same pinned keys."""
    try:
        note = json.loads(note_path(path).read_bytes())
        version = int(note["model_version"])
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        log.warning("model note %s unreadable (%s); ignored", note_path(path), exc)
        return None
    return version if note.get("trusted_keys") == state.trusted_keys else None


def save_state(path: Path, state: AgentState) -> None:
    """Replace the state file atomically and durably (write, fsync, rename); the file it
    replaces stays as the backup."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as fh:
        fh.write(json.dumps(asdict(state)))
        fh.flush()
        os.fsync(fh.fileno())
    # The copy an operator restores when the state file is damaged: the state saved before,
    # kept by a second name (a hard link: no data written, nothing to flush). It is one save
    # behind, which is a state the device has been in; the aggregator refuses a second answer.
    # The first save has no state before it: its copy is written, without an fsync.
    backup = backup_path(path)
    if path.is_file():
        link = backup.with_name(backup.name + ".tmp")
        link.unlink(missing_ok=True)
        try:
            os.link(path, link)
            os.replace(link, backup)
        except OSError:  # a file system without hard links: a copy, not flushed
            _write(backup, path.read_text(), durable=False)
    os.replace(tmp, path)
    if not backup.is_file():
        _write(backup, path.read_text(), durable=False)


def reset_state(path: Path, stamp: str) -> Path | None:
    """Move a state file aside (``--reset-state``); the device starts fresh."""
    if not path.exists():
        return None
    aside = path.with_name(f"{path.name}.reset-{stamp}")
    os.replace(path, aside)
    note_path(path).unlink(missing_ok=True)  # its model note goes with it
    log.warning("--reset-state: moved %s to %s", path, aside)
    return aside

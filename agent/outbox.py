"""The outbox: the latest answer that changed the residual, kept until the next one.

An answer (an update, or a skip notice of a device that trained and holds its update back)
changes two files: the residual (what is still to be sent) and the state (which round was
answered). A crash between them would either send what was just sent again (counted twice)
or lose it. So the agent first writes the outbox (the publishes, the residual that remains
once they are out, and the state as the answer leaves it), then publishes. That one durable
write is the answer's commit: the residual file and the state file follow later, off the
round's path (the agent saves the state when it is next idle or stops). After a restart the
outbox is sent again with the same update id (the aggregator applies an update id once per
device): that also covers a publish still unacknowledged when the power went. The state it
holds is taken at start when the state file is older (``load_state(answered=...)``). The
outbox is removed once the broker has acknowledged that resend (offline it sits in the
link's memory, which a restart loses: the outbox keeps it until then), or replaced by the
next answer. An answer written under aggregator keys none of which is pinned now is
dropped, not sent again (its round may have been forged; ``Agent._check_trust_root``); its
residual stays.

Two slot files written in turn in place (``Outbox``), each record a prefix (magic, lengths,
sequence number, CRC-32), a JSON header, then the parts and the residual's float32 bytes as
they are (little-endian, in the header's order). An outbox of the ``.npz`` layout of earlier
versions (beside it, with ``.npz`` appended) is still read once, after an upgrade.
"""

from __future__ import annotations

import json
import logging
import math
import os
import struct
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .state import AgentState, state_from_dict

log = logging.getLogger("fedge.agent")

MAGIC = b"FEDGEOB1"
# magic, header bytes, body bytes, sequence number, CRC-32 of all that follows the CRC
# (the three numbers, header, body) within the record
_PREFIX = struct.Struct("<8sIIQI")
_NUMBERS = struct.Struct("<IIQ")
_F32 = np.dtype("<f4")
_IOV_MAX = 512  # buffers per writev (Linux takes 1,024)

# The .npz layout of earlier versions.
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
    state: AgentState | None = None  # the state once the answer is committed (None: not kept)


class Outbox:
    """Two slots, ``path`` and ``path.1``, written in turn in place (write, fdatasync): the
    one not holding the newest answer, so a write a crash cuts short leaves that answer
    whole. Each record carries a sequence number and a CRC-32; the newest whole one is the
    outbox. (A new file and a rename cost three times the CPU of a write in place here, and
    the outbox is written on every round's path.)"""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.slots = (path, path.with_name(path.name + ".1"))
        self.legacy = path.with_name(path.name + ".npz")  # the layout of earlier versions
        self._seq: int | None = None  # the newest record's number (0: none); None: not read
        self._newest = 1  # the slot holding it: the next write goes to the other
        # The record take() found, until the next put or clear (the agent's start asks
        # twice: for the state, then to send it again).
        self._taken: Pending | None = None

    def put(self, pending: Pending) -> None:
        if self._seq is None:  # not taken first: which slot holds the newest record?
            try:
                self._newest_record()
            except (OSError, ValueError, KeyError, TypeError, _Legacy):
                self.clear()  # nothing whole to keep; a record left must not outrank this one
        assert self._seq is not None
        seq, slot = self._seq + 1, 1 - self._newest
        # C order, little-endian float32: the bytes written as they are (0-d arrays stay 0-d)
        kept = {k: np.asarray(v, _F32, order="C") for k, v in (pending.kept or {}).items()}
        header = {
            "round_id": pending.round_id,
            "update_id": pending.update_id,
            "topic": pending.topic,
            "kind": pending.kind,
            "parts": [len(part) for part in pending.parts],
            "kept": None if pending.kept is None else [[k, list(v.shape)] for k, v in kept.items()],
            # its fields as they are (asdict's deep copy costs more than the rest of the write)
            "state": None if pending.state is None else vars(pending.state),
        }
        head = json.dumps(header, separators=(",", ":")).encode()
        body = [memoryview(part) for part in pending.parts]
        body += [array.reshape(-1).view(np.uint8).data for array in kept.values()]
        numbers = _NUMBERS.pack(len(head), sum(b.nbytes for b in body), seq)
        crc = zlib.crc32(head, zlib.crc32(numbers))
        for chunk in body:
            crc = zlib.crc32(chunk, crc)
        prefix = _PREFIX.pack(MAGIC, len(head), sum(b.nbytes for b in body), seq, crc)
        if seq == 1:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.slots[slot], os.O_WRONLY | os.O_CREAT, 0o644)
        try:
            # over the older record, from the start
            _write_all(fd, [memoryview(prefix), memoryview(head), *body])
            # The data and its size, not the times (macOS has no fdatasync)
            (os.fdatasync if hasattr(os, "fdatasync") else os.fsync)(fd)
        finally:
            os.close(fd)
        if seq <= 2:  # the slot files made after a clear: their names durable too
            _sync_dir(self.path.parent)
        self._seq, self._newest = seq, slot
        self._taken = None

    def take(self) -> Pending | None:
        """What a crash left on its way, or None: the newest whole record. A slot a crash
        cut short is passed over; an outbox with no whole record is dropped (logged). A
        record found is read once: asked again before a put or clear, the same one."""
        if self._taken is None:
            self._taken = self._take()
        return self._taken

    def _take(self) -> Pending | None:
        try:
            return self._newest_record()
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.warning("outbox %s unreadable (%s); dropped", self.path, exc)
        except _Legacy:
            try:
                return _take_npz(self.legacy)
            except FileNotFoundError:
                return None
            except (OSError, ValueError, KeyError, TypeError, zipfile.BadZipFile) as exc:
                log.warning("outbox %s unreadable (%s); dropped", self.legacy, exc)
        self.clear()
        return None

    def clear(self) -> None:
        """Remove the outbox, durably: numbers start again at 1, and an older record that
        came back after a power cut must not outrank the next ones."""
        for path in (*self.slots, self.legacy):
            path.unlink(missing_ok=True)
        _sync_dir(self.path.parent)
        self._seq, self._newest = 0, 1
        self._taken = None

    def _newest_record(self) -> Pending | None:
        """Read both slots; note the newest whole record's number and slot, and return it.
        Raises ValueError when a slot exists and none is whole, ``_Legacy`` when there is no
        slot (an outbox of the ``.npz`` layout may be there)."""
        found: list[tuple[int, int, Pending]] = []
        problems = []
        exists = False
        for slot, path in enumerate(self.slots):
            try:
                data = path.read_bytes()
            except FileNotFoundError:
                continue
            exists = True
            try:
                seq, pending = _parse(data)
            except (ValueError, KeyError, TypeError) as exc:
                problems.append(f"{path.name}: {exc}")
                continue
            found.append((seq, slot, pending))
        if found:
            seq, slot, pending = max(found, key=lambda f: f[0])
            if problems:  # the other slot: a write a crash cut short
                log.info("outbox: %s passed over (%s)", self.path, "; ".join(problems))
            self._seq, self._newest = seq, slot
            return pending
        self._seq, self._newest = 0, 1
        if exists:
            raise ValueError("; ".join(problems))
        if self.legacy.exists():
            raise _Legacy
        return None


def _sync_dir(path: Path) -> None:
    """Make the names in a directory durable, where the platform can sync a directory."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return
    except OSError as exc:
        log.debug("cannot open directory %s to sync it: %s", path, exc)
        return
    try:
        os.fsync(fd)
    except OSError as exc:
        log.debug("cannot sync directory %s: %s", path, exc)
    finally:
        os.close(fd)


class _Legacy(Exception):
    """No slot, but perhaps an outbox of the ``.npz`` layout."""


def _write_all(fd: int, chunks: list[memoryview]) -> None:
    """``writev`` until every byte is written (a short write goes on where it stopped)."""
    views = [view.cast("B") for view in chunks if view.nbytes]
    while views:
        done = os.writev(fd, views[:_IOV_MAX])
        while views and done >= views[0].nbytes:
            done -= views[0].nbytes
            views.pop(0)
        if views and done:
            views[0] = views[0][done:]


def _parse(data: bytes) -> tuple[int, Pending]:
    """A record's sequence number and what it holds; ValueError when it is not whole."""
    if len(data) < _PREFIX.size:
        raise ValueError("shorter than a record's prefix")
    magic, head_len, body_len, seq, crc = _PREFIX.unpack_from(data)
    if magic != MAGIC:
        raise ValueError("not an outbox record")
    end = _PREFIX.size + head_len + body_len
    if end > len(data):
        raise ValueError("cut short")
    record = memoryview(data)[_PREFIX.size : end]
    if zlib.crc32(record, zlib.crc32(_NUMBERS.pack(head_len, body_len, seq))) != crc:
        raise ValueError("checksum mismatch")
    meta = json.loads(record[:head_len].tobytes())
    at = _PREFIX.size + head_len
    parts = []
    for size in meta["parts"]:
        if not isinstance(size, int) or size < 0 or at + size > end:
            raise ValueError("parts beyond the record")
        parts.append(data[at : at + size])
        at += size
    kept = None
    if meta["kept"] is not None:
        kept = {}
        for name, shape in meta["kept"]:
            count = math.prod(int(d) for d in shape)
            if at + 4 * count > end:
                raise ValueError("residual beyond the record")
            array = np.frombuffer(data, _F32, count, at).reshape(shape)
            kept[str(name)] = array.astype(np.float32)  # a copy: native order, writable
            at += 4 * count
    if at != end:
        raise ValueError(f"{end - at} bytes of the record unaccounted for")
    return seq, Pending(
        round_id=int(meta["round_id"]),
        update_id=str(meta["update_id"]),
        topic=str(meta["topic"]),
        parts=parts,
        kept=kept,
        kind=str(meta["kind"]),
        state=None if meta["state"] is None else state_from_dict(meta["state"]),
    )


def _take_npz(path: Path) -> Pending:
    """An outbox in the ``.npz`` layout of earlier versions (no state in it)."""
    with open(path, "rb") as fh, np.load(fh, allow_pickle=False) as npz:
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

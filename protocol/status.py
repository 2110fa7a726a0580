"""The status heartbeat on the wire: plain JSON, one object, so that an operator can read it.

``mosquitto_sub -t 'fedge/v1/FLEET/status/#' -v`` shows each device's retained status as
it is; Home Assistant and the like can take its fields with a JSON template. The object is
:class:`~fedge.protocol.messages.Status` dumped with its ``kind`` and without unset fields::

    {"kind":"status","device_id":"pi-07","state":"idle","timestamp":1764612000.5,
     "model_version":12,"last_round":12,"outcome":"sent",...}

Agents before this format sent the status in the tensor envelope; :func:`decode_status`
takes both, so an aggregator can be upgraded before its devices.
"""

from __future__ import annotations

import json

from pydantic import ValidationError

from .envelope import decode, parse_json
from .errors import DecodeError, EncodeError
from .messages import Status

MAX_STATUS = 8 * 1024  # bytes; a full status is about 600


def encode_status(status: Status) -> bytes:
    """The JSON bytes of ``status`` (``kind`` included, unset optional fields left out)."""
    if not isinstance(status, Status):
        raise EncodeError(f"not a status: {type(status).__name__}")
    fields = status.model_dump(mode="json", exclude_defaults=True) | {"kind": "status"}
    ordered = {"kind": "status", **{k: v for k, v in fields.items() if k != "kind"}}
    return json.dumps(ordered, separators=(",", ":"), allow_nan=False).encode()


def is_json_status(payload: bytes) -> bool:
    return payload[:1] == b"{"


def decode_status(payload: bytes) -> tuple[Status, bool]:
    """The status in ``payload`` and whether it came in the old envelope form.

    Raises only ``DecodeError`` (reasons ``too_large``, ``bad_header_json``, ``schema``, or
    the envelope's own), on any bytes.
    """
    if not is_json_status(payload):
        msg = decode(payload).msg
        if not isinstance(msg, Status):
            raise DecodeError("schema", f"a {msg.kind} message where a status belongs")
        return msg, True
    if len(payload) > MAX_STATUS:
        raise DecodeError("too_large", f"status of {len(payload)} bytes, max {MAX_STATUS}")
    obj = parse_json(bytes(payload), "status")  # no NaN, no duplicate keys
    try:
        return Status.model_validate_json(json.dumps(obj), strict=True), False
    except ValidationError as exc:
        raise DecodeError("schema", f"status fails validation: {exc}") from exc

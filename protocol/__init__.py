"""What crosses the wire (version 1): topic names, message schemas, the tensor envelope, and
the link to the broker (paho, or an in-memory twin for tests). Imports nothing else of ours;
only ``paho_link`` imports paho, and only when a PahoLink is made.
"""

from .envelope import DEFAULT_LIMITS, Decoded, Limits, RejectCounter, decode, encode
from .errors import DecodeError, EncodeError, InvalidId, LinkError, ProtocolError
from .link import Link, Message, make_link
from .memory_link import MemoryBroker, MemoryLink
from .messages import (
    GlobalModelHeader,
    Header,
    RoundAnnouncement,
    SkipNotice,
    Status,
    TrainingConfig,
    UpdateHeader,
)
from .topics import Topics, topic_matches, validate_id

__all__ = [
    "DEFAULT_LIMITS",
    "DecodeError",
    "Decoded",
    "EncodeError",
    "GlobalModelHeader",
    "Header",
    "InvalidId",
    "Limits",
    "Link",
    "LinkError",
    "MemoryBroker",
    "MemoryLink",
    "Message",
    "ProtocolError",
    "RejectCounter",
    "RoundAnnouncement",
    "SkipNotice",
    "Status",
    "Topics",
    "TrainingConfig",
    "UpdateHeader",
    "decode",
    "encode",
    "make_link",
    "topic_matches",
    "validate_id",
]

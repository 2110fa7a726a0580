"""What crosses the wire (version 1): topic names, message schemas, the tensor envelope, and
the Ed25519 signatures on rounds and global models, and the link to the broker (paho, or an
in-memory twin for tests). Imports nothing else of ours;
only ``paho_link`` imports paho, and only when a PahoLink is made.
"""

from .chunking import CHUNK_REASONS, ChunkError, Expired, Reassembler, is_chunk, split
from .clipping import clip_l2, l2_norm
from .codecs import (
    CODEC_REASONS,
    CodecError,
    CodecSpec,
    Encoded,
    decode_delta,
    encode_delta,
    encoded_nbytes,
    parse_codec,
)
from .envelope import DEFAULT_LIMITS, Decoded, Limits, RejectCounter, decode, encode
from .errors import DecodeError, EncodeError, InvalidId, LinkError, ProtocolError
from .link import Link, Message, TlsSettings, make_link
from .memory_link import MemoryBroker, MemoryLink
from .messages import (
    Evaluation,
    GateSettings,
    GlobalDeltaHeader,
    GlobalModelHeader,
    Header,
    PrivacySettings,
    RoundAnnouncement,
    SecureSettings,
    ShardAccepted,
    ShardClose,
    ShardPartial,
    SkipNotice,
    Status,
    TrainingConfig,
    UpdateHeader,
)
from .signing import SIGNATURE_REASONS, SignatureError, is_signed, sign, verify
from .skip import decode_skip, encode_skip, is_skip
from .topics import Topics, topic_matches, validate_id

__all__ = [
    "CHUNK_REASONS",
    "CODEC_REASONS",
    "DEFAULT_LIMITS",
    "SIGNATURE_REASONS",
    "ChunkError",
    "CodecError",
    "CodecSpec",
    "DecodeError",
    "Decoded",
    "EncodeError",
    "Encoded",
    "Evaluation",
    "Expired",
    "GateSettings",
    "GlobalDeltaHeader",
    "GlobalModelHeader",
    "Header",
    "InvalidId",
    "Limits",
    "Link",
    "LinkError",
    "MemoryBroker",
    "MemoryLink",
    "Message",
    "PrivacySettings",
    "ProtocolError",
    "Reassembler",
    "RejectCounter",
    "RoundAnnouncement",
    "SecureSettings",
    "ShardAccepted",
    "ShardClose",
    "ShardPartial",
    "SignatureError",
    "SkipNotice",
    "Status",
    "TlsSettings",
    "Topics",
    "TrainingConfig",
    "UpdateHeader",
    "clip_l2",
    "decode",
    "decode_delta",
    "decode_skip",
    "encode",
    "encode_delta",
    "encode_skip",
    "encoded_nbytes",
    "is_chunk",
    "is_signed",
    "is_skip",
    "l2_norm",
    "make_link",
    "parse_codec",
    "sign",
    "split",
    "topic_matches",
    "validate_id",
    "verify",
]

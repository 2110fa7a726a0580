"""Bytes on the wire at the MQTT layer (3.1.1), for accounting what a message really costs.

A PUBLISH is a fixed header (1 byte + the remaining length as a 1-4 byte varint), the topic
(2-byte length + UTF-8), a 2-byte packet id for QoS 1 and 2, then the payload. QoS 1 adds a
4-byte PUBACK in the other direction. TCP/IP and TLS overhead are not counted.
"""

from __future__ import annotations

PUBACK_SIZE = 4


def _varint_len(n: int) -> int:
    size = 1
    while n >= 128:
        n >>= 7
        size += 1
    return size


def publish_size(topic: str, payload_len: int, qos: int = 1) -> int:
    """Bytes of one PUBLISH packet carrying ``payload_len`` bytes on ``topic``."""
    remaining = 2 + len(topic.encode("utf-8")) + (2 if qos > 0 else 0) + payload_len
    return 1 + _varint_len(remaining) + remaining

"""``Sample``: one reading of one sensor, as the framing decoders hand it to the agent.

The framing layer does not judge values: NaN and infinities pass through as the firmware sent
them (the store and the task decide what to do with them). Bounds that a wire format imposes
(u8 sensor id, u16 sequence number, u32 timestamp, at most 32 float32 channels in a binary
frame) are checked by that format's encoder, not here.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Sample:
    """One reading.

    Attributes:
        sensor_id: which sensor (or MCU) produced it; text lines without ``id=`` get the
            decoder's default.
        seq: the firmware's frame counter, or None when the format carried none (CSV lines).
            Binary frames carry a u16 that wraps.
        timestamp_ms: the MCU's clock in milliseconds (``millis()``), or None when not sent.
            It is the MCU's clock, not wall time; binary frames carry a u32 that wraps.
        values: the channel readings, in channel order.
        label: an optional class label sent by the firmware (text lines: ``label=3``).
    """

    sensor_id: int
    seq: int | None
    timestamp_ms: int | None
    values: tuple[float, ...]
    label: int | None = None

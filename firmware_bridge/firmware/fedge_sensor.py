# fedge reference firmware (MicroPython, e.g. Raspberry Pi Pico): two ADC channels as fedge
# binary frames. Same format as fedge_sensor.ino; see README.md.
import struct
import sys
import time

from machine import ADC

SENSOR_ID = 1
ADCS = (ADC(26), ADC(27))
PERIOD_MS = 10  # 100 samples per second
VREF = 3.3


def crc16_ccitt_false(data):
    crc = 0xFFFF
    for byte in data:
        crc ^= byte << 8
        for _ in range(8):
            crc = ((crc << 1) ^ 0x1021) if crc & 0x8000 else (crc << 1)
            crc &= 0xFFFF
    return crc


def cobs_encode(data):
    out = bytearray(b"\x00")
    code_at, code = 0, 1
    for byte in data:
        if byte == 0:
            out[code_at] = code
            code_at, code = len(out), 1
            out.append(0)
        else:
            out.append(byte)
            code += 1
            if code == 0xFF:
                out[code_at] = code
                code_at, code = len(out), 1
                out.append(0)
    out[code_at] = code
    return bytes(out)


def frame(seq, now_ms, values):
    body = struct.pack("<BBHIB", 1, SENSOR_ID, seq & 0xFFFF, now_ms & 0xFFFFFFFF, len(values))
    body += struct.pack("<%df" % len(values), *values)
    body += struct.pack("<H", crc16_ccitt_false(body))
    return cobs_encode(body) + b"\x00"


out = sys.stdout.buffer
out.write(b"\x00")  # a lone delimiter: the host resynchronises after a reset
seq = 0
while True:
    start = time.ticks_ms()
    volts = [adc.read_u16() * VREF / 65535 for adc in ADCS]
    out.write(frame(seq, start, volts))
    seq += 1
    time.sleep_ms(max(0, PERIOD_MS - time.ticks_diff(time.ticks_ms(), start)))

// fedge reference firmware (Arduino): two analog channels as fedge binary frames.
//
// Frame (all little-endian), then COBS-encoded and terminated by a 0x00 byte:
//   version u8 (=1) | sensor id u8 | sequence u16 | millis() u32 | channel count u8 |
//   channel values float32 x count | CRC-16/CCITT-FALSE u16 over everything before it
// This is what fedge.firmware_bridge.binary_frames decodes. See README.md for wiring.

#include <Arduino.h>

const uint8_t SENSOR_ID = 1;
const uint8_t CHANNELS = 2;
const uint8_t PINS[CHANNELS] = {A0, A1};
const unsigned long PERIOD_MS = 10;  // 100 samples per second
const float VREF = 5.0;              // 3.3 on 3.3 V boards

uint16_t seq = 0;

uint16_t crc16_ccitt_false(const uint8_t *data, size_t len) {
  uint16_t crc = 0xFFFF;
  for (size_t i = 0; i < len; i++) {
    crc ^= (uint16_t)data[i] << 8;
    for (uint8_t b = 0; b < 8; b++) {
      crc = (crc & 0x8000) ? (crc << 1) ^ 0x1021 : crc << 1;
    }
  }
  return crc;
}

// COBS: replace every 0x00 so that 0x00 can mark the end of a frame.
size_t cobs_encode(const uint8_t *in, size_t len, uint8_t *out) {
  size_t read = 0, write = 1, code_at = 0;
  uint8_t code = 1;
  while (read < len) {
    if (in[read] == 0) {
      out[code_at] = code; code = 1; code_at = write++;
    } else {
      out[write++] = in[read]; code++;
      if (code == 0xFF) { out[code_at] = code; code = 1; code_at = write++; }
    }
    read++;
  }
  out[code_at] = code;
  return write;
}

void put16(uint8_t *p, uint16_t v) { p[0] = v & 0xFF; p[1] = v >> 8; }
void put32(uint8_t *p, uint32_t v) { for (int i = 0; i < 4; i++) p[i] = (v >> (8 * i)) & 0xFF; }

void setup() {
  Serial.begin(115200);
  Serial.write((uint8_t)0);  // a lone delimiter: the host resynchronises after a reset
}

void loop() {
  static unsigned long next = 0;
  unsigned long now = millis();
  if ((long)(now - next) < 0) return;
  next = now + PERIOD_MS;

  uint8_t frame[9 + 4 * CHANNELS + 2];
  frame[0] = 1;
  frame[1] = SENSOR_ID;
  put16(frame + 2, seq++);
  put32(frame + 4, now);
  frame[8] = CHANNELS;
  for (uint8_t c = 0; c < CHANNELS; c++) {
    float volts = analogRead(PINS[c]) * VREF / 1023.0;
    memcpy(frame + 9 + 4 * c, &volts, 4);  // AVR and ARM are little-endian
  }
  size_t body = 9 + 4 * CHANNELS;
  put16(frame + body, crc16_ccitt_false(frame, body));

  uint8_t out[sizeof(frame) + 2];
  size_t n = cobs_encode(frame, sizeof(frame), out);
  out[n++] = 0;
  Serial.write(out, n);
}

"""A broker stub that speaks just enough MQTT 3.1.1 for a test to choose what a CONNACK says
(a new session, a present one, a refusal) and to see the SUBSCRIBE and UNSUBSCRIBE packets a
client sends: what a crashed broker restored from an older save looks like to a client, which
a real Mosquitto cannot be made to do on demand. One client at a time; binds 127.0.0.1 on a
free port."""

from __future__ import annotations

import contextlib
import socket
import struct
import threading


class FakeBroker:
    def __init__(self) -> None:
        self.srv = socket.socket()
        self.srv.bind(("127.0.0.1", 0))
        self.srv.listen(8)
        self.port = self.srv.getsockname()[1]
        self.mode = "new"  # the next CONNACK: "new" session, "present" session, "refuse"
        self.events: list[tuple[str, tuple[str, ...]]] = []  # ("CONNECT", (mode,)), ...
        self.conn: socket.socket | None = None
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def close(self) -> None:
        self.drop()
        self.srv.close()

    def drop(self) -> None:
        """Close the client's connection, as a broker that crashed."""
        with self._lock:
            conn, self.conn = self.conn, None
        if conn is not None:
            with contextlib.suppress(OSError):  # the client may have closed it first
                conn.shutdown(socket.SHUT_RDWR)
            conn.close()

    def seen(self, kind: str) -> list[tuple[str, ...]]:
        with self._lock:
            return [what for k, what in self.events if k == kind]

    def _note(self, kind: str, what: tuple[str, ...]) -> None:
        with self._lock:
            self.events.append((kind, what))

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.srv.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    @staticmethod
    def _read(conn: socket.socket, n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = conn.recv(n - len(data))
            if not chunk:
                raise EOFError
            data += chunk
        return data

    @staticmethod
    def _topics(body: bytes, with_qos: bool) -> tuple[str, ...]:
        out, i = [], 2  # after the packet id
        while i < len(body):
            (n,) = struct.unpack(">H", body[i : i + 2])
            out.append(body[i + 2 : i + 2 + n].decode())
            i += 2 + n + (1 if with_qos else 0)
        return tuple(out)

    def _serve(self, conn: socket.socket) -> None:
        try:
            while True:
                head = self._read(conn, 1)[0]
                mult, length = 1, 0
                while True:
                    digit = self._read(conn, 1)[0]
                    length += (digit & 127) * mult
                    mult *= 128
                    if not digit & 128:
                        break
                body = self._read(conn, length) if length else b""
                kind = head & 0xF0
                if kind == 0x10:  # CONNECT
                    mode = self.mode
                    self._note("CONNECT", (mode,))
                    if mode == "refuse":  # not authorised
                        conn.sendall(b"\x20\x02\x00\x05")
                        conn.close()
                        return
                    present = b"\x01" if mode == "present" else b"\x00"
                    conn.sendall(b"\x20\x02" + present + b"\x00")
                    with self._lock:
                        self.conn = conn
                elif kind == 0x80:  # SUBSCRIBE: granted at QoS 1
                    topics = self._topics(body, with_qos=True)
                    self._note("SUBSCRIBE", topics)
                    conn.sendall(bytes([0x90, 2 + len(topics)]) + body[:2] + b"\x01" * len(topics))
                elif kind == 0xA0:  # UNSUBSCRIBE
                    self._note("UNSUBSCRIBE", self._topics(body, with_qos=False))
                    conn.sendall(b"\xb0\x02" + body[:2])
                elif kind == 0x30:  # PUBLISH: acked at QoS 1
                    (n,) = struct.unpack(">H", body[:2])
                    if (head >> 1) & 3:
                        conn.sendall(b"\x40\x02" + body[2 + n : 4 + n])
                elif kind == 0xC0:  # PINGREQ
                    conn.sendall(b"\xd0\x00")
                elif kind == 0xE0:  # DISCONNECT
                    conn.close()
                    return
        except (EOFError, OSError):
            return

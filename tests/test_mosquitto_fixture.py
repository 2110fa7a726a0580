"""The test broker itself: it listens where it says, speaks MQTT 3.1.1, survives restart().

Raw sockets and a hand-written CONNECT packet, so a failure here is the broker's or the
fixture's, never paho's.
"""

from __future__ import annotations

import socket
import sys
from pathlib import Path

import pytest

# tests/conftest.py does this too; repeated so this file also runs on its own.
sys.path.insert(0, str(Path(__file__).parent))

from mosquitto import MosquittoServer, free_port

pytestmark = pytest.mark.broker

CONNACK_ACCEPTED = bytes([0x20, 0x02, 0x00, 0x00])  # CONNACK, session present 0, return code 0
DISCONNECT = bytes([0xE0, 0x00])


def _mqtt_string(text: str) -> bytes:
    raw = text.encode()
    return len(raw).to_bytes(2, "big") + raw


def connect_packet(client_id: str, keepalive: int = 30) -> bytes:
    """An MQTT 3.1.1 CONNECT with clean session and no will, username or password."""
    variable_header = _mqtt_string("MQTT") + bytes([4, 0x02]) + keepalive.to_bytes(2, "big")
    body = variable_header + _mqtt_string(client_id)
    assert len(body) < 128  # one-byte remaining length
    return bytes([0x10, len(body)]) + body


def _recv_exactly(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise ConnectionError(f"broker closed the connection after {data!r}")
        data += chunk
    return data


def mqtt_handshake(host: str, port: int, client_id: str) -> bytes:
    """Send CONNECT, return the 4-byte CONNACK, then DISCONNECT cleanly."""
    with socket.create_connection((host, port), timeout=5) as sock:
        sock.sendall(connect_packet(client_id))
        connack = _recv_exactly(sock, 4)
        sock.sendall(DISCONNECT)
        return connack


@pytest.fixture
def broker(tmp_path: Path):
    with MosquittoServer(workdir=tmp_path) as server:
        yield server


def test_broker_accepts_tcp_and_an_mqtt_connect(broker: MosquittoServer) -> None:
    assert broker.url == f"mqtt://127.0.0.1:{broker.port}"
    assert broker.port != 1883
    with socket.create_connection((broker.host, broker.port), timeout=5):
        pass

    assert mqtt_handshake(broker.host, broker.port, "fixture-check") == CONNACK_ACCEPTED


def test_restart_keeps_the_port_and_accepts_connections_again(broker: MosquittoServer) -> None:
    port = broker.port
    assert mqtt_handshake(broker.host, port, "before-restart") == CONNACK_ACCEPTED

    broker.restart()

    assert broker.running
    assert broker.port == port
    assert broker.url == f"mqtt://127.0.0.1:{port}"
    assert mqtt_handshake(broker.host, port, "after-restart") == CONNACK_ACCEPTED


def test_stopped_broker_refuses_connections(broker: MosquittoServer) -> None:
    broker.stop()

    assert not broker.running
    with pytest.raises(OSError):
        socket.create_connection((broker.host, broker.port), timeout=1).close()


def test_a_broker_that_cannot_start_says_why(tmp_path: Path) -> None:
    bad = tmp_path / "bad.conf"
    bad.write_text("no_such_option true\n")
    server = MosquittoServer(config=bad, port=free_port(), workdir=tmp_path / "run")
    (tmp_path / "run").mkdir()

    with pytest.raises(RuntimeError, match="no_such_option"):
        server.start()
    assert not server.running

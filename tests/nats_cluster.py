"""A real NATS cluster speaking MQTT on free ports, for the broker tier of the tests.

Every node runs ``broker_config/nats-cluster.conf`` unchanged: the file reads its per-node
values (name, ports, store directory, routes) from ``FEDGE_NATS_*`` environment variables, which
nats-server substitutes itself. ``NatsCluster`` picks free ports on 127.0.0.1 (never 4222, 6222,
8222 or 1883), writes each node's variables to ``<name>.env`` in a work directory (to start one
by hand: ``set -a; . n1.env; nats-server -c broker_config/nats-cluster.conf``), starts the nodes
with their output in ``<name>.log`` and waits until the cluster has formed: every node routes to
all the others (``/routez``), JetStream has a meta leader (``/jsz``) and every node answers an
MQTT CONNECT with a CONNACK::

    with NatsCluster(3) as cluster:
        client.connect(cluster.nodes[0].host, cluster.nodes[0].mqtt_port)
        other = make_link(cluster.nodes[2].url, "agg")

Plain functions and classes, no pytest imports: ``tests/conftest.py`` wraps them in a fixture.

Errors: ``RuntimeError`` when nats-server is not installed, a node exits at start-up, or the
cluster does not form within the timeout; the message carries the tail of every node's log.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

REPO = Path(__file__).resolve().parent.parent
CLUSTER_CONFIG = REPO / "broker_config" / "nats-cluster.conf"
HOST = "127.0.0.1"

START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 5.0
LOG_TAIL_LINES = 20
# CONNECT, MQTT 3.1.1, clean session, keepalive 10 s, client id "fedge-ready": a node that
# answers it with CONNACK 0 serves MQTT (its JetStream streams for sessions exist).
MQTT_CONNECT = b"\x10\x17\x00\x04MQTT\x04\x02\x00\x0a\x00\x0bfedge-ready"
MQTT_CONNACK_OK = b"\x20\x02\x00\x00"
MQTT_DISCONNECT = b"\xe0\x00"


def find_nats_server() -> str:
    """Path of the nats-server binary, or RuntimeError saying how the tests get one."""
    found = shutil.which("nats-server")
    if found:
        return found
    for candidate in ("/usr/sbin/nats-server", "/usr/local/bin/nats-server"):
        if os.access(candidate, os.X_OK):
            return candidate
    raise RuntimeError(
        "nats-server is not installed, and the NATS cluster test needs it: run `make test` (it"
        " installs it when run as root) or `sudo apt-get install nats-server`"
    )


def free_ports(count: int, host: str = HOST) -> list[int]:
    """``count`` different TCP ports that nothing listens on right now (the OS picks them)."""
    socks = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            socks.append(sock)
            sock.bind((host, 0))  # all bound at once: the OS cannot hand out one port twice
        return [s.getsockname()[1] for s in socks]
    finally:
        for sock in socks:
            sock.close()


@dataclass
class NatsNode:
    """One nats-server of the cluster; ``url`` is its MQTT listener for fedge's ``broker``."""

    name: str
    host: str
    port: int  # NATS clients
    http_port: int  # monitoring
    cluster_port: int  # routes
    mqtt_port: int
    store_dir: Path
    log_path: Path
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.mqtt_port}"

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def environment(self, routes: list[str]) -> dict[str, str]:
        return {
            "FEDGE_NATS_NAME": self.name,
            "FEDGE_NATS_HOST": self.host,
            "FEDGE_NATS_PORT": str(self.port),
            "FEDGE_NATS_HTTP_PORT": str(self.http_port),
            "FEDGE_NATS_CLUSTER_PORT": str(self.cluster_port),
            "FEDGE_NATS_MQTT_PORT": str(self.mqtt_port),
            "FEDGE_NATS_STORE_DIR": str(self.store_dir),
            "FEDGE_NATS_ROUTES": "[" + ", ".join(routes) + "]",
        }

    def monitor(self, endpoint: str) -> dict:
        """A monitoring endpoint's JSON (``routez``, ``jsz``); {} while it does not answer."""
        url = f"http://{self.host}:{self.http_port}/{endpoint}"
        try:
            with urllib.request.urlopen(url, timeout=1.0) as response:
                data: dict = json.load(response)
                return data
        except (OSError, ValueError):
            return {}

    def serves_mqtt(self) -> bool:
        try:
            with socket.create_connection((self.host, self.mqtt_port), timeout=1.0) as sock:
                sock.settimeout(5.0)
                sock.sendall(MQTT_CONNECT)
                answer = sock.recv(4)
                sock.sendall(MQTT_DISCONNECT)
                return answer == MQTT_CONNACK_OK
        except OSError:
            return False

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return "(no log written)"
        return "\n".join(text.splitlines()[-lines:])


class NatsCluster:
    """``size`` nats-server nodes on ``host``, routed to each other, MQTT on each.

    ``workdir`` holds each node's ``.env``, log and JetStream store; when not given a temporary
    directory is made and ``close()``/``__exit__`` removes it.
    """

    def __init__(
        self,
        size: int = 3,
        *,
        config: Path = CLUSTER_CONFIG,
        host: str = HOST,
        workdir: Path | None = None,
        start_timeout: float = START_TIMEOUT_S,
    ) -> None:
        self.config = Path(config)
        self.host = host
        self.start_timeout = start_timeout
        self._own_workdir = workdir is None
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="fedge-nats-"))
        ports = free_ports(4 * size, host)
        self.nodes = [
            NatsNode(
                name=f"n{i + 1}",
                host=host,
                port=ports[4 * i],
                http_port=ports[4 * i + 1],
                cluster_port=ports[4 * i + 2],
                mqtt_port=ports[4 * i + 3],
                store_dir=self.workdir / f"n{i + 1}-store",
                log_path=self.workdir / f"n{i + 1}.log",
            )
            for i in range(size)
        ]

    @property
    def routes(self) -> list[str]:
        return [f"nats://{n.host}:{n.cluster_port}" for n in self.nodes]

    def logs(self) -> str:
        return "\n".join(f"--- {n.name} ({n.log_path}):\n{n.log_tail()}" for n in self.nodes)

    def start(self) -> NatsCluster:
        """Start every node and return once the cluster has formed and each serves MQTT."""
        binary = find_nats_server()
        self.workdir.mkdir(parents=True, exist_ok=True)
        for node in self.nodes:
            env = node.environment(self.routes)
            (self.workdir / f"{node.name}.env").write_text(
                "".join(f"{k}='{v}'\n" for k, v in env.items())
            )
            with node.log_path.open("ab") as log:
                node.process = subprocess.Popen(
                    [binary, "-c", str(self.config)],
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    cwd=self.workdir,
                    env={**os.environ, **env},
                )
        deadline = time.monotonic() + self.start_timeout
        waiting = self._not_ready()
        while waiting:
            exited = [n for n in self.nodes if not n.running]
            if exited or time.monotonic() > deadline:
                self.stop()
                why = (
                    f"nats-server {exited[0].name} exited while starting"
                    if exited
                    else f"the NATS cluster did not form within {self.start_timeout:g} s"
                    f" (waiting for: {waiting})"
                )
                raise RuntimeError(f"{why} (config {self.config}); logs:\n{self.logs()}")
            time.sleep(0.1)
            waiting = self._not_ready()
        return self

    def _not_ready(self) -> str:
        """What the cluster still lacks, or "" once it has formed and serves MQTT."""
        others = len(self.nodes) - 1
        for node in self.nodes:
            if node.monitor("routez").get("num_routes", 0) < others:
                return f"{node.name} to route to {others} others"
        for node in self.nodes:
            if not node.monitor("jsz").get("meta_cluster", {}).get("leader"):
                return f"{node.name} to know a JetStream meta leader"
        for node in self.nodes:
            if not node.serves_mqtt():
                return f"{node.name} to answer an MQTT CONNECT"
        return ""

    def stop(self) -> None:
        """Terminate every node (SIGTERM, then SIGKILL after 5 s). Safe to call twice."""
        for node in self.nodes:
            if node.process is not None and node.process.poll() is None:
                node.process.terminate()
        for node in self.nodes:
            process, node.process = node.process, None
            if process is None:
                continue
            try:
                process.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()

    def close(self) -> None:
        """Stop the nodes and remove the work directory if this object made it."""
        self.stop()
        if self._own_workdir:
            shutil.rmtree(self.workdir)

    def __enter__(self) -> NatsCluster:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        nodes = ", ".join(f"{n.name} {n.url}" for n in self.nodes)
        return f"NatsCluster({nodes}, workdir={self.workdir})"

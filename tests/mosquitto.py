"""A real Mosquitto broker on a free port, for the broker tier of the tests.

The project's broker settings live in ``broker_config/dev.conf`` without a listener line
(Mosquitto 2 does not substitute environment variables). ``MosquittoServer`` writes a generated
config into a temporary directory, ``listener PORT 127.0.0.1`` followed by that file, starts
``mosquitto -c`` on it with stdout and stderr going to ``mosquitto.log`` beside it, and waits until
the port accepts TCP connections::

    with MosquittoServer() as broker:
        client.connect(broker.host, broker.port)
        broker.restart()  # same port: clients must reconnect on their own

``MosquittoServer.production(pki_dir)`` runs ``broker_config/production.conf`` instead: its
two listeners move to free ports on 127.0.0.1 (``tls_port`` for client certificates,
``password_port`` for username and password), its certificate, CRL, ACL and password files are
taken from the provisioning folder ``pki_dir`` (by file name: ``cafile .../ca.crt`` becomes
``PKI/ca.crt``; ``extra_config`` too, e.g. a site broker's ``bridge.conf`` with the folder
``PKI/sites/SITE`` that ``fedge provision --site-gateway`` writes), and persistence goes to the
work directory::

    init_fleet(pki, "f1"); provision_device(pki, "dev-1", "f1")
    with MosquittoServer.production(pki) as broker:
        client.tls_set(...); client.connect(broker.host, broker.tls_port)
        revoke_device(pki, "dev-1"); broker.reload()  # SIGHUP: ACL, passwords, CRL

Plain functions and a class, no pytest imports: ``tests/conftest.py`` wraps them in fixtures.

Errors: ``RuntimeError`` when mosquitto is not installed, exits at start-up or does not listen
within the timeout; the message carries the tail of the broker's log.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType
from typing import Any

REPO = Path(__file__).resolve().parent.parent
DEV_CONFIG = REPO / "broker_config" / "dev.conf"
PRODUCTION_CONFIG = REPO / "broker_config" / "production.conf"
# production.conf's listener ports, and the settings that name a file of the provisioning folder.
PRODUCTION_TLS_PORT = 8883
PRODUCTION_PASSWORD_PORT = 8884
PKI_SETTINGS = (
    "cafile",
    "certfile",
    "keyfile",
    "crlfile",
    "acl_file",
    "password_file",
    # a site broker's bridge to the central one (fedge provision --site-gateway: bridge.conf)
    "bridge_cafile",
    "bridge_certfile",
    "bridge_keyfile",
)
HOST = "127.0.0.1"

START_TIMEOUT_S = 10.0
STOP_TIMEOUT_S = 5.0
LOG_TAIL_LINES = 30


def find_mosquitto() -> str:
    """Path of the mosquitto binary (fedge.fleet.mosquitto's search), or RuntimeError saying
    how the tests get one."""
    from fedge.fleet.mosquitto import MosquittoError
    from fedge.fleet.mosquitto import find_mosquitto as find

    try:
        return find()
    except MosquittoError as exc:
        raise RuntimeError(
            "mosquitto is not installed, and the broker tests need a real broker: run `make"
            " test` (it installs it when run as root) or `sudo apt-get install mosquitto`"
        ) from exc


def free_port(host: str = HOST) -> int:
    """A TCP port that nothing listens on right now (the OS picks it; never 1883)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def _accepts_connections(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


class MosquittoServer:
    """One mosquitto process on ``host:port`` with ``config`` appended after the listener line.

    ``extra_config`` is appended after ``config`` (later lines win for global settings), e.g.
    ``persistence=True`` adds ``persistence true`` and a location in the work directory, for tests
    that need sessions and retained messages to survive ``restart()``.
    ``workdir`` holds the generated config, the log and any persistence file; when not given a
    temporary directory is made on the first ``start()`` and removed by ``close()``/``__exit__``.
    """

    def __init__(
        self,
        config: Path = DEV_CONFIG,
        port: int | None = None,
        *,
        host: str = HOST,
        extra_config: str = "",
        persistence: bool = False,
        workdir: Path | None = None,
        start_timeout: float = START_TIMEOUT_S,
    ) -> None:
        self.config = Path(config)
        self.host = host
        self.port = port if port is not None else free_port(host)
        self.extra_config = extra_config
        self.persistence = persistence
        self.start_timeout = start_timeout
        self._workdir = Path(workdir) if workdir is not None else None
        self._own_workdir = workdir is None
        self._process: subprocess.Popen[bytes] | None = None

    # -- where things are -------------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

    @property
    def workdir(self) -> Path:
        if self._workdir is None:
            self._workdir = Path(tempfile.mkdtemp(prefix="fedge-mosquitto-"))
        return self._workdir

    @property
    def config_path(self) -> Path:
        return self.workdir / "mosquitto.conf"

    @property
    def log_path(self) -> Path:
        return self.workdir / "mosquitto.log"

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return "(no log written)"
        return "\n".join(text.splitlines()[-lines:])

    # -- life cycle ---------------------------------------------------------------------------

    def _render_config(self) -> str:
        parts = [
            "# Generated by tests/mosquitto.py; edit broker_config/dev.conf instead.",
            f"listener {self.port} {self.host}",
            self.config.read_text(),
        ]
        if self.persistence:
            parts.append(f"persistence true\npersistence_location {self.workdir}/")
        if self.extra_config:
            parts.append(self.extra_config)
        if os.geteuid() == 0:
            # As root mosquitto would switch to the "mosquitto" user, which cannot write the
            # persistence file into a root-owned temporary directory.
            parts.append("user root")
        return "\n".join(parts) + "\n"

    def start(self) -> MosquittoServer:
        """Start the broker and return when its port accepts TCP connections."""
        if self.running:
            raise RuntimeError(f"mosquitto is already running on {self.url}")
        binary = find_mosquitto()
        self.config_path.write_text(self._render_config())
        with self.log_path.open("ab") as log:
            self._process = subprocess.Popen(
                [binary, "-c", str(self.config_path)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.workdir,
            )
        deadline = time.monotonic() + self.start_timeout
        while not _accepts_connections(self.host, self.port):
            code = self._process.poll()
            if code is not None:
                self._process = None
                raise RuntimeError(
                    f"mosquitto exited with status {code} while starting on {self.url} "
                    f"(config {self.config_path}); log tail:\n{self.log_tail()}"
                )
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(
                    f"mosquitto did not listen on {self.url} within {self.start_timeout:g} s "
                    f"(config {self.config_path}); log tail:\n{self.log_tail()}"
                )
            time.sleep(0.05)
        return self

    def stop(self) -> None:
        """Terminate the broker (SIGTERM, then SIGKILL after 5 s). Safe to call twice."""
        process, self._process = self._process, None
        if process is None:
            return
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """The broker stopped (SIGSTOP) for the block: it reads nothing, so what clients
        write backs up in their sockets; it goes on (SIGCONT) after."""
        assert self._process is not None, "the broker is not running"
        self._process.send_signal(signal.SIGSTOP)
        try:
            yield
        finally:
            self._process.send_signal(signal.SIGCONT)

    def restart(self) -> MosquittoServer:
        """Stop and start again on the same port (connected clients see the connection drop)."""
        self.stop()
        return self.start()

    def reload(self, timeout: float = START_TIMEOUT_S) -> None:
        """SIGHUP, and return once the broker has logged that it reloads its config (it reloads
        in its one event loop, so connections made after this see the new ACL, passwords and
        CRL). Connected clients stay connected."""
        if self._process is None or not self.running:
            raise RuntimeError(f"mosquitto is not running on {self.url}")
        before = self._reloads()
        self._process.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + timeout
        while self._reloads() == before:
            if time.monotonic() > deadline:
                raise RuntimeError(f"mosquitto did not reload; log tail:\n{self.log_tail()}")
            time.sleep(0.02)

    def _reloads(self) -> int:
        try:
            return self.log_path.read_text(errors="replace").count("Reloading config.")
        except FileNotFoundError:
            return 0

    @classmethod
    def production(cls, pki_dir: Path, **kwargs: Any) -> ProductionMosquitto:
        """``broker_config/production.conf`` on free ports with the files of ``pki_dir``
        (keyword arguments as for ``ProductionMosquitto``)."""
        return ProductionMosquitto(pki_dir, **kwargs)

    def close(self) -> None:
        """Stop the broker and remove the work directory if this object made it."""
        self.stop()
        if self._own_workdir and self._workdir is not None:
            shutil.rmtree(self._workdir)
            self._workdir = None

    def __enter__(self) -> MosquittoServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"MosquittoServer({self.url}, {state}, workdir={self._workdir})"


def production_config(
    text: str, pki_dir: Path, workdir: Path, ports: dict[int, int], host: str = HOST
) -> str:
    """``text`` (production.conf) with ``listener N`` -> ``listener ports[N] host``, every
    PKI_SETTINGS path -> the file of that name in ``pki_dir``, and persistence in ``workdir``."""
    out = []
    for line in text.splitlines():
        words = line.split()
        key = words[0] if words and not line.startswith("#") else ""
        if key == "listener":
            port = int(words[1])
            if port not in ports:
                raise RuntimeError(
                    f"production.conf has a listener on {port}; the fixture knows "
                    f"only {sorted(ports)}"
                )
            line = f"listener {ports[port]} {host}"
        elif key in PKI_SETTINGS:
            path = Path(pki_dir) / Path(words[1]).name
            if not path.is_file():
                raise RuntimeError(f"{key} {words[1]}: {path} does not exist (provision first)")
            line = f"{key} {path}"
        elif key == "persistence_location":
            line = f"persistence_location {workdir}/"
        out.append(line)
    return "\n".join(out) + "\n"


class ProductionMosquitto(MosquittoServer):
    """``broker_config/production.conf`` with the provisioning folder ``pki_dir`` (made by
    fedge.provision): ``tls_port`` (client certificates, also ``port``) and ``password_port``
    (username and password), both TLS on ``host``. Use ``reload()`` after a revocation."""

    def __init__(
        self,
        pki_dir: Path,
        *,
        config: Path = PRODUCTION_CONFIG,
        host: str = HOST,
        extra_config: str = "",
        workdir: Path | None = None,
        start_timeout: float = START_TIMEOUT_S,
    ) -> None:
        super().__init__(
            config,
            host=host,
            extra_config=extra_config,
            workdir=workdir,
            start_timeout=start_timeout,
        )
        self.pki_dir = Path(pki_dir)
        self.password_port = free_port(host)
        while self.password_port == self.port:
            self.password_port = free_port(host)

    @property
    def tls_port(self) -> int:
        return self.port

    @property
    def url(self) -> str:
        return f"mqtts://{self.host}:{self.port}"

    def _render_config(self) -> str:
        ports = {PRODUCTION_TLS_PORT: self.port, PRODUCTION_PASSWORD_PORT: self.password_port}
        parts = [
            f"# Generated by tests/mosquitto.py from {self.config} and {self.pki_dir}.",
            production_config(
                self.config.read_text(), self.pki_dir, self.workdir, ports, self.host
            ),
        ]
        if self.extra_config:  # e.g. a site broker's bridge.conf: its paths mapped the same way
            parts.append(
                production_config(self.extra_config, self.pki_dir, self.workdir, ports, self.host)
            )
        if os.geteuid() == 0:
            # As root mosquitto would read the PKI as the "mosquitto" user, who cannot.
            parts.append("user root")
        return "\n".join(parts) + "\n"

    def start(self) -> ProductionMosquitto:
        """Start, and return when both listeners accept TCP connections."""
        super().start()
        deadline = time.monotonic() + self.start_timeout
        while not _accepts_connections(self.host, self.password_port):
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(
                    f"mosquitto did not listen on {self.host}:{self.password_port}; "
                    f"log tail:\n{self.log_tail()}"
                )
            time.sleep(0.05)
        return self

    def __enter__(self) -> ProductionMosquitto:
        return self.start()

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return (
            f"ProductionMosquitto({self.url}, password port {self.password_port}, {state}, "
            f"pki={self.pki_dir}, workdir={self._workdir})"
        )

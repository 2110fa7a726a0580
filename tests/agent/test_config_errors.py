"""`fedge agent` with a bad config exits 78 (EX_CONFIG) with one line per problem, each naming
the field; other user errors exit 2."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from helpers import DIGITS_MODEL

pytestmark = pytest.mark.unit


def run_agent(tmp_path: Path, body: str) -> subprocess.CompletedProcess[str]:
    cfg = tmp_path / "agent.toml"
    cfg.write_text(body)
    return subprocess.run(
        [sys.executable, "-m", "fedge.cli", "agent", "--config", str(cfg)],
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.fixture
def data_file(tmp_path: Path) -> Path:
    import numpy as np

    path = tmp_path / "part.npz"
    np.savez(path, x=np.zeros((4, 64), np.float32), y=np.zeros(4, np.int32))
    return path


def good(data_file: Path) -> str:
    return (
        f'device_id = "pi-1"\nmodel = "{DIGITS_MODEL}"\ndata = "{data_file}"\n'
        f'state_dir = "{data_file.parent}"\n'
    )


@pytest.mark.parametrize(
    ("extra", "field", "problem"),
    [
        ('colour = "blue"\n', "colour", "unknown key"),
        ('keepalive = "often"\n', "keepalive", "valid integer"),
        ('model = "/nonexistent/model.tflite"\n', "model", "file does not exist"),
    ],
    ids=["unknown-key", "wrong-type", "missing-model"],
)
def test_bad_config_is_one_line(
    tmp_path: Path, data_file: Path, extra: str, field: str, problem: str
) -> None:
    body = good(data_file)
    if extra.startswith("model"):
        body = "\n".join(line for line in body.splitlines() if not line.startswith("model")) + "\n"
    proc = run_agent(tmp_path, body + extra)
    assert proc.returncode == 78
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    assert f"{field}:" in lines[0] and problem in lines[0], lines[0]


def test_missing_required_key_and_missing_file(tmp_path: Path, data_file: Path) -> None:
    proc = run_agent(tmp_path, f'model = "{DIGITS_MODEL}"\ndata = "{data_file}"\n')
    assert proc.returncode == 78 and "device_id: required key is missing" in proc.stderr
    proc = subprocess.run(
        [sys.executable, "-m", "fedge.cli", "agent", "--config", str(tmp_path / "nope.toml")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert (
        proc.returncode == 78
        and proc.stderr.count("\n") == 1
        and "no such config file" in proc.stderr
    )


def test_every_problem_is_one_line(tmp_path: Path, data_file: Path) -> None:
    body = good(data_file) + 'colour = "blue"\nkeepalive = "often"\nnum_threads = 0\n'
    proc = run_agent(tmp_path, body)
    assert proc.returncode == 78
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 3, proc.stderr
    assert all(line.startswith(f"fedge: error: {tmp_path / 'agent.toml'}: ") for line in lines)
    assert {line.split(": ")[3] for line in lines} == {"colour", "keepalive", "num_threads"}
    assert "more problem" not in proc.stderr


@pytest.mark.parametrize(
    ("tls", "field", "problem"),
    [
        ('ca_file = "nope.crt"\n', "tls.ca_file", "file does not exist"),
        ('cert_file = "c.pem"\n', "tls", "cert_file and key_file go together"),
        ('username = "u"\n', "tls", "username and password_file go together"),
    ],
    ids=["missing-ca", "cert-without-key", "user-without-password"],
)
def test_tls_problems_name_the_field(
    tmp_path: Path, data_file: Path, tls: str, field: str, problem: str
) -> None:
    (tmp_path / "c.pem").write_text("x")
    body = good(data_file).replace("device_id", 'broker = "mqtts://h:8883"\ndevice_id') + "[tls]\n"
    proc = run_agent(tmp_path, body + tls)
    assert proc.returncode == 78, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and f"{field}: " in lines[0] and problem in lines[0], proc.stderr


def test_an_unreadable_key_file_names_the_field(
    tmp_path: Path, data_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fedge.agent.config import AgentConfig

    from fedge.configfile import ConfigError, load_config

    secret = tmp_path / "pw"
    secret.write_text("s3cret\n")
    real_open = Path.open

    def deny(self: Path, *args: object, **kwargs: object):  # type: ignore[no-untyped-def]
        if self == secret:  # root reads any file: deny it here instead of with chmod
            raise PermissionError(13, "Permission denied", str(self))
        return real_open(self, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(Path, "open", deny)
    cfg = tmp_path / "agent.toml"
    cfg.write_text(good(data_file) + '[tls]\nusername = "u"\npassword_file = "pw"\n')
    with pytest.raises(ConfigError) as err:
        load_config(cfg, AgentConfig)
    assert err.value.problems == [
        f"{cfg}: tls.password_file: Value error, cannot read {secret} (Permission denied)"
    ]


@pytest.fixture
def pki(tmp_path: Path) -> Path:
    from fedge.provision import init_fleet, provision_device

    init_fleet(tmp_path / "pki", "f")
    provision_device(tmp_path / "pki", "pi-1", "f")
    return tmp_path / "pki"


def test_certificates_and_passwords_need_an_mqtts_broker(
    tmp_path: Path, data_file: Path, pki: Path
) -> None:
    proc = run_agent(tmp_path, good(data_file) + f'[tls]\nca_file = "{pki / "ca.crt"}"\n')
    assert proc.returncode == 78 and "not an mqtts:// URL" in proc.stderr, proc.stderr
    (tmp_path / "pw").write_text("secret")
    proc = run_agent(tmp_path, good(data_file) + '[tls]\nusername = "u"\npassword_file = "pw"\n')
    assert proc.returncode == 78 and "would be sent in clear" in proc.stderr, proc.stderr


@pytest.mark.parametrize(
    ("files", "problem"),
    [
        ({"ca_file": "junk.pem"}, "ca_file "),
        ({"cert_file": "junk.pem", "key_file": "devices/pi-1/device.key"}, "cert_file "),
        ({"cert_file": "devices/pi-1/device.crt", "key_file": "signing.key"}, "cert_file "),
    ],
    ids=["ca-not-a-certificate", "cert-not-a-certificate", "key-of-another-pair"],
)
def test_tls_files_that_are_not_what_they_say_name_the_field(
    tmp_path: Path, data_file: Path, pki: Path, files: dict[str, str], problem: str
) -> None:
    (pki / "junk.pem").write_text("not a certificate\n")
    tls = {"ca_file": "ca.crt"} | files
    body = good(data_file).replace("device_id", 'broker = "mqtts://h:8883"\ndevice_id')
    body += "[tls]\n" + "".join(f'{k} = "{pki / v}"\n' for k, v in tls.items())
    proc = run_agent(tmp_path, body)
    assert proc.returncode == 78, proc.stderr
    [line] = proc.stderr.strip().splitlines()
    assert line.startswith(f"fedge: error: {tmp_path / 'agent.toml'}: tls: ") and problem in line


def test_a_pinned_key_must_be_an_ed25519_public_key(
    tmp_path: Path, data_file: Path, pki: Path
) -> None:
    """The aggregator's public key (PEM) loads; its private key in its place, a common slip,
    stops the agent with one line naming the field."""
    from fedge.agent.config import AgentConfig

    from fedge.configfile import load_config

    cfg = tmp_path / "agent.toml"
    cfg.write_text(good(data_file) + f'aggregator_keys = ["{pki / "signing.pub"}"]\n')
    assert load_config(cfg, AgentConfig).aggregator_keys == (pki / "signing.pub",)
    proc = run_agent(tmp_path, good(data_file) + f'aggregator_keys = ["{pki / "signing.key"}"]\n')
    assert proc.returncode == 78, proc.stderr
    [line] = proc.stderr.strip().splitlines()
    assert "aggregator_keys" in line and "want an Ed25519 public key" in line, line
    assert "got no PUBLIC KEY block alone" in line, line


def test_data_that_does_not_fit_the_model(tmp_path: Path) -> None:
    import numpy as np

    bad = tmp_path / "bad.npz"
    np.savez(bad, x=np.zeros((4, 5), np.float32), y=np.zeros(4, np.int32))
    proc = run_agent(
        tmp_path,
        f'device_id = "pi-1"\nmodel = "{DIGITS_MODEL}"\ndata = "{bad}"\nstate_dir = "{tmp_path}"\n',
    )
    # LiteRT itself may print an INFO line when it loads the model; ours is exactly one line.
    ours = [line for line in proc.stderr.splitlines() if not line.startswith("INFO: ")]
    assert proc.returncode == 2 and len(ours) == 1
    assert "5 features per sample, the model takes 64" in ours[0]


def test_agent_path_imports_no_heavy_or_fleet_modules() -> None:
    code = (
        "import sys, fedge.cli, fedge.agent.service, fedge.agent.config, fedge.models.runtime;"
        "heavy=('tensorflow','sklearn','matplotlib','amqtt','rich','progpy','scipy','pandas');"
        "bad=[m for m in sys.modules if m.split('.')[0] in heavy"
        " or m.startswith('fedge.fleet') or m.startswith('fedge.aggregator')];"
        "print(','.join(bad))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == ""

"""Read a TOML config into a pydantic model, turning every failure into one line.

A headless device must say exactly which field is wrong; a traceback helps no one.
Shared by ``fedge agent`` and ``fedge aggregator``; it knows neither.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TypeVar

from pydantic import BaseModel, ValidationError, ValidationInfo

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

M = TypeVar("M", bound=BaseModel)

# Fleet, device and client ids: one MQTT topic level, the same rule as the wire's.
ID_PATTERN = r"^[A-Za-z0-9_.-]{1,64}$"
# What protocol.make_link accepts: MQTT or MQTT over TLS, an optional user[:password]@, a port.
BROKER_URL_PATTERN = r"^mqtts?://([^/@\s]+@)?[^/:@\s]+(:\d+)?/?$"

# sysexits.h EX_CONFIG: the systemd units stop restarting on it (RestartPreventExitStatus=78).
EX_CONFIG = 78


class ConfigError(ValueError):
    """A config file is missing, malformed, or fails validation.

    ``problems`` has one line per problem, each naming the file and the field; ``str()`` is
    those lines joined by newlines.
    """

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("\n".join(problems))


def describe(exc: ValidationError) -> list[str]:
    """Every validation error as ``field.path: problem``, one line each."""
    lines = []
    for err in exc.errors():
        where = ".".join(str(part) for part in err["loc"]) or "(top level)"
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        elif err["type"] == "missing":
            msg = "required key is missing"
        lines.append(f"{where}: {msg}")
    return lines


def load_config(path: str | Path, model: type[M]) -> M:
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text())
    except FileNotFoundError as exc:
        raise ConfigError([f"{path}: no such config file"]) from exc
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read ({exc.strerror})"]) from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([f"{path}: not valid TOML ({exc})"]) from exc
    try:
        return model.model_validate(raw, context={"base_dir": path.parent})
    except ValidationError as exc:
        raise ConfigError([f"{path}: {line}" for line in describe(exc)]) from exc


def resolve_path(value: Path, info: ValidationInfo) -> Path:
    """A relative path in a config file is relative to the file's folder."""
    base = (info.context or {}).get("base_dir")
    return value if value.is_absolute() or base is None else Path(base) / value


def state_folder(value: Path, info: ValidationInfo) -> Path:
    """``resolve_path``, and it is a folder or does not exist yet."""
    path = resolve_path(value, info)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{path} is a file, not a folder")
    return path


def readable_file(value: Path | None, info: ValidationInfo) -> Path | None:
    """``existing_file``, and this process can read it (a key file of the wrong owner)."""
    path = existing_file(value, info)
    if path is None:
        return None
    try:
        with path.open("rb"):
            pass
    except OSError as exc:
        raise ValueError(f"cannot read {path} ({exc.strerror})") from exc
    return path


def existing_file(value: Path | None, info: ValidationInfo) -> Path | None:
    """``resolve_path``, and the file must exist (None stays None)."""
    if value is None:
        return None
    path = resolve_path(value, info)
    if not path.is_file():
        raise ValueError(f"file does not exist: {path}")
    return path

"""Error feedback: what the codec or the gate did not send is kept and sent later.

``residual <- (delta + residual) - decoded`` after every round; a skipped round keeps the
whole ``delta + residual``. It lives next to the agent's state as an ``.npz`` replaced
atomically, so it survives a restart (Seide et al. 2014; Karimireddy et al. 2019).
"""

from __future__ import annotations

import logging
import os
import zipfile
from collections.abc import Mapping
from pathlib import Path

import numpy as np

log = logging.getLogger("fedge.agent")

Weights = Mapping[str, np.ndarray]


def add(delta: Weights, residual: Weights | None) -> dict[str, np.ndarray]:
    if not residual:
        return {k: np.asarray(v, np.float32) for k, v in delta.items()}
    return {
        k: (np.asarray(v, np.float32) + residual.get(k, 0.0)).astype(np.float32)
        for k, v in delta.items()
    }


def subtract(full: Weights, sent: Weights) -> dict[str, np.ndarray]:
    return {k: (np.asarray(v, np.float32) - sent[k]).astype(np.float32) for k, v in full.items()}


def load(path: Path, shapes: Mapping[str, tuple[int, ...]]) -> dict[str, np.ndarray] | None:
    """The stored residual, or None when there is none or it no longer fits the model."""
    try:
        with np.load(path, allow_pickle=False) as npz:
            stored = {k: np.asarray(npz[k], np.float32) for k in npz.files}
    except FileNotFoundError:
        return None
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        log.warning("residual %s unreadable (%s); starting without one", path, exc)
        return None
    if set(stored) != set(shapes) or any(stored[k].shape != tuple(shapes[k]) for k in shapes):
        log.warning("residual %s does not fit the model; starting without one", path)
        return None
    if not all(np.isfinite(v).all() for v in stored.values()):
        log.warning("residual %s holds NaN or infinity; starting without one", path)
        return None
    return stored


def save(path: Path, residual: Weights | None) -> None:
    if not residual:
        path.unlink(missing_ok=True)
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as fh:
        np.savez(fh, **{k: np.asarray(v, np.float32) for k, v in residual.items()})  # type: ignore[arg-type]
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


class ResidualStore:
    """Where the error-feedback residual lives between rounds and across restarts."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def load(self, like: dict[str, np.ndarray]) -> dict[str, np.ndarray] | None:
        return load(self.path, {k: v.shape for k, v in like.items()})

    def save(self, kept: dict[str, np.ndarray] | None) -> None:
        save(self.path, kept)

"""Homomorphic encryption in a simulated fleet (``fedge sim --he``): throwaway CKKS keys, as
the sim makes a throwaway signing key, and the accuracy the aggregator cannot measure.

Under HE the aggregator holds the model only encrypted, so its held-out evaluation cannot
run. The sim, which made the keys, decrypts each round's published model with the secret key
OUTSIDE the aggregator, for the report only, and scores it on the held-out set as the
aggregator would have: ``decrypted.jsonl`` (one line per round), and ``accuracy`` / ``loss``
in the run's summary. A real fleet has no such reader: there, the devices' federated
evaluation is the score.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
from fedge.protocol import he

DECRYPTED = "decrypted.jsonl"


def write_he_keys(folder: Path) -> tuple[Path, Path]:
    """``he.secret`` (mode 0600, for the devices) and ``he.public`` (for the aggregator) in
    ``folder``: new keys each run. HeError (one line) without TenSEAL."""
    files = he.generate_keys()
    folder.mkdir(parents=True, exist_ok=True)
    secret, public = folder / "he.secret", folder / "he.public"
    secret.unlink(missing_ok=True)
    fd = os.open(secret, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(files.secret)
    public.write_bytes(files.public)
    return secret, public


class DecryptedScores:
    """Decrypts the aggregator's E_t after each round and scores it (``decrypted.jsonl``)."""

    def __init__(self, secret: Path, model: Path, x: np.ndarray, y: np.ndarray, out: Path):
        from .baselines import Scorer  # a runtime: not for `fedge report`, which merges only

        self.keys = he.load_keys(secret, secret=True)
        self.scorer = Scorer(model, x, y)
        self.shapes = {k: tuple(w.shape) for k, w in self.scorer.runtime.get_weights().items()}
        self.path = out / DECRYPTED
        self.path.unlink(missing_ok=True)

    def round(self, summary: dict[str, Any], encrypted: bytes) -> dict[str, Any]:
        """Score the model the round published (``encrypted``: E_t); added to ``summary`` for
        the progress display, and kept in decrypted.jsonl."""
        weights = he.decrypt_model(self.keys, encrypted, self.shapes)
        record = {"round": summary["round"], "model_version": summary["model_version"]}
        record |= self.scorer.score(weights)
        with open(self.path, "a") as fh:
            fh.write(json.dumps(record) + "\n")
        summary.update({k: v for k, v in record.items() if k not in ("round", "model_version")})
        return record


def merge(out: Path, rounds: list[dict[str, Any]]) -> None:
    """Put the decrypted scores into the rounds read from rounds.jsonl (by round id)."""
    path = out / DECRYPTED
    if not path.exists():
        return
    scores = {}
    for line in path.read_text().splitlines():
        record = json.loads(line)
        scores[record.pop("round")] = record
    for r in rounds:
        if r.get("status") == "done" and r["round"] in scores:
            r.update({k: v for k, v in scores[r["round"]].items() if k != "model_version"})

"""Homomorphic encryption (CKKS) against plain updates: device CPU, bytes and server CPU per round.

For each model and each way of sending an update, side by side in one run:

- device CPU per round: making the upload (plain: encode the delta and the envelope; HE:
  encrypt n * delta) and taking the global model in (plain: decode the envelope; HE: decrypt
  the encrypted global model), medians over ``--repeats`` rounds;
- bytes up (one update) and down (the global model) per device; HE bytes are the payload of
  ``fedge.protocol.he`` (the envelope adds its ~200-byte header on the wire);
- server CPU per round at N devices: every update read, checked and folded into the round's
  sum, then the close (plain: the mean and the global model's envelope; HE: the encrypted sum
  and E_t = E_{t-1} + S * (1/W)). Per update is the median; the round is the sum of all.

Plain codecs: ``float32`` and the default ``topk:0.02+int8`` (at least 512 entries), whose
global model goes down as float32. HE is dense: ciphertexts of different devices add slot by
slot, so top-k (each device its own indices) cannot be used inside it.

Deltas are random normal (sd 0.01): the costs do not depend on the values. To keep 1,000
devices affordable on 2 cores, ``--distinct`` updates (default 20) are encrypted and
encoded, and each device of a round sends one of them in turn: the server's cost per update
is the same whatever the values.

    .venv/bin/python bench/he.py                      # 10, 100 and 1,000 devices, both models
    .venv/bin/python bench/he.py --devices 10 100 --models digits_mlp.tflite

``--sim`` measures whole rounds instead: ``fedge sim`` (digits model, IID, FedAvg, every device
in every round, no baselines) plain (the default codec) and with ``--he``, at each
``--devices``, for ``--rounds`` rounds: the median round time (announcement to the new
global model, ``duration_s``), CPU per round of the aggregator's loop (its thread; under HE
without the sim's own decrypt-and-score, which is reporting, not the aggregator's) and of the
whole sim process (devices, broker client threads, aggregator; the embedded broker is
in-process, Mosquitto above 200 devices is not), bytes up per round (every update, MQTT) and
down per device per round, and the final accuracy (under HE: of the model the sim decrypts).

    .venv/bin/python bench/he.py --sim --devices 10 100 --rounds 3
    .venv/bin/python bench/he.py --sim --devices 100 1000 --rounds 2 --broker mosquitto
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
from fedge.models.runtime import load_runtime
from fedge.protocol import GlobalModelHeader, UpdateHeader, decode, decode_delta, encode, he
from fedge.protocol.codecs import encode_delta, parse_codec

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import machine_line

ROOT = Path(__file__).resolve().parent.parent
MODELS = ("digits_mlp.tflite", "digits_mlp_50k.tflite")
PLAIN = ("float32", "topk:0.02+int8")
TOPK_MIN_ENTRIES = 512  # TrainingConfig's default


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    started = time.process_time()
    out = fn()
    return time.process_time() - started, out


class Plain:
    """One plain codec: envelopes as the agent sends them, the aggregator's running sum."""

    def __init__(self, codec: str, weights: dict[str, np.ndarray]) -> None:
        size = sum(w.size for w in weights.values())
        self.spec = parse_codec(codec).with_min_entries(size, TOPK_MIN_ENTRIES)
        self.weights = weights
        self.shapes = {k: list(w.shape) for k, w in weights.items()}
        self.name = codec

    def upload(self, delta: dict[str, np.ndarray], n: int) -> bytes:
        encoded = encode_delta(delta, self.spec)
        header = UpdateHeader(
            device_id="d1",
            round_id=1,
            update_id="u1",
            base_version=0,
            num_samples=n,
            codec=str(self.spec),
        )
        return encode(header, encoded.tensors)

    def global_model(self) -> bytes:
        header = GlobalModelHeader(fleet="bench", model_version=1, round_id=1)
        return encode(header, self.weights)

    def download(self, payload: bytes) -> dict[str, np.ndarray]:
        return dict(decode(payload).tensors)

    def server_round(self, payloads: list[bytes]) -> tuple[list[float], float]:
        total = {k: np.zeros(w.shape, np.float64) for k, w in self.weights.items()}
        weight = 0
        meta = {"codec": str(self.spec), "shapes": self.shapes}
        per_update = []
        for payload in payloads:
            started = time.process_time()
            decoded = decode(payload)
            assert isinstance(decoded.msg, UpdateHeader)
            delta = decode_delta(decoded.tensors, meta)
            n = decoded.msg.num_samples
            for k, value in delta.items():
                total[k] += n * value
            weight += n
            per_update.append(time.process_time() - started)
        started = time.process_time()
        new = {k: (self.weights[k] + total[k] / weight).astype(np.float32) for k in total}
        encode(GlobalModelHeader(fleet="bench", model_version=2, round_id=1), new)
        return per_update, time.process_time() - started


class Encrypted:
    """CKKS: devices hold the secret key file, the aggregator the public one."""

    name = "ckks (HE)"

    def __init__(self, weights: dict[str, np.ndarray]) -> None:
        files = he.generate_keys()
        self.device = he.keys_from_bytes(files.secret, secret=True)
        self.server = he.keys_from_bytes(files.public, secret=False)
        self.shapes = {k: w.shape for k, w in weights.items()}
        self.values = sum(w.size for w in weights.values())
        self.model = he.encrypt_model(self.server, weights)
        self.weights = weights
        self.last = self.model

    def error(self, deltas: list[dict[str, np.ndarray]], counts: list[int], n: int) -> float:
        """Max |decrypted model - float64 FedAvg| after the last round (of ``n`` updates)."""
        got = he.decrypt_model(self.device, self.last, self.shapes)
        used = [j % len(deltas) for j in range(n)]
        weight = sum(counts[j] for j in used)
        worst = 0.0
        for k, w in self.weights.items():
            exact = w.astype(np.float64) + sum(counts[j] * deltas[j][k] for j in used) / weight
            worst = max(worst, float(np.abs(got[k] - exact).max()))
        return worst

    def upload(self, delta: dict[str, np.ndarray], n: int) -> bytes:
        return he.encrypt_update(self.device, delta, n)

    def global_model(self) -> bytes:
        return self.model

    def download(self, payload: bytes) -> dict[str, np.ndarray]:
        return he.decrypt_model(self.device, payload, self.shapes)

    def server_round(self, payloads: list[bytes]) -> tuple[list[float], float]:
        total = he.HeSum(self.server, self.values)
        per_update = []
        for payload in payloads:
            started = time.process_time()
            total.add(payload)
            per_update.append(time.process_time() - started)
        started = time.process_time()
        self.last = he.apply_sum(self.server, self.model, total.to_bytes(), self.values)
        return per_update, time.process_time() - started


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--devices", type=int, nargs="+", default=[10, 100, 1000])
    ap.add_argument("--models", nargs="+", default=list(MODELS))
    ap.add_argument("--repeats", type=int, default=5, help="device rounds timed (median)")
    ap.add_argument("--distinct", type=int, default=20, help="distinct updates per round")
    ap.add_argument("--sim", action="store_true", help="whole fedge sim rounds, plain and --he")
    ap.add_argument("--rounds", type=int, default=3, help="--sim: rounds per run")
    ap.add_argument("--out", default="runs/bench-he", help="--sim: run folders")
    ap.add_argument("--broker", default=None, help="--sim: as fedge sim's (default: embedded)")
    args = ap.parse_args()
    if not he.available():
        print(he.INSTALL_HINT)
        raise SystemExit(1)
    print(machine_line())
    if args.sim:
        sim_rounds(args.devices, args.rounds, Path(args.out), args.broker)
        return
    print("CPU is process time (one core); times are medians; 'round' is one round at N devices")
    for model_name in args.models:
        weights = load_runtime(ROOT / "models" / "artifacts" / model_name, prefer=("numpy",))
        w = {k: np.asarray(v, np.float32) for k, v in weights.get_weights().items()}
        size = sum(v.size for v in w.values())
        print(f"\n{model_name}: {size:,} parameters")
        rng = np.random.default_rng(0)
        deltas = [
            {k: rng.normal(0, 0.01, v.shape).astype(np.float32) for k, v in w.items()}
            for _ in range(args.distinct)
        ]
        counts = [int(n) for n in rng.integers(50, 150, args.distinct)]
        ways: list[Plain | Encrypted] = [Plain(c, w) for c in PLAIN]
        encrypted = Encrypted(w)
        ways.append(encrypted)
        head = f"{'':>16} {'up ms':>8} {'down ms':>8} {'bytes up':>10} {'bytes down':>11}"
        head += "".join(f" {f'N={n} upd ms':>13} {'round s':>8}" for n in args.devices)
        print(head)
        for way in ways:
            print(measure(way, deltas, counts, args.devices, args.repeats), flush=True)
        error = encrypted.error(deltas, counts, args.devices[-1])
        print(f"HE: max |decrypted model - float64 FedAvg| after {args.devices[-1]}: {error:.2e}")


def measure(
    way: Plain | Encrypted,
    deltas: list[dict[str, np.ndarray]],
    counts: list[int],
    devices: list[int],
    repeats: int,
) -> str:
    """One line of the table: device CPU and bytes, then the server's round at each N."""
    payloads = [way.upload(d, n) for d, n in zip(deltas, counts, strict=True)]
    up = [timed(partial(way.upload, deltas[j], counts[j]))[0] for j in range(repeats)]
    down_payload = way.global_model()
    down = [timed(partial(way.download, down_payload))[0] for _ in range(repeats)]
    line = (
        f"{way.name:>16} {1000 * statistics.median(up):>8.2f}"
        f" {1000 * statistics.median(down):>8.2f}"
        f" {len(payloads[0]):>10,} {len(down_payload):>11,}"
    )
    for n in devices:
        per_update, close = way.server_round([payloads[j % len(payloads)] for j in range(n)])
        line += f" {1000 * statistics.median(per_update):>13.3f}"
        line += f" {sum(per_update) + close:>8.2f}"
    return line


def sim_rounds(devices: list[int], rounds: int, out: Path, broker: str | None) -> None:
    """One ``fedge sim`` per (way, N): the table of ``--sim`` (see the module docstring)."""
    he.tenseal()  # before anything could load TensorFlow
    from fedge.aggregator.coordinator import Aggregator
    from fedge.fleet import he_report
    from fedge.fleet.sim import SimOptions, run_sim

    spent = {"aggregator": 0.0, "report": 0.0}

    def timed_in_thread(fn: Callable[..., Any], key: str) -> Callable[..., Any]:
        def wrapper(*a: Any, **kw: Any) -> Any:
            started = time.thread_time()
            try:
                return fn(*a, **kw)
            finally:
                spent[key] += time.thread_time() - started

        return wrapper

    Aggregator.step = timed_in_thread(Aggregator.step, "aggregator")  # type: ignore[method-assign]
    he_report.DecryptedScores.round = timed_in_thread(  # type: ignore[method-assign]
        he_report.DecryptedScores.round, "report"
    )
    print(
        f"fedge sim, digits_mlp, IID, FedAvg, every device each round, {rounds} rounds;"
        " CPU is process/thread time in seconds per round; bytes are MQTT bytes per round"
    )
    print(
        f"{'':>6} {'devices':>7} {'done':>5} {'round s':>8} {'agg CPU':>8} {'sim CPU':>8}"
        f" {'up/round':>12} {'up/device':>10} {'down/device':>12} {'accuracy':>9}"
    )
    for n in devices:
        for way in ("plain", "he"):
            spent.update(aggregator=0.0, report=0.0)
            opts = SimOptions(
                devices=n,
                rounds=rounds,
                strategy="fedavg",
                he=way == "he",
                baselines=False,
                show_progress=False,
                out=out / f"{way}-{n}",
                round_timeout=600.0,
                broker=broker,
            )
            cpu = time.process_time()
            summary = run_sim(opts)
            cpu = time.process_time() - cpu
            lines = (opts.out / "rounds.jsonl").read_text().splitlines()
            done = [r for r in map(json.loads, lines) if r["status"] == "done"]
            k = max(1, len(done))
            up = statistics.median(r["bytes_received"] for r in done) if done else 0
            down = statistics.median(r["bytes_down_per_device"] for r in done) if done else 0
            acc = summary.get("final_accuracy")
            print(
                f"{way:>6} {n:>7} {len(done):>2}/{rounds:<2} "
                f"{statistics.median(r['duration_s'] for r in done) if done else 0:>8.2f}"
                f" {(spent['aggregator'] - spent['report']) / k:>8.2f} {cpu / k:>8.2f}"
                f" {up:>12,.0f} {up / n:>10,.0f} {down:>12,.0f}"
                f" {'-' if acc is None else f'{100 * acc:.2f}%':>9}",
                flush=True,
            )


if __name__ == "__main__":
    main()

"""What secure aggregation costs: bytes per device and CPU per round, against plain uploads.

Whole rounds run in-process (``fedge.protocol.secagg``, no broker): N devices with synthetic
dense deltas of a bundled model's size, the complete graph (Bonawitz et al. 2017) and
SecAgg+'s sparse graph (Bell et al. 2020) of degree k (default: the smallest even number >=
3 log2 N), with a fraction of the devices dropping after sharing their keys (they never send
a masked input, so the aggregator must rebuild their pairwise masks: its expensive path).

Bytes are those of a surviving device's own messages (13-byte headers included), against the
plain upload's tensor bytes (``encode_delta`` with int8: one byte an entry and a float32
scale per tensor; float32: four bytes an entry). Two expansion factors: against plain int8,
and against the masked vector alone (the same ring width k, no keys or shares: the
protocol's own overhead, what Bonawitz et al.'s 1.73x at 2^10 users measures). Device CPU is
the median over devices of one device's work over the round (all its stages); server CPU is
the aggregator's work over the whole round. Plain: the device encodes int8, the aggregator
decodes N updates and sums them.

By default the complete graph is run up to 100 devices (``--max-complete``): at 1,000 every
device does 999 key agreements and masks, and the round takes 12-31 minutes on 2 cores. Above
that its bytes come from the message layouts (``wire.round_bytes``, which the tests hold to
the real messages), marked "(layout)".

    .venv/bin/python bench/secagg.py                       # N = 10, 100, 1000, both models
    .venv/bin/python bench/secagg.py --devices 10,100 --models digits_mlp --drop 0.1
    .venv/bin/python bench/secagg.py --devices 1000 --max-complete 1000   # 43 minutes
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
from fedge.models.runtime import load_runtime
from fedge.protocol.codecs import decode_delta, encode_delta, parse_codec
from fedge.protocol.secagg import (
    SecAggClient,
    SecAggParams,
    SecAggServer,
    default_threshold,
    quantize,
    to_ring,
    wire,
)
from machine import machine_line  # bench/machine.py

ARTIFACTS = Path(__file__).resolve().parent.parent / "models" / "artifacts"
UPLOADS = ("advertise", "shares", "masked", "unmask")
DOWNLOADS = ("keys", "forward", "survivors")


def auto_degree(n: int) -> int:
    return 2 * math.ceil(3 * math.log2(n) / 2)


def shapes_of(model: str) -> dict[str, tuple[int, ...]]:
    weights = load_runtime(ARTIFACTS / f"{model}.tflite", prefer=("numpy",)).get_weights()
    return {name: tuple(w.shape) for name, w in weights.items()}


def plain_round(shapes: dict[str, tuple[int, ...]], n: int, quantizer: str) -> dict[str, float]:
    rng = np.random.default_rng(0)
    spec = parse_codec(quantizer)
    device_s, encoded = [], []
    for _ in range(n):
        delta = {k: rng.normal(0, 0.01, s).astype(np.float32) for k, s in shapes.items()}
        start = time.process_time()
        enc = encode_delta(delta, spec, rng)
        device_s.append(time.process_time() - start)
        encoded.append(enc)
    meta = encoded[0].meta
    start = time.process_time()
    total = {k: np.zeros(s, np.float64) for k, s in shapes.items()}
    for enc in encoded:
        for k, v in decode_delta(enc.tensors, meta).items():
            total[k] += v
    server_s = time.process_time() - start
    upload = sum(int(t.nbytes) for t in encoded[0].tensors.values())
    return {
        "upload": upload,
        "device_ms": 1e3 * statistics.median(device_s),
        "server_ms": 1e3 * server_s,
    }


def secure_round(
    length: int, n: int, degree: int | None, drop: float, bits: int
) -> dict[str, float]:
    devices = tuple(f"dev-{i:04d}" for i in range(n))
    holders = n if degree is None or degree >= n - 1 else degree + 1
    params = SecAggParams(
        fleet="bench",
        round_id=1,
        seed=bytes(range(32)).hex(),
        devices=devices,
        threshold=default_threshold(holders),
        degree=degree,
        bits=bits,
        clip=0.05,
        length=length,
    )
    rng = np.random.default_rng(1)
    dropped = set(rng.choice(devices, int(drop * n), replace=False).tolist())
    clients = {d: SecAggClient(params, d) for d in devices}
    server = SecAggServer(params)
    cpu: dict[str, float] = defaultdict(float)
    sizes: dict[str, dict[str, int]] = defaultdict(dict)
    server_s = 0.0

    def on_device(d: str, fn):  # type: ignore[no-untyped-def]
        start = time.process_time()
        out = fn()
        cpu[d] += time.process_time() - start
        return out

    def on_server(fn):  # type: ignore[no-untyped-def]
        nonlocal server_s
        start = time.process_time()
        out = fn()
        server_s += time.process_time() - start
        return out

    for d, c in clients.items():
        msg = on_device(d, c.advertise)
        sizes[d]["advertise"] = len(msg)
        on_server(lambda d=d, msg=msg: server.add_advertise(d, msg))
    for d, msg in on_server(server.close_advertise).items():
        out = on_device(d, lambda d=d, msg=msg: clients[d].share_keys(msg))
        sizes[d].update(keys=len(msg), shares=len(out))
        on_server(lambda d=d, out=out: server.add_shares(d, out))
    inputs = {d: quantize(rng.normal(0, 0.01, length), 0.05, bits, rng) for d in devices}
    for d, msg in on_server(server.close_shares).items():
        sizes[d]["forward"] = len(msg)
        on_device(d, lambda d=d, msg=msg: clients[d].receive_shares(msg))
        if d in dropped:
            continue
        x = to_ring(inputs[d], params.k)
        out = on_device(d, lambda d=d, x=x: clients[d].masked_input(x))
        sizes[d]["masked"] = len(out)
        on_server(lambda d=d, out=out: server.add_masked(d, out))
    survivors = on_server(server.close_masked)
    for d in sorted(server.u3):
        out = on_device(d, lambda d=d: clients[d].unmask(survivors))
        sizes[d].update(survivors=len(survivors), unmask=len(out))
        on_server(lambda d=d, out=out: server.add_unmask(d, out))
    total = on_server(server.finish)
    exact = np.array_equal(
        (np.sum([inputs[d] for d in server.u3], axis=0) & ((1 << params.k) - 1)).astype(np.uint32),
        total,
    )
    alive = sorted(server.u3)
    return {
        "upload": statistics.median(sum(sizes[d][m] for m in UPLOADS) for d in alive),
        "download": statistics.median(sum(sizes[d][m] for m in DOWNLOADS) for d in alive),
        "masked": statistics.median(sizes[d]["masked"] for d in alive) - wire.HEADER_BYTES,
        "device_ms": 1e3 * statistics.median(cpu[d] for d in alive),
        "server_ms": 1e3 * server_s,
        "k": params.k,
        "exact": float(exact),
    }


def layout_round(length: int, n: int, degree: int | None, bits: int) -> dict[str, float]:
    holders = n if degree is None or degree >= n - 1 else degree + 1
    k = bits + math.ceil(math.log2(n))
    b = wire.round_bytes(holders, n, length, k)
    return {
        "upload": sum(b[m] for m in UPLOADS),
        "download": sum(b[m] for m in DOWNLOADS),
        "masked": b["masked"] - wire.HEADER_BYTES,
        "k": k,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", default="10,100,1000")
    parser.add_argument("--models", default="digits_mlp,digits_mlp_50k")
    parser.add_argument("--drop", type=float, default=0.1, help="fraction dropping before masking")
    parser.add_argument("--bits", type=int, default=8, help="quantisation bits of secagg")
    parser.add_argument(
        "--max-complete", type=int, default=100, help="largest N run with the complete graph"
    )
    args = parser.parse_args()
    print(f"machine: {machine_line()}")
    print(
        f"dropouts: {args.drop:.0%} of the devices after sharing keys;"
        f" quantisation {args.bits} bits"
    )
    head = (
        f"{'model':15s} {'N':>5s} {'scheme':22s} {'k':>3s} {'up B':>9s} {'down B':>9s}"
        f" {'x int8':>7s} {'x ring':>7s} {'device ms':>10s} {'server ms':>10s}"
    )
    print(head)
    for model in args.models.split(","):
        shapes = shapes_of(model)
        length = sum(math.prod(s) for s in shapes.values())
        for n in (int(x) for x in args.devices.split(",")):
            plain = plain_round(shapes, n, "int8")
            f32 = plain_round(shapes, n, "float32")
            label = f"{model} ({length})"
            for name, row in (("plain int8", plain), ("plain float32", f32)):
                print(
                    f"{label:15s} {n:5d} {name:22s} {'':>3s} {row['upload']:9.0f} {'':>9s}"
                    f" {row['upload'] / plain['upload']:7.2f} {'':>7s}"
                    f" {row['device_ms']:10.2f} {row['server_ms']:10.1f}"
                )
            for degree in (None, auto_degree(n)):
                if degree is not None and degree >= n - 1:
                    continue  # the sparse graph would be the complete one
                name = "secagg complete" if degree is None else f"secagg+ k={degree}"
                if degree is None and n > args.max_complete:
                    row = layout_round(length, n, degree, args.bits)
                    name += " (layout)"
                    timing = f"{'-':>10s} {'-':>10s}"
                else:
                    row = secure_round(length, n, degree, args.drop, args.bits)
                    if not row["exact"]:
                        name += " NOT EXACT"
                    timing = f"{row['device_ms']:10.2f} {row['server_ms']:10.1f}"
                print(
                    f"{label:15s} {n:5d} {name:22s} {row['k']:3.0f} {row['upload']:9.0f}"
                    f" {row['download']:9.0f} {row['upload'] / plain['upload']:7.2f}"
                    f" {row['upload'] / row['masked']:7.2f} {timing}"
                )
            sys.stdout.flush()


if __name__ == "__main__":
    main()

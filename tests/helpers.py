"""Small builders shared by tests: configs, data partitions and in-memory fleets."""

from __future__ import annotations

from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
DIGITS_MODEL = REPO / "models" / "artifacts" / "digits_mlp.tflite"


def digits_partitions(tmp: Path, devices: int, seed: int = 0) -> tuple[list[Path], Path]:
    """IID digits partitions as .npz files, and the held-out test set."""
    from fedge.fleet.datasets import digits
    from fedge.fleet.partition import iid

    split = digits(seed)
    parts = iid(split.y_train, devices, np.random.default_rng(seed))
    paths = []
    for i, idx in enumerate(parts):
        p = tmp / f"dev{i}.npz"
        np.savez(p, x=split.x_train[idx], y=split.y_train[idx])
        paths.append(p)
    test = tmp / "test.npz"
    np.savez(test, x=split.x_test, y=split.y_test)
    return paths, test


def broker_agents(parts: list[Path], *, fleet: str, broker: str, state_dir: Path, prefix: str):  # type: ignore[no-untyped-def]
    """One agent per data partition, each with its own link to ``broker`` (``prefix``N ids)."""
    from fedge.agent.config import AgentConfig
    from fedge.agent.service import build_agent

    return [
        build_agent(
            AgentConfig(
                device_id=f"{prefix}{i}",
                fleet=fleet,
                broker=broker,
                model=DIGITS_MODEL,
                data=part,
                state_dir=state_dir,
                seed=i,
            )
        )
        for i, part in enumerate(parts)
    ]


def serve_in_threads(aggregator, agents, stop):  # type: ignore[no-untyped-def]
    """Start the aggregator and the agents, and run each loop on a thread until ``stop``."""
    import threading

    aggregator.start()
    for agent in agents:
        agent.start()
    loops = [*agents, aggregator]
    threads = [threading.Thread(target=x.run, args=(stop,), daemon=True) for x in loops]
    for thread in threads:
        thread.start()
    return threads


def receive(link, count: int, timeout: float = 5.0) -> list:  # type: ignore[no-untyped-def]
    """Up to ``count`` messages from ``link``, waiting at most ``timeout`` seconds in all."""
    import time

    deadline = time.monotonic() + timeout
    out: list = []
    while len(out) < count and (message := link.get(deadline - time.monotonic())) is not None:
        out.append(message)
    return out


def serve_rounds(aggregator, agents, rounds: int, *, steps: int = 20_000) -> None:  # type: ignore[no-untyped-def]
    """Drive an aggregator and agents on the in-memory link, one thread, until ``rounds``
    rounds are done; then let the agents take what was sent."""
    for _ in range(steps):
        while (msg := aggregator.link.get(0)) is not None:
            aggregator.handle(msg)
        if aggregator.completed >= rounds:
            break
        aggregator.tick()
        for agent in agents:
            while agent.step(0):
                pass
    else:
        raise AssertionError("the rounds did not complete")
    for agent in agents:
        while agent.step(0):
            pass

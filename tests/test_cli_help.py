"""The command line explains itself: a version, and every option's default in its help."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

pytestmark = pytest.mark.unit


def fedge(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fedge.cli", *args], capture_output=True, text=True, timeout=60
    )


def test_version() -> None:
    proc = fedge("--version")
    assert proc.returncode == 0 and re.fullmatch(r"fedge \S+\n", proc.stdout)


@pytest.mark.parametrize(
    ("command", "option", "default"),
    [
        (("sim",), "--devices", "10"),
        (("sim",), "--quorum", "0.5"),
        (("sim",), "--codec", "topk:0.02+int8"),
        (("bridge", "simulate"), "--rate", "100.0"),
        (("provision",), "--dir", "fleet-pki"),
        (("fleet", "launch"), "--rounds", "10"),
    ],
)
def test_every_option_says_its_default(command: tuple[str, ...], option: str, default: str) -> None:
    proc = fedge(*command, "--help")
    assert proc.returncode == 0
    text = " ".join(proc.stdout.split())  # argparse wraps help lines
    assert re.search(rf"{re.escape(option)} \S+ .*?\(default: {re.escape(default)}\)", text), text


def test_sim_defaults_are_the_sim_options() -> None:
    """`fedge sim` with no option runs ``SimOptions()``: a default changed in one place only
    (argparse's or the dataclass's, which takes the fleet's from TrainingConfig) fails here."""
    from dataclasses import fields

    from fedge.fleet.sim import SimOptions
    from fedge.protocol import GateSettings, TrainingConfig

    from fedge.cli import _sim_options, parser

    got, want = _sim_options(parser().parse_args(["sim"])), SimOptions()
    assert [f.name for f in fields(got) if getattr(got, f.name) != getattr(want, f.name)] == []
    assert (want.codec, want.gate_threshold) == (TrainingConfig().codec, GateSettings().threshold)

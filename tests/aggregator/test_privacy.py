"""Differential privacy on the aggregator: the noise, the adaptive clip, the accountant
(against dp-accounting called directly) and the [privacy] table's errors."""

from __future__ import annotations

import builtins
from pathlib import Path
from typing import Any

import dp_accounting
import numpy as np
import pytest
from fedge.aggregator import privacy
from fedge.aggregator.accounting import Ledger
from fedge.aggregator.config import AggregatorConfig
from fedge.aggregator.privacy import PrivacyConfig
from fedge.protocol import PrivacySettings, TrainingConfig
from helpers import DIGITS_MODEL
from pydantic import ValidationError

pytestmark = pytest.mark.unit


def test_the_noise_on_the_sum_has_std_z_times_clip() -> None:
    z, clip, n = 1.1, 0.3, 20
    total = {"w": np.zeros((300, 200)), "b": np.zeros(100)}
    mean = privacy.noised_mean(total, std=z * clip, denominator=n, rng=np.random.default_rng(3))
    noise = np.concatenate([v.ravel() for v in mean.values()]) * n  # back to the sum
    # 60,100 draws: the sample std's standard error is 0.3%; 1% is a wide margin
    assert np.std(noise) == pytest.approx(z * clip, rel=0.01)
    assert abs(np.mean(noise)) < 0.01


def test_the_mean_divides_the_noised_sum_by_the_fixed_denominator() -> None:
    total = {"w": np.full(4, 6.0)}
    mean = privacy.noised_mean(total, std=0.0, denominator=3, rng=np.random.default_rng(0))
    np.testing.assert_allclose(mean["w"], 2.0)
    with pytest.raises(ValueError, match="at least 1"):
        privacy.noised_mean(total, std=1.0, denominator=0, rng=np.random.default_rng(0))


def test_the_adaptive_clip_moves_to_the_target_quantile_of_the_norms() -> None:
    """Andrew et al. 2021 on synthetic norms: C ends near the norms' quantile, from above
    and from below, with the bit count noised as the aggregator noises it."""
    rng = np.random.default_rng(11)
    for target in (0.3, 0.5, 0.8):
        for start in (0.01, 100.0):
            clip = start
            for _ in range(300):
                norms = rng.lognormal(0.0, 0.5, size=50)  # a new sample of devices each round
                bits = [bool(x <= clip) for x in norms]
                fraction = privacy.unclipped_fraction(bits, std=2.5, rng=rng)
                clip = privacy.next_clip(clip, fraction, target=target, lr=0.2)
            truth = float(np.exp(0.5 * np.quantile(rng.standard_normal(200_000), target)))
            assert clip == pytest.approx(truth, rel=0.2), (target, start)


def test_the_unclipped_fraction_is_a_share() -> None:
    rng = np.random.default_rng(0)
    assert privacy.unclipped_fraction([], std=1.0, rng=rng) == 0.5  # nothing: C stays
    assert privacy.unclipped_fraction([True] * 4, std=0.0, rng=rng) == 1.0
    assert privacy.unclipped_fraction([True, False], std=0.0, rng=rng) == 0.5
    assert 0.0 <= privacy.unclipped_fraction([False] * 3, std=100.0, rng=rng) <= 1.0
    assert privacy.next_clip(1.0, 0.5, target=0.5, lr=0.2) == 1.0
    assert privacy.next_clip(1.0, 1.0, target=0.5, lr=0.2) < 1.0  # all within: shrink


def test_the_adaptive_clip_raises_the_update_noise_so_the_total_is_z() -> None:
    z_value = privacy.value_noise_multiplier(1.0, 1.0)
    assert z_value == pytest.approx((1.0 - 0.25) ** -0.5)
    # the two Gaussians compose to one of multiplier z (Andrew et al. 2021, Theorem 1)
    assert z_value**-2 + (2 * 1.0) ** -2 == pytest.approx(1.0)
    with pytest.raises(ValueError, match="count_stddev above 1"):
        privacy.value_noise_multiplier(2.0, 1.0)
    cfg = PrivacyConfig(mode="central", noise_multiplier=1.0, target_quantile=0.5)
    assert cfg.count_noise(40) == 2.0  # 5% of the devices a round expects
    assert cfg.value_noise_multiplier(40) == pytest.approx((1 - 1 / 16) ** -0.5)
    fixed = PrivacyConfig(mode="central", noise_multiplier=1.0)
    assert fixed.value_noise_multiplier(40) == 1.0


def direct(q: float, z: float, rounds: int, delta: float) -> float:
    acc = dp_accounting.rdp.RdpAccountant()
    acc.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(z)), rounds)
    return float(acc.get_epsilon(delta))


def test_epsilon_grows_with_rounds_and_matches_dp_accounting() -> None:
    ledger = Ledger("central", 1.0, 1e-5)
    assert ledger.epsilon() == 0.0
    seen = []
    for _ in range(4):
        ledger.add_round(q=0.2)
        seen.append(ledger.epsilon())
    assert seen == sorted(seen) and len(set(seen)) == 4  # strictly more each round
    assert seen[-1] == pytest.approx(direct(0.2, 1.0, 4, 1e-5), rel=1e-9)
    # the budget check's look-ahead is one more round, and that round then costs the same
    ahead = ledger.preview(q=0.2)
    assert ledger.epsilon() == seen[-1]  # a preview spends nothing
    ledger.add_round(q=0.2)
    assert ahead == ledger.epsilon() == pytest.approx(direct(0.2, 1.0, 5, 1e-5), rel=1e-9)
    # rounds at different rates compose as separate events; a rate of 1 is no sampling
    mixed = Ledger("central", 1.0, 1e-5)
    mixed.add_round(q=0.1)
    mixed.add_round(q=1.0)
    acc = dp_accounting.rdp.RdpAccountant()
    acc.compose(dp_accounting.PoissonSampledDpEvent(0.1, dp_accounting.GaussianDpEvent(1.0)))
    acc.compose(dp_accounting.GaussianDpEvent(1.0))
    assert mixed.epsilon() == pytest.approx(acc.get_epsilon(1e-5), rel=1e-9)
    with pytest.raises(ValueError, match="sampling rate"):
        mixed.add_round(q=0.0)


def test_pld_accountant_agrees_with_dp_accounting() -> None:
    ledger = Ledger("central", 2.0, 1e-5, "pld")
    for _ in range(3):
        ledger.add_round(q=1.0)  # every device selected: the quick case of the PLD accountant
    acc = dp_accounting.pld.PLDAccountant()
    acc.compose(dp_accounting.GaussianDpEvent(2.0), 3)
    assert ledger.epsilon() == pytest.approx(acc.get_epsilon(1e-5), rel=1e-6)


def test_local_dp_counts_the_most_selected_device_without_sampling() -> None:
    ledger = Ledger("local", 4.0, 1e-5)
    for devices in (["a", "b"], ["a", "c"], ["b", "c"], ["a"]):
        ledger.add_round(devices=devices)
    assert ledger.rounds == 3  # device a
    acc = dp_accounting.rdp.RdpAccountant()
    acc.compose(dp_accounting.GaussianDpEvent(4.0 / 2), 3)  # sensitivity 2C: z / 2
    assert ledger.epsilon() == pytest.approx(acc.get_epsilon(1e-5))
    assert ledger.preview(devices=["b"]) == ledger.epsilon()  # b was selected twice
    assert ledger.preview(devices=["a"]) > ledger.epsilon()


def test_rounds_added_at_once_count_as_one_by_one_and_unknown_ones_for_all() -> None:
    one_by_one, at_once = Ledger("central", 1.0, 1e-5), Ledger("central", 1.0, 1e-5)
    for q in (0.2, 0.2, 1.0):
        one_by_one.add_round(q=q)
    at_once.add_rounds([(0.2, 1.0), (1.0, 1.0), (0.2, 1.0)], [])
    assert at_once.central == one_by_one.central
    assert at_once.epsilon() == pytest.approx(one_by_one.epsilon(), rel=1e-9)
    local = Ledger("local", 4.0, 1e-5)
    local.add_rounds([], [["a", "b"], None, ["a"]])  # the second round's devices: not known
    assert local.rounds == 3 and local.preview(devices=["b"]) == local.epsilon()
    again = Ledger.load(local.to_json(), "local", 4.0, 1e-5, "rdp")
    assert again.rounds == 3 and again.anyone == 1


def test_the_ledger_survives_a_restart_and_refuses_the_other_mode() -> None:
    ledger = Ledger("central", 1.5, 1e-5)
    ledger.add_round(q=0.25)
    ledger.add_round(q=0.25)
    again = Ledger.load(ledger.to_json(), "central", 1.5, 1e-5, "rdp")
    assert again.central == ledger.central and again.rounds == 2
    assert again.epsilon() == pytest.approx(ledger.epsilon(), rel=1e-12)
    with pytest.raises(ValueError, match="central-DP privacy ledger"):
        Ledger.load(ledger.to_json(), "local", 1.5, 1e-5, "rdp")


def config(tmp_path: Path, **kw: Any) -> AggregatorConfig:
    return AggregatorConfig(model=DIGITS_MODEL, state_dir=tmp_path, **kw)


@pytest.mark.parametrize(
    ("table", "extra", "message"),
    [
        ({"mode": "central", "noise_multiplier": 0}, {}, "greater than 0"),
        ({"mode": "both", "noise_multiplier": 1}, {}, "'central' or 'local'"),
        ({"mode": "central", "noise_multiplier": 1, "clip": -1}, {}, "greater than 0"),
        ({"mode": "central", "noise_multiplier": 1, "target_delta": 1}, {}, "less than 1"),
        (
            {"mode": "local", "noise_multiplier": 1, "target_quantile": 0.5},
            {},
            'needs mode = "central"',
        ),
        (
            {"mode": "central", "noise_multiplier": 1},
            {"strategy": {"robust": "median"}},
            'robust = "mean"',
        ),
        (
            {"mode": "central", "noise_multiplier": 1},
            {"shards": {"workers": ["w1"]}},
            "cannot be combined with [shards]",
        ),
        (
            # 10 devices a round: the bit count's noise (0.5) is too small for z = 1.5
            {"mode": "central", "noise_multiplier": 1.5, "target_quantile": 0.5},
            {"min_devices": 10},
            "needs count_stddev above 0.75",
        ),
        (
            {"mode": "central", "noise_multiplier": 1},
            {"training": {"privacy": {"clip": 1.0}}},
            "configure differential privacy there",
        ),
    ],
)
def test_bad_privacy_settings_are_one_clear_error(
    tmp_path: Path, table: dict, extra: dict, message: str
) -> None:
    with pytest.raises(ValidationError, match=message.replace("[", r"\[").replace("]", r"\]")):
        config(tmp_path, privacy=table, **extra)


def test_without_dp_accounting_the_config_names_the_extra(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_import = builtins.__import__

    def no_dp_accounting(name: str, *args: Any, **kwargs: Any) -> Any:
        if name == "dp_accounting":
            raise ImportError("No module named 'dp_accounting'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_dp_accounting)
    with pytest.raises(ValidationError, match=r"pip install 'fedge\[privacy\]'"):
        config(tmp_path, privacy={"mode": "central", "noise_multiplier": 1.0})
    config(tmp_path)  # without [privacy] the package is not needed


def test_privacy_stays_off_the_wire_when_off() -> None:
    off = TrainingConfig()
    assert "privacy" not in off.model_dump_json()
    on = TrainingConfig(privacy=PrivacySettings(clip=0.5, noise_multiplier=1.0))
    assert '"privacy":{"clip":0.5,"noise_multiplier":1.0}' in on.model_dump_json()
    assert TrainingConfig.model_validate_json(on.model_dump_json()) == on

"""Radio energy: units, monotonicity, and what skipping an upload saves on LTE vs WiFi."""

from __future__ import annotations

import dataclasses

import pytest
from fedge.agent.radio import LTE, PROFILES, WIFI, EnergyEstimate, RadioProfile, estimate
from hypothesis import given
from hypothesis import strategies as st

pytestmark = pytest.mark.unit

KB = 1000  # the figures below are in SI kilobytes


def toy(**kw: float) -> RadioProfile:
    base: dict[str, float] = dict(
        promotion_w=0.0,
        promotion_s=0.0,
        tail_w=0.0,
        tail_s=0.0,
        alpha_up_w_per_mbps=0.0,
        alpha_down_w_per_mbps=0.0,
        beta_w=0.0,
        up_mbps=1.0,
        down_mbps=1.0,
    )
    base.update(kw)
    return RadioProfile(name="toy", **base)


def test_units_alpha_is_joules_per_megabit() -> None:
    # 1 W per Mbps for 1 MB (8 Mbit) is 8 J, whatever the throughput.
    p = toy(alpha_up_w_per_mbps=1.0, up_mbps=37.0)
    assert estimate(p, 1_000_000, 0, connections=0).joules == pytest.approx(8.0)


def test_units_beta_is_paid_for_the_time_on_air() -> None:
    # 1 W for the 8 s that 1 MB takes at 1 Mbps is 8 J; at 4 Mbps, 2 J.
    assert estimate(toy(beta_w=1.0, down_mbps=1.0), 0, 1_000_000, 0).joules == pytest.approx(8.0)
    assert estimate(toy(beta_w=1.0, down_mbps=4.0), 0, 1_000_000, 0).joules == pytest.approx(2.0)


def test_units_connection_is_promotion_plus_tail() -> None:
    p = toy(promotion_w=2.0, promotion_s=0.5, tail_w=1.0, tail_s=10.0)
    assert p.joules_per_connection == pytest.approx(11.0)
    assert estimate(p, 0, 0, connections=3).joules == pytest.approx(33.0)


def test_lte_profile_matches_the_cited_milliwatts_and_milliseconds() -> None:
    assert LTE.joules_per_connection == pytest.approx(1.2107 * 0.2601 + 1.060 * 11.576)
    assert LTE.joules_per_byte_up == pytest.approx((0.43839 + 1.28804 / 6) * 8e-6)
    assert LTE.joules_per_byte_down == pytest.approx((0.05197 + 1.28804 / 13) * 8e-6)


def test_breakdown_adds_up() -> None:
    e = estimate(LTE, 200 * KB, 50 * KB, connections=2)
    assert isinstance(e, EnergyEstimate)
    assert e.joules == pytest.approx(e.connection_joules + e.upload_joules + e.download_joules)
    assert e.connection_joules == pytest.approx(2 * LTE.joules_per_connection)


@given(
    profile=st.sampled_from(sorted(PROFILES.values(), key=lambda p: p.name)),
    up=st.integers(0, 10**8),
    down=st.integers(0, 10**8),
    conns=st.integers(0, 100),
    extra=st.integers(1, 10**6),
)
def test_more_bytes_or_connections_never_cost_less(
    profile: RadioProfile, up: int, down: int, conns: int, extra: int
) -> None:
    e = estimate(profile, up, down, conns).joules
    assert estimate(profile, up + extra, down, conns).joules > e
    assert estimate(profile, up, down + extra, conns).joules > e
    assert estimate(profile, up, down, conns + 1).joules > e


def test_on_lte_skipping_saves_far_more_than_shrinking() -> None:
    full = estimate(LTE, 200 * KB, 0).joules  # about 13.6 J
    small = estimate(LTE, 5 * KB, 0).joules  # about 12.6 J
    skipped = estimate(LTE, 0, 0, connections=0).joules  # 0 J
    assert full - skipped > 10 * (full - small)
    assert small > 0.9 * full  # shrinking 40x leaves over 90% of the energy: it is the tail


def test_on_wifi_shrinking_gets_most_of_the_saving() -> None:
    full = estimate(WIFI, 200 * KB, 0).joules  # about 0.51 J
    small = estimate(WIFI, 5 * KB, 0).joules  # about 0.05 J
    skipped = estimate(WIFI, 0, 0, connections=0).joules
    assert full - small > 0.8 * (full - skipped)


def test_lte_costs_more_than_wifi_for_the_same_upload() -> None:
    assert estimate(LTE, 200 * KB, 0).joules > 10 * estimate(WIFI, 200 * KB, 0).joules


def test_profiles_are_frozen_and_named() -> None:
    assert PROFILES == {"lte": LTE, "wifi": WIFI}
    with pytest.raises(dataclasses.FrozenInstanceError):
        LTE.tail_s = 1.0  # type: ignore[misc]


def test_nonsense_is_rejected() -> None:
    with pytest.raises(ValueError):
        estimate(LTE, -1, 0)
    with pytest.raises(ValueError):
        estimate(LTE, 0, 0, connections=-1)
    with pytest.raises(ValueError):
        toy(up_mbps=0.0)
    with pytest.raises(ValueError):
        toy(tail_s=-1.0)

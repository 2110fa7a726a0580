"""Energy a round's traffic costs the radio: a per-connection price plus a per-byte price.

::

    energy = connections * (promotion + tail)        # waking the radio and letting it idle down
           + bytes_up   * J/byte up                  # from the power-vs-throughput model
           + bytes_down * J/byte down

The model follows Huang et al., "A Close Examination of Performance and Power
Characteristics of 4G LTE Networks" (MobiSys 2012), who measured one phone on LTE, 3G and
WiFi and fitted, for the time the radio is moving data,

    P = alpha_u * t_u + alpha_d * t_d + beta        (mW; t_u, t_d throughput in Mbps)

plus a promotion (idle -> connected) and a tail (connected, no data, until an inactivity
timer sends the radio back to idle). Moving ``B`` bytes in one direction at ``t`` Mbps takes
``8 B / (t * 1e6)`` seconds at ``alpha * t + beta``, so it costs::

    J/byte = 8e-6 * (alpha + beta / t)              # alpha, beta in W/Mbps and W; t in Mbps

which depends on the assumed throughput through the ``beta / t`` term: a slow link keeps the
radio awake longer for the same bytes. Each profile states the throughput it assumes.

Verification (see each profile). The paper's abstract, read here, confirms the median LTE
throughputs used below (13 Mbps down, 6 Mbps up) and that the long high-power LTE tail is
the main reason LTE was up to 23x less power-efficient than WiFi in their user traces. The
table values (alpha, beta, promotion and tail power and duration) could not be read from
any copy available to this code's author; they are the commonly quoted figures of the
paper's power-model table and are marked "not verified here". Treat the results as a
model with one significant figure of honesty, good for comparing choices (skip vs shrink,
WiFi vs LTE), not for predicting a battery's hours.

Balasubramanian, Balasubramanian & Venkataramani, "Energy Consumption in Mobile Phones: A
Measurement Study and Implications for Network Applications" (IMC 2009), measured the same
shape on 3G, GSM and WiFi (energy = ramp + per-KB transfer + tail); it is cited below as a
cross-check only, with the same caveat.

The model ignores what the paper also ignores at this level: signal strength (uplink power
grows steeply at the cell edge), carrier-specific timers (the LTE tail is set by the
network), fast dormancy, and the idle-state paging power that the device pays whether it
sends or not. It prices transfers, not standby.
"""

from __future__ import annotations

from dataclasses import dataclass

_BITS_PER_BYTE = 8
_BITS_PER_MBIT = 1_000_000
_MW = 1e-3  # milliwatts to watts
_MS = 1e-3  # milliseconds to seconds


@dataclass(frozen=True)
class RadioProfile:
    """A radio's power model. Powers in watts, durations in seconds, throughputs in Mbps.

    ``alpha_*`` are in W per Mbps (numerically the same as J per Mbit); ``beta_w`` is the
    power the radio draws while moving data on top of the alpha terms.
    """

    name: str
    promotion_w: float  # power while promoting idle -> connected
    promotion_s: float  # how long the promotion takes
    tail_w: float  # power in the tail after the last packet
    tail_s: float  # how long the tail lasts (the network's inactivity timer)
    alpha_up_w_per_mbps: float
    alpha_down_w_per_mbps: float
    beta_w: float
    up_mbps: float  # assumed uplink throughput while sending
    down_mbps: float  # assumed downlink throughput while receiving

    def __post_init__(self) -> None:
        for field_name in (
            "promotion_w",
            "promotion_s",
            "tail_w",
            "tail_s",
            "alpha_up_w_per_mbps",
            "alpha_down_w_per_mbps",
            "beta_w",
        ):
            if getattr(self, field_name) < 0:
                raise ValueError(f"{self.name}: {field_name} must be >= 0")
        if self.up_mbps <= 0 or self.down_mbps <= 0:
            raise ValueError(f"{self.name}: throughputs must be > 0")

    @property
    def joules_per_connection(self) -> float:
        """Promotion plus tail: what one wake-up of the radio costs with no data at all."""
        return self.promotion_w * self.promotion_s + self.tail_w * self.tail_s

    @property
    def joules_per_byte_up(self) -> float:
        return _joules_per_byte(self.alpha_up_w_per_mbps, self.beta_w, self.up_mbps)

    @property
    def joules_per_byte_down(self) -> float:
        return _joules_per_byte(self.alpha_down_w_per_mbps, self.beta_w, self.down_mbps)


def _joules_per_byte(alpha_w_per_mbps: float, beta_w: float, mbps: float) -> float:
    joules_per_mbit = alpha_w_per_mbps + beta_w / mbps  # (alpha*t + beta) W for 1/t s per Mbit
    return joules_per_mbit * _BITS_PER_BYTE / _BITS_PER_MBIT


LTE = RadioProfile(
    name="lte",
    promotion_w=1210.7 * _MW,
    promotion_s=260.1 * _MS,
    tail_w=1060.0 * _MW,
    tail_s=11576.0 * _MS,
    alpha_up_w_per_mbps=438.39 * _MW,
    alpha_down_w_per_mbps=51.97 * _MW,
    beta_w=1288.04 * _MW,
    up_mbps=6.0,
    down_mbps=13.0,
)
"""LTE, from Huang et al. (MobiSys 2012), measured on one LTE phone (2011-12).

- Promotion 1210.7 mW for 260.1 ms; tail (RRC_CONNECTED until the 11.576 s inactivity
  timer fires) at 1060.0 mW: about 12.6 J per connection, 97% of it tail. Table values,
  not verified here; often quoted as "a tail of about 11.6 s at about 1 W".
- alpha_u 438.39 mW/Mbps, alpha_d 51.97 mW/Mbps, beta 1288.04 mW. Table values, not
  verified here.
- Throughput: 6 Mbps up, 13 Mbps down, the medians of the paper's 4GTest users (verified
  in its abstract). At these, 5.2 uJ per byte up, 1.2 uJ per byte down.
"""

WIFI = RadioProfile(
    name="wifi",
    promotion_w=124.4 * _MW,
    promotion_s=79.1 * _MS,
    tail_w=119.3 * _MW,
    tail_s=238.1 * _MS,
    alpha_up_w_per_mbps=283.17 * _MW,
    alpha_down_w_per_mbps=137.01 * _MW,
    beta_w=132.86 * _MW,
    up_mbps=10.0,
    down_mbps=10.0,
)
"""WiFi, already associated, from the same paper and phone as :data:`LTE`.

- Promotion 124.4 mW for 79.1 ms (leaving power-save mode), tail 119.3 mW for 238.1 ms:
  about 0.04 J per connection. Table values, not verified here.
- alpha_u 283.17 mW/Mbps, alpha_d 137.01 mW/Mbps, beta 132.86 mW. Table values, not
  verified here.
- Throughput: 10 Mbps each way is this module's assumption, not the paper's; beta/t is
  small on WiFi, so the per-byte price barely depends on it (2.4 uJ/byte up at 10 Mbps,
  2.3 at 50).
- Not included: scanning and associating. A device that turns WiFi off between rounds pays
  that on every wake; Balasubramanian et al. (IMC 2009) put it at about 5.9 J and WiFi
  transfer at about 0.007 J/KB on their 2009 phones (recalled, not verified here). For such
  a device, build a profile with the extra promotion energy.
"""

PROFILES: dict[str, RadioProfile] = {p.name: p for p in (WIFI, LTE)}
"""Profiles by name, for a config field such as ``radio = "lte"``.

No NB-IoT profile: its energy is dominated by PSM/eDRX timers and coverage class, which
vary by network far more than a single set of numbers could honestly represent, and no
measurement could be checked here.
"""


@dataclass(frozen=True)
class EnergyEstimate:
    """Joules for one round's traffic, and where they go."""

    joules: float
    connection_joules: float
    upload_joules: float
    download_joules: float


def estimate(
    profile: RadioProfile, bytes_up: int, bytes_down: int, connections: int = 1
) -> EnergyEstimate:
    """Energy to send ``bytes_up``, receive ``bytes_down``, waking the radio ``connections`` times.

    Pass ``connections=0`` for traffic that rides on a wake-up already paid for (for example
    a reply sent while the radio is still in the tail of the message that prompted it).
    """
    if bytes_up < 0 or bytes_down < 0 or connections < 0:
        raise ValueError("bytes and connections must be >= 0")
    conn = connections * profile.joules_per_connection
    up = bytes_up * profile.joules_per_byte_up
    down = bytes_down * profile.joules_per_byte_down
    return EnergyEstimate(
        joules=conn + up + down,
        connection_joules=conn,
        upload_joules=up,
        download_joules=down,
    )

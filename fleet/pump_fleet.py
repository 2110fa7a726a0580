"""A fleet of centrifugal pumps that wear out, from NASA's ``progpy`` (the ``maintenance`` extra).

Every machine is progpy's :class:`CentrifugalPumpWithWear` (Daigle and Goebel 2013: impeller
wear, thrust and radial bearing friction, oil heating; four failure events), with its own
wear rates (the model's ``wA``, ``wThrust`` and ``wRadial`` states, jittered for every new
pump), its own load cycle (supply voltage and synchronous speed, high and low phases of its
own length), ambient temperature and sensor noise. A machine runs until one of the model's
thresholds is met (the failure), is replaced by a new pump, and runs again.

How fast, and what was chosen (measured on this 2-core machine, CPU time): progpy's
``simulate_to_threshold`` takes about 190 us per step at ``dt=1`` for one pump; a life is
20,000 steps, so 20 machines x 6 lives would cost about 8 CPU-minutes. ``dt=2`` gives the
same trajectory (failure time within a second) and ``dt=5`` is unstable (the shaft speed
goes negative). The model is vectorised (``is_vectorized``), so :func:`simulate_fleet` steps
every machine at once through the model's own ``next_state`` at ``dt=2``: about 0.1 ms per
step for 24 machines. The whole fleet's run is precomputed once per run (a few seconds), then
played to the agents over their serial ports. One detail: progpy 1.9's vectorised
``next_state`` broadcasts the leak flow wrongly when the suction and discharge pressures
are arrays, so every machine shares the plant's two pressures (given as scalars) and varies
in voltage, speed and ambient temperature.

Readings are one per ``reading_s`` (60 s) of pump time: shaft speed (rad/s), discharge flow
(m^3/s), thrust bearing, radial bearing and oil temperatures (K), each with the machine's own
Gaussian noise; ``hours``, the pump's hour meter (it restarts at 0 with a new pump: the age a
fixed schedule also goes by); and ``tripped``: 1.0 on the reading at which the machine
failed (its protection tripped), else 0.0. The device learns
its labels from that flag (:func:`fedge.agent.tasks.failure`).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
from fedge.firmware_bridge.sample import Sample

CHANNELS = ("w", "Qout", "Tt", "Tr", "To", "hours", "tripped")
SENSORS = 6  # every channel but the last (the trip flag) is a model input
MEASURED = 5  # the physical sensors (noisy); ``hours`` is the pump's hour meter
# Fleet-wide scaling (value - center) / scale, from the range the pumps cover.
CENTER = (370.0, 0.1, 350.0, 340.0, 325.0, 4.0, 0.0)
SCALE = (30.0, 0.03, 15.0, 15.0, 10.0, 3.0, 1.0)
PSUC, PDISCH = 239179.0, 928654.0  # Pa, the plant's suction and discharge pressure
DT = 2.0  # s: the largest step at which progpy's Euler update stays stable for this pump


class FleetError(RuntimeError):
    """progpy is missing."""


def _pump_model():  # type: ignore[no-untyped-def]
    try:
        from progpy.models import CentrifugalPumpWithWear
    except ImportError as exc:
        raise FleetError(
            "the maintenance fleet needs NASA's progpy: pip install 'fedge[maintenance]'"
        ) from exc
    with warnings.catch_warnings():  # it warns that wear rates are states (we want that)
        warnings.simplefilter("ignore")
        return CentrifugalPumpWithWear(process_noise=0, measurement_noise=0)


@dataclass(frozen=True)
class MachineProfile:
    """One machine: how fast its pumps wear, how it is loaded, how noisy its sensors are."""

    w_a: float  # impeller wear rate
    w_thrust: float  # thrust bearing wear rate
    w_radial: float  # radial bearing wear rate
    cycle_s: float  # load cycle length
    high_fraction: float  # share of the cycle at high load
    v_low: float  # supply voltage, low and high load
    v_high: float
    t_amb: float  # ambient temperature (K)
    noise: tuple[float, ...]  # sensor noise, one standard deviation per sensor channel


def draw_profiles(n: int, rng: np.random.Generator) -> list[MachineProfile]:
    """``n`` machines around progpy's example pump (wA 0.01, wThrust = wRadial = 1e-10)."""
    out = []
    for _ in range(n):
        out.append(
            MachineProfile(
                w_a=float(rng.uniform(0.004, 0.012)),
                w_thrust=float(np.exp(rng.uniform(np.log(3e-11), np.log(1.5e-10)))),
                w_radial=float(np.exp(rng.uniform(np.log(3e-11), np.log(1.5e-10)))),
                cycle_s=float(rng.uniform(1800.0, 5400.0)),
                high_fraction=float(rng.uniform(0.3, 0.6)),
                v_low=float(rng.uniform(450.0, 480.0)),
                v_high=float(rng.uniform(550.0, 580.0)),
                t_amb=float(rng.uniform(285.0, 298.0)),
                noise=(
                    float(rng.uniform(0.5, 2.0)),
                    float(rng.uniform(0.001, 0.004)),
                    *(float(v) for v in rng.uniform(0.2, 1.0, 3)),
                ),
            )
        )
    return out


@dataclass
class MachineRun:
    """What one machine did: readings (rows x channels) and the lives' ends."""

    profile: MachineProfile
    readings: np.ndarray  # (n, 6) float32, channels as CHANNELS
    failures: list[int] = field(default_factory=list)  # reading index of each trip
    modes: list[str] = field(default_factory=list)  # which threshold, per trip
    ages: np.ndarray = field(default_factory=lambda: np.zeros(0))  # pump age (s) per reading


def simulate_fleet(
    profiles: list[MachineProfile],
    seconds: float,
    *,
    rng: np.random.Generator,
    reading_s: float = 60.0,
    start_ages: np.ndarray | None = None,
    life_jitter: float = 0.1,
) -> list[MachineRun]:
    """Run every machine for ``seconds`` of pump time at once; failed pumps are replaced.

    A machine starts with a pump of age ``start_ages[i]`` seconds (run from new, unrecorded,
    before the record starts); each new pump gets the machine's wear rates times a factor in
    ``1 +- life_jitter``.
    """
    pump = _pump_model()
    n = len(profiles)
    every = round(reading_s / DT)
    arr = np.array
    w_rates = arr([[p.w_a, p.w_radial, p.w_thrust] for p in profiles]).T  # (3, n)
    cycle, high = arr([p.cycle_s for p in profiles]), arr([p.high_fraction for p in profiles])
    v_low, v_high = arr([p.v_low for p in profiles]), arr([p.v_high for p in profiles])
    t_amb = arr([p.t_amb for p in profiles])
    noise = arr([p.noise for p in profiles])  # (n, 5)
    phase = rng.uniform(0.0, 1.0, n) * cycle  # machines do not share a clock

    def inputs(t: np.ndarray) -> dict[str, object]:
        in_cycle = np.mod(t + phase, cycle) / cycle
        volts = np.where(in_cycle < high, v_high, v_low)
        return {"Tamb": t_amb, "V": volts, "pdisch": PDISCH, "psuc": PSUC, "wsync": volts * 0.8}

    x0 = _new_state(pump)
    state = np.repeat(x0, n, axis=1)
    rows = np.array([9, 10, 11])  # wA, wRadial, wThrust in the state vector

    def jitter(k: int) -> np.ndarray:
        return rng.uniform(1 - life_jitter, 1 + life_jitter, (3, k))

    state[rows] = w_rates * jitter(n)
    age = np.zeros(n)
    events = pump.events
    # A machine that starts at age a is the same machine run for a more seconds, its record
    # starting then: simulate the longest, keep each machine's own stretch.
    skip = np.zeros(n, int) if start_ages is None else (np.asarray(start_ages) // reading_s)
    skip = skip.astype(int)
    length = int(seconds // reading_s)
    t = np.zeros(n)
    total = length + int(skip.max())
    steps = total * every
    out = np.zeros((total, n, len(CHANNELS)), np.float32)
    ages = np.zeros((total, n))
    runs_fail: list[list[int]] = [[] for _ in range(n)]
    runs_mode: list[list[str]] = [[] for _ in range(n)]
    x = pump.StateContainer(state)
    for k in range(1, steps + 1):
        x = pump.next_state(x, inputs(t), DT)
        t = t + DT
        age = age + DT
        if k % every:
            continue
        i = k // every - 1
        if i >= len(out):
            break
        z = pump.output(x)
        met = pump.threshold_met(x)
        out[i, :, :MEASURED] = np.stack(
            [np.asarray(z[c], float).reshape(n) for c in CHANNELS[:MEASURED]], 1
        )
        out[i, :, MEASURED] = age / 3600.0
        ages[i] = age
        failed = np.zeros(n, bool)
        for name in events:
            hit = np.asarray(met[name], bool).reshape(n)
            for j in np.flatnonzero(hit & ~failed):
                runs_mode[j].append(name)
            failed |= hit
        out[i, failed, SENSORS] = 1.0
        for j in np.flatnonzero(failed):
            runs_fail[j].append(i)
        if failed.any():  # replace: a new pump, the machine's wear rates jittered again
            state = np.array(x.matrix, float)
            state[:, failed] = x0
            state[np.ix_(rows, np.flatnonzero(failed))] = (w_rates * jitter(n))[:, failed]
            age[failed] = 0.0
            x = pump.StateContainer(state)
    out[:, :, :MEASURED] += (rng.standard_normal((len(out), n, MEASURED)) * noise).astype(
        np.float32
    )
    result = []
    for m in range(n):
        lo = int(skip[m])
        hi = lo + length
        pairs = zip(runs_fail[m], runs_mode[m], strict=True)
        kept = [(i - lo, mode) for i, mode in pairs if lo <= i < hi]
        result.append(
            MachineRun(
                profiles[m],
                out[lo:hi, m].copy(),
                [i for i, _ in kept],
                [mode for _, mode in kept],
                ages[lo:hi, m].copy(),
            )
        )
    return result


def _new_state(pump) -> np.ndarray:  # type: ignore[no-untyped-def]
    """A new pump's state (one column), as progpy initialises it for the plant's pressures."""
    volts = 471.2
    u = pump.InputContainer(
        {"Tamb": 290.0, "V": volts, "pdisch": PDISCH, "psuc": PSUC, "wsync": volts * 0.8}
    )
    return np.asarray(pump.initialize(u).matrix, float).reshape(-1, 1)


def frames(readings: np.ndarray, reading_s: float, sensor_id: int = 1) -> Iterator[Sample]:
    """A machine's readings as its MCU sends them: one sample (a binary frame) per reading,
    with the firmware's wrapping sequence number and millisecond clock."""
    for n, row in enumerate(readings):
        ts = int(n * reading_s * 1000) & 0xFFFFFFFF
        yield Sample(sensor_id, n & 0xFFFF, ts, tuple(float(v) for v in row))

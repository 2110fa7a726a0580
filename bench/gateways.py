"""Site gateways: two sites bridged to a central Mosquitto equal the single aggregator, and
what each site's uplink carries.

Three local Mosquittos: a central one and two site brokers, each bridged to it by
broker_config/site-gateway.conf (TLS lines left out: loopback). At each site a gateway (a
shard worker on the site broker) and N ``fedge agent`` daemons (digits, FedAdam, float32
uploads); the coordinator on the central broker (``fedge.fleet.gatewayrun``). The same
updates then go through one aggregator without shards (``fedge.fleet.shardrun.replay_single``).
Printed, per number of devices a site: the largest absolute difference between the two global
models, and per site and round (medians over sites and seeds) the MQTT bytes that crossed
the uplink (partial sum, reports, statuses) against what a relay bridge (gateway-bridge.conf)
would have carried: the site's updates and the same statuses.

    .venv/bin/python bench/gateways.py                # 2, 4 and 8 devices a site, seeds 0-2
"""

from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
from pathlib import Path

import numpy as np
from fedge.fleet.gatewayrun import gateway_run, site_bridge, wait_bridged
from fedge.fleet.mosquitto import LocalMosquitto
from fedge.fleet.shardrun import replay_single

SITES = ("site-a", "site-b")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--devices", type=int, nargs="+", default=[2, 4, 8], help="a site")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seeds", type=int, default=3)
    args = ap.parse_args()
    logging.basicConfig(level=logging.ERROR)
    print(f"2 sites, {args.rounds} rounds, seeds 0-{args.seeds - 1}, fedadam, float32 updates")
    print(
        "devices/site  max |gw - single|  uplink B/round  (partial  reports  statuses)"
        "  relay B/round  (updates)  uplink/relay"
    )
    for per_site in args.devices:
        diffs: list[float] = []
        up: dict[str, list[float]] = {k: [] for k in ("all", "partial", "accepted", "status")}
        updates: list[float] = []
        relay: list[float] = []
        for seed in range(args.seeds):
            with tempfile.TemporaryDirectory() as tmp, LocalMosquitto(Path(tmp) / "c") as central:
                sites = [
                    LocalMosquitto(
                        Path(tmp) / s,
                        extra_config=site_bridge(s, f"{central.host}:{central.port}"),
                    ).start()
                    for s in SITES
                ]
                try:
                    for s, broker in zip(SITES, sites, strict=True):
                        wait_bridged(broker.url, s)
                    (Path(tmp) / "run").mkdir()
                    result = gateway_run(
                        central.url,
                        {s: b.url for s, b in zip(SITES, sites, strict=True)},
                        Path(tmp) / "run",
                        fleet=f"bench-gw-{per_site}-{seed}",
                        devices_per_site=per_site,
                        rounds=args.rounds,
                        seed=seed,
                    )
                finally:
                    for broker in sites:
                        broker.stop()
            single, replayed = replay_single(result.run)
            if [r["weights"] for r in replayed] != [r["weights"] for r in result.run.rounds]:
                raise SystemExit(f"seed {seed}: the replay's rounds differ from the run's")
            diffs.append(
                max(float(np.max(np.abs(result.run.weights[k] - w))) for k, w in single.items())
            )
            for s in SITES:
                link = result.uplink[s]
                if link.messages["update"]:
                    raise SystemExit(f"seed {seed}: updates crossed the uplink of {s}")
                up["all"].append(sum(link.bytes.values()) / args.rounds)
                for kind in ("partial", "accepted", "status"):
                    up[kind].append(link.bytes[kind] / args.rounds)
                updates.append(result.update_bytes[s] / args.rounds)
                relay.append((result.update_bytes[s] + link.bytes["status"]) / args.rounds)
        m = {k: statistics.median(v) for k, v in up.items()}
        relayed = statistics.median(relay)
        print(
            f"{per_site:>12}  {max(diffs):>17.3g}  {m['all']:>14,.0f}  ({m['partial']:>7,.0f}"
            f"  {m['accepted']:>7,.0f}  {m['status']:>8,.0f})  {relayed:>13,.0f}"
            f"  ({statistics.median(updates):>7,.0f})  {m['all'] / relayed:>12.2f}"
        )


if __name__ == "__main__":
    main()

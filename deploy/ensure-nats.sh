#!/bin/sh
# Make sure a nats-server binary exists for the NATS cluster test (called by `make test`).
#
# The test starts its own three-node cluster on free ports (tests/nats_cluster.py), so all that
# is needed is the binary. Installed already: exit 0 silently. Root with apt-get: install it, and
# stop and disable the system service the package starts. Otherwise: one line on stderr, exit 1.
set -eu

if command -v nats-server >/dev/null 2>&1 || [ -x /usr/sbin/nats-server ]; then
    exit 0
fi

if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "ensure-nats: installing nats-server with apt-get" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq nats-server >/dev/null
    # The package starts a server on port 4222; the tests do not use it.
    if [ -d /run/systemd/system ] && command -v systemctl >/dev/null 2>&1; then
        systemctl disable --now nats-server.service >/dev/null 2>&1 ||
            echo "ensure-nats: note: could not stop/disable nats-server.service (tests do not need it)" >&2
    elif command -v service >/dev/null 2>&1; then
        service nats-server stop >/dev/null 2>&1 ||
            echo "ensure-nats: note: could not stop the nats-server service (tests do not need it)" >&2
    fi
    if command -v nats-server >/dev/null 2>&1 || [ -x /usr/sbin/nats-server ]; then
        exit 0
    fi
    echo "ensure-nats: apt-get install nats-server finished but no nats-server binary was found" >&2
    exit 1
fi

echo "ensure-nats: the NATS cluster test needs nats-server 2.9 or newer; install it (Debian/Ubuntu: sudo apt-get install nats-server; macOS: brew install nats-server; or a release from github.com/nats-io/nats-server) and run make test again" >&2
exit 1

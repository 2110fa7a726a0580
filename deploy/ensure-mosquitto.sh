#!/bin/sh
# Make sure a mosquitto binary exists for the broker tests (called by `make test`).
#
# The tests start their own brokers on free ports (tests/mosquitto.py), so all that is needed is
# the binary. Installed already: exit 0 silently. Root with apt-get: install it, and stop and
# disable the system service the package starts. Otherwise: one line on stderr, exit 1.
set -eu

if command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ]; then
    exit 0
fi

if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "ensure-mosquitto: installing mosquitto with apt-get" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq mosquitto >/dev/null
    # The package starts a broker on port 1883; the tests do not use it.
    if [ -d /run/systemd/system ] && command -v systemctl >/dev/null 2>&1; then
        systemctl disable --now mosquitto.service >/dev/null 2>&1 ||
            echo "ensure-mosquitto: note: could not stop/disable mosquitto.service (tests do not need it)" >&2
    elif command -v service >/dev/null 2>&1; then
        service mosquitto stop >/dev/null 2>&1 ||
            echo "ensure-mosquitto: note: could not stop the mosquitto service (tests do not need it)" >&2
    fi
    if command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ]; then
        exit 0
    fi
    echo "ensure-mosquitto: apt-get install mosquitto finished but no mosquitto binary was found" >&2
    exit 1
fi

echo "ensure-mosquitto: the broker tests need Mosquitto 2; install it (Debian/Ubuntu: sudo apt-get install mosquitto; macOS: brew install mosquitto) and run make test again" >&2
exit 1

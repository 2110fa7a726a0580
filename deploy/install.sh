#!/bin/sh
# Install fedge as a systemd service on this machine. Safe to run again (upgrades in place).
#
# usage: install.sh [--dry-run] [--role agent|aggregator] [--enable] SOURCE
#
#   SOURCE        a fedge wheel (fedge-*.whl) or a source directory (with pyproject.toml)
#   --role ROLE   agent (default: the device daemon) or aggregator
#   --enable      also enable and start the service (do it after editing the config)
#   --dry-run     print what would be done, change nothing (no root needed)
#
# What it does, skipping what is already in place:
#   1. a system user and group "fedge" (no login, no home) and, for the agent, group dialout
#   2. /opt/fedge/venv (python3 -m venv), then pip installs SOURCE into it
#   3. /etc/fedge (root:fedge 0750) with certs/, and an example /etc/fedge/ROLE.toml if absent
#      (an existing config is never touched)
#   4. /etc/systemd/system/fedge-ROLE.service from ../systemd/, then systemctl daemon-reload
set -eu

prog=$(basename "$0")
here=$(cd "$(dirname "$0")" && pwd)
repo=$(dirname "$here")

prefix=/opt/fedge
venv=$prefix/venv
etc=/etc/fedge
unit_dir=/etc/systemd/system

die() {
    printf '%s: %s\n' "$prog" "$*" >&2
    exit 1
}
usage() {
    sed -n '2,/^set -eu/p' "$0" | sed '$d; s/^# \{0,1\}//'
}

dry_run=0
role=agent
enable=0
source_arg=""
while [ $# -gt 0 ]; do
    case $1 in
    --dry-run) dry_run=1 ;;
    --enable) enable=1 ;;
    --role)
        [ $# -ge 2 ] || die "--role needs a value (agent or aggregator)"
        role=$2
        shift
        ;;
    --role=*) role=${1#--role=} ;;
    -h | --help)
        usage
        exit 0
        ;;
    -*) die "unknown option $1 (see --help)" ;;
    *)
        [ -z "$source_arg" ] || die "only one SOURCE, got '$source_arg' and '$1'"
        source_arg=$1
        ;;
    esac
    shift
done

case $role in agent | aggregator) ;; *) die "--role must be agent or aggregator, not '$role'" ;; esac
[ -n "$source_arg" ] || die "which fedge to install? give a wheel or a source directory (see --help)"
case $source_arg in
*.whl) [ -f "$source_arg" ] || die "no such wheel: $source_arg" ;;
*) [ -f "$source_arg/pyproject.toml" ] || die "$source_arg is neither a .whl file nor a source directory with pyproject.toml" ;;
esac
# An absolute path: pip must not mistake a relative directory for a package name.
if [ -d "$source_arg" ]; then
    source_path=$(cd "$source_arg" && pwd)
else
    source_path=$(cd "$(dirname "$source_arg")" && pwd)/$(basename "$source_arg")
fi

service=fedge-$role.service
unit_src=$repo/systemd/$service
[ -f "$unit_src" ] || die "unit file not found: $unit_src (run this script from a fedge checkout)"
config=$etc/$role.toml

if [ "$dry_run" -eq 0 ] && [ "$(id -u)" -ne 0 ]; then
    die "must run as root (or try --dry-run)"
fi

# run CMD...: run it, or under --dry-run print it.
run() {
    if [ "$dry_run" -eq 1 ]; then
        printf '+'
        for arg in "$@"; do
            case $arg in
            *[!A-Za-z0-9_./=:@%+-]* | '') printf " '%s'" "$arg" ;;
            *) printf ' %s' "$arg" ;;
            esac
        done
        printf '\n'
    else
        "$@"
    fi
}
note() {
    printf '%s: %s\n' "$prog" "$*"
}

systemd_running() {
    [ -d /run/systemd/system ] && command -v systemctl >/dev/null 2>&1
}

example_config() {
    if [ "$role" = agent ]; then
        cat <<EOF
# fedge agent config (fedge agent --config $config). Edit, then:
#   systemctl enable --now $service
# Relative paths resolve against this file's folder. The service may write only /var/lib/fedge.
device_id = "$(hostname | tr -c 'A-Za-z0-9_.\n-' '-' | cut -c1-64)"
fleet = "default"
broker = "mqtt://127.0.0.1:1883"
# The model the fleet trains (the one shipped with fedge is in the venv:
#   $venv/bin/python -c 'import fedge.models, pathlib; print(pathlib.Path(fedge.models.__file__).parent)')
model = "$prefix/models/digits_mlp.tflite"
data = "/var/lib/fedge/partition.npz"
state_dir = "/var/lib/fedge"
EOF
    else
        cat <<EOF
# fedge aggregator config (fedge aggregator --config $config). Edit, then:
#   systemctl enable --now $service
# Relative paths resolve against this file's folder. The service may write only
# /var/lib/fedge-aggregator.
fleet = "default"
broker = "mqtt://127.0.0.1:1883"
model = "$prefix/models/digits_mlp.tflite"
state_dir = "/var/lib/fedge-aggregator"
min_devices = 2
quorum = 0.5
round_timeout = 120.0

[training]
epochs = 1
batch_size = 32
lr = 0.05
EOF
    fi
}

[ "$dry_run" -eq 1 ] && note "dry run: nothing will be changed"

# 1. User and groups.
if ! getent group fedge >/dev/null 2>&1; then
    run groupadd --system fedge
fi
if ! getent passwd fedge >/dev/null 2>&1; then
    run useradd --system --gid fedge --home-dir /nonexistent --no-create-home \
        --shell /usr/sbin/nologin --comment "fedge daemon" fedge
fi
if [ "$role" = agent ] && ! getent group dialout >/dev/null 2>&1; then
    # The unit's SupplementaryGroups=dialout fails to start without it.
    run groupadd --system dialout
fi

# 2. The virtual environment and fedge in it.
command -v python3 >/dev/null 2>&1 || die "python3 is needed (apt-get install python3 python3-venv)"
if [ ! -x "$venv/bin/python" ]; then
    run mkdir -p "$prefix"
    if [ "$dry_run" -eq 0 ] && ! python3 -c 'import ensurepip' >/dev/null 2>&1; then
        die "python3 cannot make virtual environments here (Debian: apt-get install python3-venv)"
    fi
    run python3 -m venv "$venv"
fi
run "$venv/bin/python" -m pip install --quiet --disable-pip-version-check --upgrade "$source_path"

# 3. Config directory and an example config.
run install -d -m 0750 -o root -g fedge "$etc" "$etc/certs"
if [ -e "$config" ]; then
    note "keeping existing $config"
elif [ "$dry_run" -eq 1 ]; then
    printf '+ write %s (root:fedge 0640):\n' "$config"
    example_config | sed 's/^/    /'
else
    tmp=$(mktemp "$etc/.$role.toml.XXXXXX")
    example_config >"$tmp"
    chown root:fedge "$tmp"
    chmod 0640 "$tmp"
    mv "$tmp" "$config"
    note "wrote example $config: edit it before starting the service"
fi

# 4. The unit.
if [ -f "$unit_dir/$service" ] && cmp -s "$unit_src" "$unit_dir/$service"; then
    note "$unit_dir/$service is up to date"
else
    run install -m 0644 "$unit_src" "$unit_dir/$service"
fi
if systemd_running; then
    run systemctl daemon-reload
    if [ "$enable" -eq 1 ]; then
        run systemctl enable --now "$service"
    else
        note "next: edit $config, then: systemctl enable --now $service"
    fi
else
    note "systemd is not running here: skipped systemctl daemon-reload (and enable); run them on the target"
fi

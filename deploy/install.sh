#!/bin/sh
# Install fedge as a systemd service on this machine, or stage it under a root directory.
# Safe to run again: every file is compared (cmp) with what is in place and written only if it
# differs, so a second run changes nothing.
#
# usage: install.sh [options] SOURCE
#
#   SOURCE          a fedge wheel (fedge-*.whl) or a source directory (with pyproject.toml)
#   --role ROLE     agent (default: the device daemon), aggregator, or worker: a shard worker
#                   or a site gateway's worker (fedge aggregator --worker NAME, with
#                   /etc/fedge/aggregator.toml as the aggregator's; unit
#                   fedge-aggregator-worker@NAME.service)
#   --worker NAME   with --role worker: the worker's name in [shards] workers (the site's
#                   name on a site gateway); the unit instance that --enable starts
#   --bundle DIR    a provisioning bundle (`fedge provision` makes PKI/devices/DEVICE_ID/):
#                   CONFIG (agent.toml; aggregator.toml for aggregator and worker) and the
#                   files beside it (device.crt, device.key, ca.crt, aggregator.pub,
#                   he.secret; a site gateway's worker.crt, worker.key) are copied into
#                   /etc/fedge/ (keys, secrets and passwords readable by group fedge only),
#                   so relative paths in the config keep working; *.tflite files in it go to
#                   /opt/fedge/models/. Its config replaces an existing different one (kept
#                   as CONFIG.old).
#   --enable        also enable and start the service (restarted if this run changed something)
#   --destdir DIR   stage under DIR instead of / (or set DESTDIR): every file goes under DIR and
#                   no root is needed. Not done there, only printed: creating users and groups,
#                   chown (files keep the caller as owner), systemctl, and step 2 (a venv cannot
#                   be moved: its scripts name their own path).
#   --no-venv       skip step 2 (python3 -m venv, pip install SOURCE), the only step that needs
#                   the network; e.g. to install a new bundle, unit or models only
#   --dry-run       print what would be done, change nothing (no root needed)
#
# What it does, skipping what is already in place:
#   1. a system user and group "fedge" (no login, no home) and, for the agent, group dialout
#   2. /opt/fedge/venv (python3 -m venv), then pip installs SOURCE into it
#   3. /opt/fedge/models/ (root 0644): the models shipped in SOURCE (models/artifacts/*.tflite)
#      and any in the bundle; a config's model = "/opt/fedge/models/NAME" must be one of them
#   4. /etc/fedge (root:fedge 0750) with certs/; then the bundle, or else, if there is no config
#      yet, an example CONFIG naming a shipped model (an existing config is never replaced
#      by the example). Modes: configs and *.key files 0640 root:fedge (the service runs as
#      user fedge and must read them, nobody else may), certificates and public keys 0644.
#      The agent's training data (data = ..., the device's own) is not installed here: a
#      warning says when the config names a file that does not exist yet.
#   5. /etc/systemd/system/fedge-ROLE.service (fedge-aggregator-worker@.service) from
#      ../systemd/, then systemctl daemon-reload
set -eu

prog=$(basename "$0")
here=$(cd "$(dirname "$0")" && pwd)
repo=$(dirname "$here")

# Paths on the target; files are written to $root$path ($root is the staging root, or empty).
prefix=/opt/fedge
venv=$prefix/venv
models=$prefix/models
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
no_venv=0
bundle=""
worker=""
root=${DESTDIR:-}
source_arg=""
while [ $# -gt 0 ]; do
    case $1 in
    --dry-run) dry_run=1 ;;
    --enable) enable=1 ;;
    --no-venv) no_venv=1 ;;
    --role | --bundle | --destdir | --worker)
        [ $# -ge 2 ] || die "$1 needs a value (see --help)"
        case $1 in
        --role) role=$2 ;;
        --worker) worker=$2 ;;
        --bundle) bundle=$2 ;;
        --destdir) root=$2 ;;
        esac
        shift
        ;;
    --role=*) role=${1#--role=} ;;
    --worker=*) worker=${1#--worker=} ;;
    --bundle=*) bundle=${1#--bundle=} ;;
    --destdir=*) root=${1#--destdir=} ;;
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

case $role in agent | aggregator | worker) ;; *) die "--role must be agent, aggregator or worker, not '$role'" ;; esac
if [ "$role" = worker ]; then
    [ -n "$worker" ] || die "--role worker needs --worker NAME (its name in [shards] workers)"
    case $worker in
    *[!A-Za-z0-9_.-]*) die "--worker '$worker': use 1-64 of A-Z a-z 0-9 _ . -" ;;
    esac
    [ "${#worker}" -le 64 ] || die "--worker '$worker': at most 64 characters"
else
    [ -z "$worker" ] || die "--worker is for --role worker"
fi
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

# The staging root: absolute, no trailing slash; "/" is the real system.
case $root in
'' | /) root="" ;;
/*) root=${root%/} ;;
*) root=$(pwd)/${root%/} ;;
esac
staging=0
[ -n "$root" ] && staging=1
[ "$staging" -eq 1 ] && no_venv=1

# The unit file, the service to enable, and the config's name (a worker reads the aggregator's).
if [ "$role" = worker ]; then
    unit=fedge-aggregator-worker@.service
    service=fedge-aggregator-worker@$worker.service
    conf=aggregator.toml
else
    unit=fedge-$role.service
    service=$unit
    conf=$role.toml
fi
unit_src=$repo/systemd/$unit
[ -f "$unit_src" ] || die "unit file not found: $unit_src (run this script from a fedge checkout)"
config=$etc/$conf

if [ -n "$bundle" ]; then
    [ -d "$bundle" ] || die "no such bundle directory: $bundle"
    bundle=$(cd "$bundle" && pwd)
    [ -f "$bundle/$conf" ] || die "bundle $bundle has no $conf (is it a bundle from fedge provision?)"
fi

if [ "$dry_run" -eq 0 ] && [ "$staging" -eq 0 ] && [ "$(id -u)" -ne 0 ]; then
    die "must run as root (or try --dry-run, or --destdir DIR to stage)"
fi

work=$(mktemp -d "${TMPDIR:-/tmp}/fedge-install.XXXXXX")
trap 'rm -rf "$work"' EXIT
trap 'exit 130' INT TERM

changes=0
fedge_owned="" # staging: what would be chown root:fedge on the target

# show PREFIX CMD...: print PREFIX and the command, quoted where a shell would need it.
show() {
    printf '%s' "$1"
    shift
    for arg in "$@"; do
        case $arg in
        *[!A-Za-z0-9_./=:@%+-]* | '') printf " '%s'" "$arg" ;;
        *) printf ' %s' "$arg" ;;
        esac
    done
    printf '\n'
}
# run CMD...: run it, or under --dry-run print it.
run() {
    if [ "$dry_run" -eq 1 ]; then
        show + "$@"
    else
        "$@"
    fi
}
# system CMD...: a step on the real system (users, chown, systemctl): run it, print it under
# --dry-run, and under a staging root only record it (print it; it is not run).
system() {
    if [ "$staging" -eq 1 ]; then
        show "$prog: staging, not run:" "$@"
    else
        run "$@"
    fi
}
note() {
    printf '%s: %s\n' "$prog" "$*"
}

# perms PATH MODE GROUP: set PATH's mode, and owner root:GROUP unless staging, where they differ.
perms() {
    if [ "$(stat -L -c %a "$1")" != "${2#0}" ]; then
        run chmod "$2" "$1"
        changes=$((changes + 1))
    fi
    if [ "$staging" -eq 0 ] && [ "$(stat -L -c %U:%G "$1")" != "root:$3" ]; then
        run chown "root:$3" "$1"
        changes=$((changes + 1))
    fi
}

# owned PATH GROUP: staging: remember that PATH belongs to root:GROUP on the target.
owned() {
    if [ "$staging" -eq 1 ] && [ "$2" != root ]; then
        fedge_owned="$fedge_owned $1"
    fi
}

# directory PATH MODE GROUP: make $root$PATH, or fix its mode and owner.
directory() {
    owned "$1" "$3"
    if [ -d "$root$1" ]; then
        perms "$root$1" "$2" "$3"
    elif [ "$staging" -eq 1 ]; then
        run install -d -m "$2" "$root$1"
        changes=$((changes + 1))
    else
        run install -d -m "$2" -o root -g "$3" "$root$1"
        changes=$((changes + 1))
    fi
}

# put SRC PATH MODE GROUP: install SRC as $root$PATH (write, fsync, rename) unless the bytes there
# are the same already; then fix only its mode and owner, touching nothing else.
put() {
    dest=$root$2
    owned "$2" "$4"
    if [ -f "$dest" ] && cmp -s "$1" "$dest"; then
        perms "$dest" "$3" "$4"
        return 0
    fi
    changes=$((changes + 1))
    if [ "$dry_run" -eq 1 ]; then
        if [ "$staging" -eq 1 ]; then
            run install -m "$3" "$1" "$dest"
        else
            run install -m "$3" -o root -g "$4" "$1" "$dest"
        fi
        return 0
    fi
    tmp=$(dirname "$dest")/.$(basename "$dest").fedge-new
    if [ "$staging" -eq 1 ]; then
        install -m "$3" "$1" "$tmp"
    else
        install -m "$3" -o root -g "$4" "$1" "$tmp"
    fi
    sync "$tmp" 2>/dev/null || sync
    mv -f "$tmp" "$dest"
    note "installed $dest"
}

# toml_top KEY FILE: the top-level KEY = "..." of a config (before its first [table]).
toml_top() {
    sed -n -e '/^[[:space:]]*\[/q' \
        -e "s/^[[:space:]]*$1[[:space:]]*=[[:space:]]*[\"']\\([^\"']*\\)[\"'].*/\\1/p" "$2" |
        head -n 1
}

# model_source NAME: the file to install as $models/NAME (the bundle's first), or nothing.
model_source() {
    if [ -n "$bundle" ] && [ -f "$bundle/$1" ]; then
        printf '%s\n' "$bundle/$1"
    elif [ -f "$shipped/$1" ]; then
        printf '%s\n' "$shipped/$1"
    fi
}

# check_data CONFIG: does the training data an agent's CONFIG names exist? Prints a problem.
# It is the device's own (install.sh does not ship it); a config reading a [serial] sensor
# names none.
check_data() {
    data=$(toml_top data "$1")
    case $data in
    '') return 0 ;;
    /*) path=$data ;;
    *) path=$etc/$data ;; # relative to the config's folder
    esac
    [ -f "$root$path" ] || printf 'data %s does not exist\n' "$root$path"
}

# check_model CONFIG: is the model CONFIG names installed (or about to be)? Prints a problem.
check_model() {
    model=$(toml_top model "$1")
    case $model in
    '') printf '%s names no model\n' "$1" ;;
    "$models"/*/*) printf 'model %s: only files directly in %s are managed here\n' "$model" "$models" ;;
    "$models"/*)
        [ -n "$(model_source "${model#"$models"/}")" ] || [ -f "$root$model" ] ||
            printf 'model %s is neither shipped with fedge (%s) nor in the bundle\n' \
                "$model" "$(cd "$shipped" && ls -- *.tflite | tr '\n' ' ' | sed 's/ $//')"
        ;;
    /*) [ -f "$root$model" ] || printf 'model %s does not exist (install it there)\n' "$model" ;;
    *) [ -f "$root$etc/$model" ] ||
        printf 'model %s (relative to %s) does not exist (name it as %s/NAME)\n' "$model" "$etc" "$models" ;;
    esac
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
# The model the fleet trains: one of those in $models (shipped with fedge).
model = "$models/digits_mlp.tflite"
# Local training data (arrays x and y): put it here, or read a sensor with [serial] and [task]
# instead (see deploy/examples/agent-serial.toml in the fedge source).
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
# The initial global model: one of those in $models (shipped with fedge).
model = "$models/digits_mlp.tflite"
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
    if [ "$role" = worker ]; then
        cat <<EOF

# This host runs the shard worker $worker (fedge aggregator --config $config --worker
# $worker): the same config as the coordinator's, whose [shards] lists every worker. On a site
# gateway, broker is the site's own broker (docs/scale.md).
[shards]
workers = ["$worker"]
EOF
    fi
}

[ "$dry_run" -eq 1 ] && note "dry run: nothing will be changed"
[ "$staging" -eq 1 ] && note "staging under $root (paths below are under it)"

# The models shipped with this SOURCE.
case $source_path in
*.whl)
    shipped=$work/models
    command -v python3 >/dev/null 2>&1 || die "python3 is needed to read the wheel $source_path"
    python3 - "$source_path" "$shipped" <<'EOF' || die "cannot read the models in $source_path"
import pathlib, sys, zipfile
out = pathlib.Path(sys.argv[2])
out.mkdir()
with zipfile.ZipFile(sys.argv[1]) as wheel:
    for name in wheel.namelist():
        if name.startswith("fedge/models/artifacts/") and name.endswith(".tflite"):
            (out / pathlib.PurePosixPath(name).name).write_bytes(wheel.read(name))
EOF
    ;;
*) shipped=$source_path/models/artifacts ;;
esac
ls "$shipped"/*.tflite >/dev/null 2>&1 || die "$source_path ships no models (models/artifacts/*.tflite)"

# A bundle's config must name a model this run installs; say so before changing anything.
if [ -n "$bundle" ]; then
    problem=$(check_model "$bundle/$conf")
    [ -z "$problem" ] || die "bundle $bundle/$conf: $problem"
fi

# 1. User and groups.
if [ "$staging" -eq 1 ]; then
    note "staging: the user and groups are made on the target, where it lacks them"
    system groupadd --system fedge
    system useradd --system --gid fedge --home-dir /nonexistent --no-create-home \
        --shell /usr/sbin/nologin --comment "fedge daemon" fedge
    if [ "$role" = agent ]; then
        system groupadd --system dialout
    fi
else
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
fi

# 2. The virtual environment and fedge in it.
directory "$prefix" 0755 root
if [ "$no_venv" -eq 1 ]; then
    if [ "$staging" -eq 1 ]; then
        system python3 -m venv "$venv"
        system "$venv/bin/python" -m pip install --upgrade "$source_path"
    else
        note "--no-venv: left $venv alone"
        if [ ! -x "$venv/bin/fedge" ]; then
            note "warning: $venv/bin/fedge does not exist; the service cannot start without it"
        fi
    fi
else
    command -v python3 >/dev/null 2>&1 || die "python3 is needed (apt-get install python3 python3-venv)"
    if [ ! -x "$venv/bin/python" ]; then
        if [ "$dry_run" -eq 0 ] && ! python3 -c 'import ensurepip' >/dev/null 2>&1; then
            die "python3 cannot make virtual environments here (Debian: apt-get install python3-venv)"
        fi
        run python3 -m venv "$venv"
        changes=$((changes + 1))
    fi
    # 32-bit Raspberry Pi OS on a 64-bit kernel: uname says aarch64, so pip would evaluate
    # fedge's LiteRT marker as on a 64-bit system and look for a wheel that a 32-bit Python
    # cannot use. Under linux32 the machine reads armv8l and LiteRT is left out, as on armv7l.
    personality=""
    if [ "$(uname -m)" = aarch64 ] && [ "$("$venv/bin/python" -c 'import struct; print(struct.calcsize("P") * 8)' 2>/dev/null || echo 64)" = 32 ]; then
        command -v setarch >/dev/null 2>&1 && personality="setarch linux32"
    fi
    # shellcheck disable=SC2086 # empty, or two words
    run $personality "$venv/bin/python" -m pip install --quiet --disable-pip-version-check --upgrade "$source_path"
fi

# 3. The models.
directory "$models" 0755 root
for file in "$shipped"/*.tflite; do
    name=$(basename "$file")
    put "$(model_source "$name")" "$models/$name" 0644 root
done
if [ -n "$bundle" ]; then
    for file in "$bundle"/*.tflite; do
        [ -f "$file" ] || continue
        put "$file" "$models/$(basename "$file")" 0644 root
    done
fi

# 4. Config directory, then the bundle or an example config.
directory "$etc" 0750 fedge
directory "$etc/certs" 0750 fedge
if [ -n "$bundle" ]; then
    if [ -f "$root$config" ] && ! cmp -s "$bundle/$conf" "$root$config"; then
        note "replacing $root$config with the bundle's (the old one is kept as $conf.old)"
        run cp -p "$root$config" "$root$config.old"
        changes=$((changes + 1))
    fi
    for file in "$bundle"/*; do
        name=$(basename "$file")
        case $name in
        *.tflite) continue ;; # installed with the models
        esac
        if [ ! -f "$file" ]; then
            note "bundle: skipped $file (not a regular file)"
            continue
        fi
        case $name in
        *.toml | *.key | *.secret | *password*) put "$file" "$etc/$name" 0640 fedge ;;
        *) put "$file" "$etc/$name" 0644 root ;;
        esac
    done
elif [ -e "$root$config" ]; then
    owned "$config" fedge
    note "keeping existing $root$config"
else
    example_config >"$work/$conf"
    put "$work/$conf" "$config" 0640 fedge
    if [ "$dry_run" -eq 1 ]; then
        sed 's/^/    /' "$work/$conf"
    else
        note "wrote an example $root$config: edit it before starting the service"
    fi
fi
if [ -f "$root$config" ]; then
    problem=$(check_model "$root$config")
    [ -z "$problem" ] || note "warning: $root$config: $problem; the service will not start"
fi
# The installed config, or under --dry-run the bundle's that would be.
installed=$root$config
[ -n "$bundle" ] && installed=$bundle/$conf
if [ "$role" = agent ] && [ -f "$installed" ]; then
    problem=$(check_data "$installed")
    [ -z "$problem" ] || note "warning: $root$config: $problem; the agent will not start" \
        "until it does (or until the config reads a [serial] sensor instead)"
fi

# 5. The unit.
directory "$unit_dir" 0755 root
put "$unit_src" "$unit_dir/$unit" 0644 root
if [ "$staging" -eq 1 ]; then
    # shellcheck disable=SC2086 # one word per path
    system chown root:fedge $fedge_owned
    system systemctl daemon-reload
    if [ "$enable" -eq 1 ]; then
        system systemctl enable --now "$service"
    fi
elif [ -d /run/systemd/system ] && command -v systemctl >/dev/null 2>&1; then
    run systemctl daemon-reload
    if [ "$enable" -eq 1 ]; then
        # A running service restarts on what changed; a stopped one starts.
        if [ "$changes" -gt 0 ]; then
            run systemctl try-restart "$service"
        fi
        run systemctl enable --now "$service"
    elif [ "$changes" -gt 0 ]; then
        note "next: check $config, then: systemctl enable --now $service (or restart it)"
    fi
else
    note "systemd is not running here: skipped systemctl daemon-reload (and enable); run them on the target"
fi

if [ "$changes" -eq 0 ]; then
    note "nothing changed"
elif [ "$dry_run" -eq 1 ]; then
    note "$changes change(s) would be made"
else
    note "$changes change(s) made"
fi

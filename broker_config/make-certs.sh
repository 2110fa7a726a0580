#!/bin/sh
# Make a fleet CA, a broker (server) certificate and client certificates for fedge.
#
# usage: make-certs.sh [-n SERVER_NAME]... [-d DAYS] OUTDIR [CLIENT_CN]...
#
#   OUTDIR      where the files go (created if missing). Re-running is safe: an existing CA or
#               certificate is kept, only missing ones are made, so new devices can be added
#               later with the same CA.
#   CLIENT_CN   one client certificate per name: device ids, "aggregator", gateway bridge
#               names. The broker (production.conf) uses the CN as the MQTT username, and the
#               ACL (fedge.acl) grants topics by that name, so a CN is one topic level:
#               at most 64 letters, digits, '.', '_' and '-' (as fedge's
#               configs accept for device ids).
#   -n NAME     DNS name or IP address the broker is reached at (repeatable; default:
#               localhost and 127.0.0.1). Clients check the server certificate against it.
#   -d DAYS     validity of new leaf certificates (default 825); the CA gets 10 years.
#
# Output (keys are mode 0600; give the broker's key to the mosquitto user, e.g.
# chown root:mosquitto server.key && chmod 0640 server.key):
#   ca.crt ca.key            the fleet CA; keep ca.key off devices and off the broker
#   server.crt server.key    for production.conf (certfile/keyfile), ca.crt is its cafile
#   <CN>.crt <CN>.key        one pair per client
#
# Keys are ECDSA P-256: small, and fast to handshake on a Raspberry Pi.
set -eu

prog=$(basename "$0")
die() {
    printf '%s: %s\n' "$prog" "$*" >&2
    exit 1
}

server_names=""
days=825
while getopts n:d:h opt; do
    case $opt in
    n) server_names="$server_names $OPTARG" ;;
    d) days=$OPTARG ;;
    h)
        sed -n '2,/^set -eu/p' "$0" | sed '$d; s/^# \{0,1\}//'
        exit 0
        ;;
    *) die "usage: $prog [-n SERVER_NAME]... [-d DAYS] OUTDIR [CLIENT_CN]..." ;;
    esac
done
shift $((OPTIND - 1))
[ $# -ge 1 ] || die "usage: $prog [-n SERVER_NAME]... [-d DAYS] OUTDIR [CLIENT_CN]..."
out=$1
shift
[ -n "$server_names" ] || server_names="localhost 127.0.0.1"
case $days in '' | *[!0-9]*) die "-d wants a number of days, got '$days'" ;; esac
command -v openssl >/dev/null 2>&1 || die "openssl is needed (apt-get install openssl)"

for cn in "$@"; do
    case $cn in
    '' | *[!A-Za-z0-9._-]*) die "client CN '$cn' must be letters, digits, '.', '_' or '-' (it becomes one MQTT topic level)" ;;
    ca | server) die "client CN '$cn' would overwrite the $cn files; choose another name" ;;
    esac
    [ ${#cn} -le 64 ] || die "client CN '$cn' is longer than 64 characters"
done

mkdir -p "$out"
umask 077
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

newkey() {
    openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$1" 2>/dev/null
    chmod 0600 "$1"
}

# sign NAME CN EXTFILE: make NAME.key and NAME.crt for CN, signed by the CA, unless present.
sign() {
    if [ -f "$out/$1.crt" ] && [ -f "$out/$1.key" ]; then
        printf 'kept    %s\n' "$out/$1.crt"
        return
    fi
    newkey "$out/$1.key"
    openssl req -new -key "$out/$1.key" -subj "/O=fedge/CN=$2" -out "$tmp/$1.csr"
    openssl x509 -req -in "$tmp/$1.csr" -CA "$out/ca.crt" -CAkey "$out/ca.key" \
        -CAcreateserial -CAserial "$tmp/ca.srl" -days "$days" -sha256 \
        -extfile "$3" -out "$out/$1.crt" 2>/dev/null
    chmod 0644 "$out/$1.crt"
    printf 'made    %s (CN=%s)\n' "$out/$1.crt" "$2"
}

# The CA.
if [ -f "$out/ca.crt" ] && [ -f "$out/ca.key" ]; then
    printf 'kept    %s\n' "$out/ca.crt"
else
    newkey "$out/ca.key"
    cat >"$tmp/ca.ext" <<EOF
[req]
distinguished_name = dn
x509_extensions = v3_ca
[dn]
[v3_ca]
basicConstraints = critical, CA:true, pathlen:0
keyUsage = critical, keyCertSign, cRLSign
subjectKeyIdentifier = hash
EOF
    openssl req -new -x509 -key "$out/ca.key" -subj "/O=fedge/CN=fedge fleet CA" \
        -days 3650 -sha256 -config "$tmp/ca.ext" -out "$out/ca.crt"
    chmod 0644 "$out/ca.crt"
    printf 'made    %s\n' "$out/ca.crt"
fi

# The broker certificate, with every server name as a subjectAltName.
san=""
for name in $server_names; do
    case $name in
    *:* | *[0-9].*[0-9].*[0-9].*[0-9]) entry="IP:$name" ;; # IPv6, or IPv4 dotted quad
    *) entry="DNS:$name" ;;
    esac
    san="${san:+$san, }$entry"
done
first_name=${server_names# }
first_name=${first_name%% *}
cat >"$tmp/server.ext" <<EOF
basicConstraints = critical, CA:false
keyUsage = critical, digitalSignature
extendedKeyUsage = serverAuth
subjectAltName = $san
EOF
sign server "$first_name" "$tmp/server.ext"

# Client certificates: CN = device id (or aggregator, or a gateway bridge name).
cat >"$tmp/client.ext" <<EOF
basicConstraints = critical, CA:false
keyUsage = critical, digitalSignature
extendedKeyUsage = clientAuth
EOF
for cn in "$@"; do
    sign "$cn" "$cn" "$tmp/client.ext"
done

#!/usr/bin/env bash
# Starts etcd and the real CRD server (built by install.sh) on 127.0.0.1, with ports
# chosen now, and returns once the server is ready and the stand-in CRDs for Leases
# and Events are Established.
#
#   e2e/apiserver/up.sh STATE_DIR
#
# Writes into STATE_DIR: url (the server's http:// URL), kubeconfig (cluster, user with
# a dummy bearer token, context), etcd-url, etcd.pid, apiserver.pid, etcd.log,
# apiserver.log, and etcd/ (the data; kept between runs). Prints the URL on stdout.
# Stop with e2e/apiserver/down.sh STATE_DIR. Exit code 2 (with a line starting
# "apiserver harness unavailable:") when install.sh cannot provide the server here.
#
# Environment: MULTISITE_APISERVER_CACHE (see install.sh),
# MULTISITE_APISERVER_READY_TIMEOUT (seconds, default 60).
set -euo pipefail

if [ $# -ne 1 ]; then
    echo "usage: $0 STATE_DIR" >&2
    exit 1
fi
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
mkdir -p "$1"
state=$(cd "$1" && pwd)
cache=${MULTISITE_APISERVER_CACHE:-$HOME/.cache/multisite-apiserver}
ready_timeout=${MULTISITE_APISERVER_READY_TIMEOUT:-60}

t0=$EPOCHREALTIME
elapsed() { awk -v a="$1" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.1fs", b - a }'; }
say() { printf 'apiserver up: %s\n' "$*" >&2; }
for tool in curl python3; do
    command -v "$tool" >/dev/null || { echo "apiserver harness unavailable: $tool is not installed" >&2; exit 2; }
done

alive() { # pid file $1 names a live process
    [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null
}
ready() { # the server at URL $1 answers /readyz
    [ "$(curl -s -o /dev/null -w '%{http_code}' --max-time 2 "$1/readyz" || true)" = 200 ]
}

# Already up: nothing to do.
if alive "$state/apiserver.pid" && alive "$state/etcd.pid" && [ -f "$state/url" ] && ready "$(cat "$state/url")"; then
    say "already running"
    cat "$state/url"
    exit 0
fi
"$here/down.sh" "$state" >/dev/null 2>&1 || true

t=$EPOCHREALTIME
"$here/install.sh" -q "$cache" >&2 || exit $?
install_time=$(elapsed "$t")
bin=$(cd "$cache" && pwd)/bin

free_ports() { # three ports nothing listens on, on 127.0.0.1
    python3 -c '
import socket
socks = [socket.socket() for _ in range(3)]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(" ".join(str(s.getsockname()[1]) for s in socks))'
}

start() { # $1 pid file, $2 log file, rest: the command; detached from this shell
    setsid "${@:3}" </dev/null >"$2" 2>&1 &
    echo $! >"$1"
}

fail() {
    say "$1"
    for log in etcd apiserver; do
        if [ -s "$state/$log.log" ]; then
            echo "--- last lines of $state/$log.log" >&2
            tail -n 20 "$state/$log.log" >&2
        fi
    done
    "$here/down.sh" "$state" >/dev/null 2>&1 || true
    exit 1
}

wait_for() { # $1 what, $2 pid file, rest: a command that succeeds once it is up
    local deadline=$((SECONDS + ready_timeout))
    until "${@:3}"; do
        alive "$2" || return 1
        [ $SECONDS -lt $deadline ] || fail "$1 not ready after ${ready_timeout}s"
        sleep 0.1
    done
}

# A port taken between choosing and binding makes a server exit at once: try again.
for attempt in 1 2 3; do
    read -r etcd_client etcd_peer api_port < <(free_ports)
    etcd_url=http://127.0.0.1:$etcd_client
    url=http://127.0.0.1:$api_port
    t=$EPOCHREALTIME
    start "$state/etcd.pid" "$state/etcd.log" "$bin/etcd" --name multisite --data-dir "$state/etcd" \
        --listen-client-urls "$etcd_url" --advertise-client-urls "$etcd_url" \
        --listen-peer-urls "http://127.0.0.1:$etcd_peer" --initial-advertise-peer-urls "http://127.0.0.1:$etcd_peer" \
        --initial-cluster "multisite=http://127.0.0.1:$etcd_peer" --listen-metrics-urls "" \
        --unsafe-no-fsync --log-level warn
    if ! wait_for etcd "$state/etcd.pid" curl -sf --max-time 2 -o /dev/null "$etcd_url/health"; then
        if [ "$attempt" -lt 3 ] && grep -q 'address already in use' "$state/etcd.log"; then continue; fi
        fail "etcd exited"
    fi
    etcd_time=$(elapsed "$t")
    t=$EPOCHREALTIME
    start "$state/apiserver.pid" "$state/apiserver.log" "$bin/multisite-apiserver" --listen "127.0.0.1:$api_port" \
        --etcd-servers "$etcd_url"
    if ! wait_for "the API server" "$state/apiserver.pid" ready "$url"; then
        if [ "$attempt" -lt 3 ] && grep -q 'address already in use' "$state/apiserver.log"; then
            "$here/down.sh" "$state" >/dev/null 2>&1 || true
            continue
        fi
        fail "the API server exited"
    fi
    server_time=$(elapsed "$t")
    break
done

echo "$url" >"$state/url"
echo "$etcd_url" >"$state/etcd-url"
cat >"$state/kubeconfig" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: multisite-apiserver
  cluster:
    server: $url
users:
- name: multisite-apiserver
  user:
    token: multisite-test
contexts:
- name: multisite-apiserver
  context:
    cluster: multisite-apiserver
    user: multisite-apiserver
current-context: multisite-apiserver
EOF

# Stand-ins for the two built-in APIs the operator needs besides its own: Leases
# (leader election) and Events. Any content is kept; only metadata is checked.
stand_in() { # $1 group, $2 plural, $3 kind, $4 short name, $5 printer columns (JSON)
    cat <<EOF
{
  "apiVersion": "apiextensions.k8s.io/v1",
  "kind": "CustomResourceDefinition",
  "metadata": {
    "name": "$2.$1",
    "annotations": {"api-approved.kubernetes.io": "unapproved, test stand-in"}
  },
  "spec": {
    "group": "$1",
    "scope": "Namespaced",
    "names": {"plural": "$2", "singular": "${3,,}", "kind": "$3", "listKind": "${3}List", "shortNames": ["$4"]},
    "versions": [{
      "name": "v1",
      "served": true,
      "storage": true,
      "additionalPrinterColumns": $5,
      "schema": {"openAPIV3Schema": {
        "type": "object",
        "x-kubernetes-preserve-unknown-fields": true,
        "properties": {"metadata": {"type": "object"}}
      }}
    }]
  }
}
EOF
}
t=$EPOCHREALTIME
crds=(leases.coordination.k8s.io events.events.k8s.io)
apply_crd() { # $1 name, stdin: the CRD; server-side apply
    curl -sf --max-time 10 -X PATCH -H 'Content-Type: application/apply-patch+yaml' --data-binary @- \
        "$url/apis/apiextensions.k8s.io/v1/customresourcedefinitions/$1?fieldManager=multisite-harness&force=true" >/dev/null ||
        fail "the API server refused the stand-in CRD $1"
}
stand_in coordination.k8s.io leases Lease lease \
    '[{"name": "Holder", "type": "string", "jsonPath": ".spec.holderIdentity"}, {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"}]' |
    apply_crd leases.coordination.k8s.io
stand_in events.k8s.io events Event ev \
    '[{"name": "Type", "type": "string", "jsonPath": ".type"}, {"name": "Reason", "type": "string", "jsonPath": ".reason"}, {"name": "Object", "type": "string", "jsonPath": ".regarding.name"}, {"name": "Note", "type": "string", "jsonPath": ".note"}]' |
    apply_crd events.events.k8s.io
established() {
    local name
    for name in "${crds[@]}"; do
        curl -sf --max-time 2 "$url/apis/apiextensions.k8s.io/v1/customresourcedefinitions/$name" | python3 -c '
import json, sys
conditions = json.load(sys.stdin).get("status", {}).get("conditions", [])
sys.exit(0 if any(c["type"] == "Established" and c["status"] == "True" for c in conditions) else 1)' || return 1
    done
}
wait_for "the stand-in CRDs" "$state/apiserver.pid" established || fail "the API server exited"
crd_time=$(elapsed "$t")

say "ready in $(elapsed "$t0") (install check $install_time, etcd $etcd_time, server $server_time, stand-in CRDs $crd_time); kubeconfig: $state/kubeconfig"
echo "$url"

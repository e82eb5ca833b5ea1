#!/usr/bin/env bash
# shellcheck source-path=SCRIPTDIR
# Starts the real Kubernetes control plane on this machine, as processes on 127.0.0.1:
# etcd, kube-apiserver, kube-controller-manager and kube-scheduler (built by
# install.sh, which this runs first), with a CA of its own and a client-certificate
# kubeconfig for an administrator, and returns once the API server is ready and the
# controller manager has done its first work.
#
#   e2e/kube/up.sh STATE_DIR
#
# STATE_DIR (made when missing; anything an earlier run left there is replaced, except
# with MULTISITE_KUBE_KEEP=1, see below):
#   url                        the API server's URL (https://127.0.0.1:PORT)
#   kubeconfig                 administrator (O=system:masters), client certificate
#   versions                   kubernetes, etcd and go versions of the binaries, the server's /version
#   ports                      NAME=PORT of every listener
#   pki/                       ca.crt, ca.key (kept so node-credentials.sh can mint more);
#                              NAME.crt/NAME.key for apiserver, admin, kubelet-client,
#                              controller-manager, scheduler, front-proxy-client;
#                              front-proxy-ca.crt/key; sa.key/sa.pub (ServiceAccount tokens)
#   nodes/NAME/                kubeconfig (system:node:NAME), client.crt/key, serving.crt/key,
#                              for every NAME in $MULTISITE_KUBE_NODES
#   etcd/                      etcd's data
#   kube-controller-manager/, kube-scheduler/   their self-made serving certificates
#   controller-manager.kubeconfig, scheduler.kubeconfig
#   etcd.pid etcd.log kube-apiserver.pid kube-apiserver.log kube-controller-manager.pid
#   kube-controller-manager.log kube-scheduler.pid kube-scheduler.log
#
# Exit codes: 0 ready (stop it with down.sh STATE_DIR); 1 it did not start (the log
# lines of the program at fault are printed, and what was started is stopped); 2 the
# harness cannot be had here (passed through from install.sh).
#
# Environment:
#   MULTISITE_KUBE_CACHE          the build cache (see install.sh)
#   MULTISITE_KUBE_BINARIES       a directory with kube-apiserver, kube-controller-manager and
#                                 kube-scheduler (e.g. the official release binaries) and etcd
#                                 (there or on PATH): used as they are, nothing is built
#   MULTISITE_KUBE_KEEP=1         resume the cluster an earlier run left in STATE_DIR: its
#                                 objects (etcd's data), CAs and ServiceAccount signing key
#                                 stay; ports, certificates and kubeconfigs are made anew
#   MULTISITE_KUBE_NODES          node names to make credentials for (default "node-a node-b node-c")
#   MULTISITE_KUBE_START_TIMEOUT  seconds each program has to become ready (default 120)
#   MULTISITE_KUBE_SERVICE_CIDR   the service cluster IP range (default 10.96.0.0/16; only
#                                 configuration: nothing here routes to it)
set -euo pipefail

if [ $# -ne 1 ]; then
    echo "usage: $0 STATE_DIR" >&2
    exit 1
fi

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=lib.sh
. "$here/lib.sh"
# shellcheck source=pki.sh
. "$here/pki.sh"

say() { printf 'kube up: %s\n' "$*"; }
t0=$EPOCHREALTIME

mkdir -p "$1"
state=$(cd "$1" && pwd)
nodes=${MULTISITE_KUBE_NODES-node-a node-b node-c}
timeout=${MULTISITE_KUBE_START_TIMEOUT:-120}
service_cidr=${MULTISITE_KUBE_SERVICE_CIDR:-10.96.0.0/16}

for tool in openssl curl python3 setsid base64; do
    command -v "$tool" >/dev/null || { echo "kube harness unavailable: $tool is not installed" >&2; exit 2; }
done

# A control plane of an earlier run that still runs in STATE_DIR is refused, not
# taken over.
for p in "${kube_programs[@]}"; do
    if [ -f "$state/$p.pid" ] && kill -0 "$(cat "$state/$p.pid")" 2>/dev/null &&
        tr '\0' '\n' <"/proc/$(cat "$state/$p.pid")/cmdline" 2>/dev/null | grep -qF "$state/"; then
        echo "kube up: $p of an earlier run still runs in $state (pid $(cat "$state/$p.pid")); run e2e/kube/down.sh $state first" >&2
        exit 1
    fi
done

# ---------------------------------------------------------------- binaries
t=$EPOCHREALTIME
if [ -n "${MULTISITE_KUBE_BINARIES:-}" ]; then
    # Binaries the user brought: the three of a Kubernetes release, etcd there or on PATH.
    bin=$(cd "$MULTISITE_KUBE_BINARIES" 2>/dev/null && pwd) ||
        { echo "kube harness unavailable: MULTISITE_KUBE_BINARIES=$MULTISITE_KUBE_BINARIES is not a directory" >&2; exit 2; }
    for p in kube-apiserver kube-controller-manager kube-scheduler; do
        [ -x "$bin/$p" ] || { echo "kube harness unavailable: $bin/$p is missing or not executable" >&2; exit 2; }
    done
    if [ ! -x "$bin/etcd" ]; then
        etcd_path=$(command -v etcd) ||
            { echo "kube harness unavailable: no etcd in $bin or on PATH (Debian: apt install etcd-server)" >&2; exit 2; }
        mkdir -p "$state/bin"
        for p in kube-apiserver kube-controller-manager kube-scheduler; do ln -sf "$bin/$p" "$state/bin/$p"; done
        ln -sf "$etcd_path" "$state/bin/etcd"
        bin=$state/bin
    fi
    build=$state/binaries
    mkdir -p "$build"
    {
        echo "kubernetes $("$bin/kube-apiserver" --version 2>/dev/null | awk '{ print $2 }')"
        echo "etcd $("$bin/etcd" --version 2>/dev/null | awk '/etcd Version/ { print "v" $3 }')"
        echo "binaries $bin"
    } >"$build/versions"
else
    rc=0
    "$here/install.sh" -q || rc=$?
    [ "$rc" = 0 ] || exit "$rc"
    cache=$(kube_cache_dir "")
    build=$cache/builds/$(kube_build_key)
    bin=$build/bin
fi
say "binaries: $(kube_elapsed "$t") ($bin)"

# ---------------------------------------------------------------- state, ports
pki=$state/pki
resume=0
if [ "${MULTISITE_KUBE_KEEP:-}" = 1 ] && [ -f "$pki/ca.key" ] && [ -f "$pki/front-proxy-ca.key" ] &&
    [ -f "$pki/sa.key" ] && [ -d "$state/etcd/member" ]; then
    resume=1
    # The CAs, the ServiceAccount key and etcd's data stay; the rest is made anew.
    find "$pki" -mindepth 1 -maxdepth 1 ! -name 'ca.*' ! -name 'front-proxy-ca.*' ! -name 'sa.*' -exec rm -rf {} +
    rm -rf "$state/nodes" "$state/kube-apiserver" "$state/kube-controller-manager" "$state/kube-scheduler"
else
    rm -rf "$pki" "$state/nodes" "$state/etcd" "$state/kube-apiserver" "$state/kube-controller-manager" "$state/kube-scheduler"
fi
rm -f "$state"/*.pid "$state"/*.log "$state"/*.kubeconfig "$state/kubeconfig" "$state/url" "$state/versions" "$state/ports"
mkdir -p "$pki" "$state/nodes"

# Free ports, held open together so that they differ, then released for the programs.
read -r etcd_port etcd_peer_port api_port kcm_port sched_port < <(python3 -c '
import socket
socks = [socket.socket() for _ in range(5)]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(" ".join(str(s.getsockname()[1]) for s in socks))
')
url=https://127.0.0.1:$api_port
echo "$url" >"$state/url"
{
    echo "etcd=$etcd_port"
    echo "etcd-peer=$etcd_peer_port"
    echo "kube-apiserver=$api_port"
    echo "kube-controller-manager=$kcm_port"
    echo "kube-scheduler=$sched_port"
} >"$state/ports"

# ---------------------------------------------------------------- certificates
t=$EPOCHREALTIME
# The first address of the service range: the "kubernetes" Service's cluster IP.
first_service_ip=$(python3 -c 'import ipaddress, sys; print(ipaddress.ip_network(sys.argv[1], strict=False)[1])' "$service_cidr")
[ "$resume" = 1 ] || kube_ca
kube_cert apiserver "/CN=kube-apiserver" server \
    "DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local,IP:127.0.0.1,IP:$first_service_ip"
kube_cert admin "/O=system:masters/CN=multisite-admin" client
kube_cert kubelet-client "/O=system:masters/CN=kube-apiserver-kubelet-client" client
kube_cert controller-manager "/CN=system:kube-controller-manager" client
kube_cert scheduler "/CN=system:kube-scheduler" client
# The aggregation layer's front proxy: a CA of its own (a client certificate from the
# main CA must not be able to assert any user through request headers).
[ "$resume" = 1 ] || kube_ca front-proxy-ca
kube_cert front-proxy-client "/CN=front-proxy-client" client "" front-proxy-ca
if [ "$resume" != 1 ]; then
    openssl ecparam -name prime256v1 -genkey -noout -out "$pki/sa.key" 2>/dev/null
    openssl ec -in "$pki/sa.key" -pubout -out "$pki/sa.pub" 2>/dev/null
    chmod 600 "$pki/sa.key"
fi
kube_kubeconfig "$state/kubeconfig" "$url" "$pki/admin.crt" "$pki/admin.key" multisite-admin
kube_kubeconfig "$state/controller-manager.kubeconfig" "$url" "$pki/controller-manager.crt" "$pki/controller-manager.key" system:kube-controller-manager
kube_kubeconfig "$state/scheduler.kubeconfig" "$url" "$pki/scheduler.crt" "$pki/scheduler.key" system:kube-scheduler
node_count=0
for n in $nodes; do
    kube_node_credentials "$state" "$n"
    node_count=$((node_count + 1))
done
if [ "$resume" = 1 ]; then
    say "certificates: $(kube_elapsed "$t") (the kept CA's: API server, admin, controllers, $node_count node credentials; resuming etcd's data)"
else
    say "certificates: $(kube_elapsed "$t") (CA, API server, admin, controllers, $node_count node credentials)"
fi

# ---------------------------------------------------------------- processes
started=()
stop_all() {
    [ ${#started[@]} -eq 0 ] || "$here/down.sh" "$state" >/dev/null 2>&1 || true
}
failed() { # PROGRAM MESSAGE
    echo "kube up: $1 $2; the last lines of $state/$1.log:" >&2
    tail -n 25 "$state/$1.log" >&2 || true
    stop_all
    exit 1
}
start() { # PROGRAM ARGS...: runs it in a session of its own, detached from this shell
    local name=$1
    shift
    setsid "$bin/$name" "$@" </dev/null >"$state/$name.log" 2>&1 &
    echo $! >"$state/$name.pid"
    started+=("$name")
}
# wait_for PROGRAM DESCRIPTION COMMAND...: until COMMAND succeeds, the program dies or
# the timeout passes.
wait_for() {
    local name=$1 what=$2 deadline
    shift 2
    deadline=$((SECONDS + timeout))
    until "$@" >/dev/null 2>&1; do
        kill -0 "$(cat "$state/$name.pid")" 2>/dev/null || failed "$name" "exited before $what"
        [ $SECONDS -lt $deadline ] || failed "$name" "was not $what within ${timeout}s"
        sleep 0.2
    done
}
admin_curl() {
    curl -sf --max-time 5 --cacert "$pki/ca.crt" --cert "$pki/admin.crt" --key "$pki/admin.key" "$url$1"
}

t=$EPOCHREALTIME
# Test data only: fsync is skipped (the data is thrown away with the state).
start etcd --name=multisite --data-dir="$state/etcd" \
    --listen-client-urls="http://127.0.0.1:$etcd_port" --advertise-client-urls="http://127.0.0.1:$etcd_port" \
    --listen-peer-urls="http://127.0.0.1:$etcd_peer_port" --initial-advertise-peer-urls="http://127.0.0.1:$etcd_peer_port" \
    --initial-cluster="multisite=http://127.0.0.1:$etcd_peer_port" --initial-cluster-state=new \
    --unsafe-no-fsync --log-level=warn
wait_for etcd "healthy" curl -sf --max-time 2 "http://127.0.0.1:$etcd_port/health"
say "etcd: $(kube_elapsed "$t") (http://127.0.0.1:$etcd_port)"

t=$EPOCHREALTIME
# The endpoint reconciler would publish 127.0.0.1 as the "kubernetes" Service's
# endpoint, which Endpoints validation refuses (loopback): it is turned off, so the
# Service exists without endpoints (nothing here is routed to service IPs anyway).
start kube-apiserver \
    --bind-address=127.0.0.1 --advertise-address=127.0.0.1 --secure-port="$api_port" \
    --etcd-servers="http://127.0.0.1:$etcd_port" \
    --tls-cert-file="$pki/apiserver.crt" --tls-private-key-file="$pki/apiserver.key" \
    --client-ca-file="$pki/ca.crt" \
    --authorization-mode=Node,RBAC \
    --enable-admission-plugins=NodeRestriction \
    --service-account-issuer=https://kubernetes.default.svc.cluster.local \
    --service-account-signing-key-file="$pki/sa.key" --service-account-key-file="$pki/sa.pub" \
    --service-cluster-ip-range="$service_cidr" \
    --kubelet-client-certificate="$pki/kubelet-client.crt" --kubelet-client-key="$pki/kubelet-client.key" \
    --kubelet-certificate-authority="$pki/ca.crt" \
    --kubelet-preferred-address-types=InternalIP \
    --requestheader-client-ca-file="$pki/front-proxy-ca.crt" --requestheader-allowed-names=front-proxy-client \
    --requestheader-username-headers=X-Remote-User --requestheader-group-headers=X-Remote-Group \
    --requestheader-uid-headers=X-Remote-Uid --requestheader-extra-headers-prefix=X-Remote-Extra- \
    --proxy-client-cert-file="$pki/front-proxy-client.crt" --proxy-client-key-file="$pki/front-proxy-client.key" \
    --allow-privileged=true \
    --endpoint-reconciler-type=none \
    --cert-dir="$state/kube-apiserver"
wait_for kube-apiserver "ready" admin_curl /readyz
say "kube-apiserver: $(kube_elapsed "$t") ($url)"

t=$EPOCHREALTIME
start kube-controller-manager \
    --kubeconfig="$state/controller-manager.kubeconfig" \
    --authentication-kubeconfig="$state/controller-manager.kubeconfig" \
    --authorization-kubeconfig="$state/controller-manager.kubeconfig" \
    --bind-address=127.0.0.1 --secure-port="$kcm_port" --cert-dir="$state/kube-controller-manager" \
    --leader-elect=false \
    --use-service-account-credentials=true \
    --service-account-private-key-file="$pki/sa.key" \
    --root-ca-file="$pki/ca.crt" \
    --cluster-signing-cert-file="$pki/ca.crt" --cluster-signing-key-file="$pki/ca.key" \
    --service-cluster-ip-range="$service_cidr"
start kube-scheduler \
    --kubeconfig="$state/scheduler.kubeconfig" \
    --authentication-kubeconfig="$state/scheduler.kubeconfig" \
    --authorization-kubeconfig="$state/scheduler.kubeconfig" \
    --bind-address=127.0.0.1 --secure-port="$sched_port" --cert-dir="$state/kube-scheduler" \
    --leader-elect=false
wait_for kube-controller-manager "healthy" curl -sfk --max-time 2 "https://127.0.0.1:$kcm_port/healthz"
wait_for kube-scheduler "healthy" curl -sfk --max-time 2 "https://127.0.0.1:$sched_port/healthz"
# The ServiceAccount controller's first work: without the "default" ServiceAccount no
# pod can be created in a namespace.
wait_for kube-controller-manager "making the default ServiceAccount" admin_curl /api/v1/namespaces/default/serviceaccounts/default
say "kube-controller-manager, kube-scheduler: $(kube_elapsed "$t") (ports $kcm_port, $sched_port)"

server_version=$(admin_curl /version | python3 -c 'import json, sys; print(json.load(sys.stdin)["gitVersion"])')
{
    cat "$build/versions"
    echo "server $server_version"
} >"$state/versions"
say "Kubernetes $server_version ($(grep '^etcd ' "$build/versions")) ready at $url in $(kube_elapsed "$t0")"
say "kubectl --kubeconfig $state/kubeconfig get nodes; stop with e2e/kube/down.sh $state"

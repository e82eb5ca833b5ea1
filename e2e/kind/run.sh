#!/usr/bin/env bash
# Runs the end-to-end scenarios (tests/e2e.rs) on a kind cluster, with the operator
# installed by the Helm chart from the image built by the repository's Dockerfile.
#
#   e2e/kind/run.sh                 every scenario
#   e2e/kind/run.sh NAME...         only the scenarios whose test name contains NAME
#   KEEP_CLUSTER=1 e2e/kind/run.sh  keep the cluster afterwards (reused by the next run)
#
# Needs docker (with a running daemon), kind, kubectl, helm and cargo. Steps:
#   1. create the kind cluster $KIND_CLUSTER from e2e/kind/cluster.yaml (three nodes
#      in zones zone-a, zone-b, zone-c), or reuse it when it already exists;
#   2. build the image multisite:e2e and load it into the cluster's nodes;
#   3. apply the chart's CRDs, install the chart charts/multisite-operator with that
#      image (pull policy Never) and wait for the operator Deployment to be available;
#   4. run `cargo test --release --test e2e` against the cluster; the scenarios use
#      the chart's operator (MULTISITE_E2E_EXTERNAL_OPERATOR=1) instead of starting
#      their own, and reach replica pods through `kubectl port-forward`.
# On exit: when anything failed after the chart install began, the operator's logs
# and the state of the pods are printed; the cluster is deleted unless KEEP_CLUSTER=1
# (also when it was reused). The caller's kubeconfig is never changed: the cluster's
# kubeconfig is written to a temporary file.
#
# Environment:
#   KIND_CLUSTER   name of the kind cluster (default: multisite-e2e)
#   KEEP_CLUSTER   1 keeps the cluster after the run (default: it is deleted)
#
# Written for bash 3.2 and newer (macOS included).

set -euo pipefail

script_dir="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo_root="$(cd "$script_dir/../.." && pwd)"

cluster="${KIND_CLUSTER:-multisite-e2e}"
keep_cluster="${KEEP_CLUSTER:-0}"

image="multisite:e2e"
release="multisite"
namespace="multisite-system"
chart="$repo_root/charts/multisite-operator"
# The chart names its objects "<release>-multisite-operator" (templates/_helpers.tpl).
deployment="$release-multisite-operator"
operator_selector="app.kubernetes.io/name=multisite-operator,app.kubernetes.io/instance=$release"
zones="zone-a zone-b zone-c"
# Namespaces whose pods are not the scenarios' (left out of the failure report).
system_namespaces=" kube-system kube-public kube-node-lease local-path-storage $namespace "

# What the exit handler has to clean up or report.
work_dir=""
kubeconfig=""
delete_cluster_on_exit=0
chart_install_started=0

log() {
    printf '\n==> %s\n' "$*"
}

die() {
    printf 'e2e/kind/run.sh: %s\n' "$*" >&2
    exit 1
}

install_hint() {
    case "$1" in
        docker) echo "https://docs.docker.com/engine/install/" ;;
        kind) echo "https://kind.sigs.k8s.io/docs/user/quick-start/#installation" ;;
        kubectl) echo "https://kubernetes.io/docs/tasks/tools/" ;;
        helm) echo "https://helm.sh/docs/intro/install/" ;;
        cargo) echo "https://rustup.rs (the scenarios are Rust tests)" ;;
    esac
}

check_tools() {
    local tool missing=""
    for tool in docker kind kubectl helm cargo; do
        if ! command -v "$tool" >/dev/null 2>&1; then
            printf 'e2e/kind/run.sh: %s is not installed or not on PATH; install it: %s\n' \
                "$tool" "$(install_hint "$tool")" >&2
            missing="$missing $tool"
        fi
    done
    if [[ -n $missing ]]; then
        die "missing tool(s):$missing"
    fi
    if ! docker info >/dev/null 2>&1; then
        die "docker is installed but its daemon does not answer ('docker info' failed): start Docker, or give this user access to it"
    fi
}

# Logs of the operator pods (current and previous containers), every pod of the
# cluster, the scenarios' pods' logs and recent warning events. Best effort.
print_failure_report() {
    local pod previous line pod_namespace pod_name
    log "operator pods (namespace $namespace)"
    kubectl -n "$namespace" get pods -l "$operator_selector" -o wide
    for pod in $(kubectl -n "$namespace" get pods -l "$operator_selector" -o name 2>/dev/null); do
        log "operator logs: $pod"
        kubectl -n "$namespace" logs "$pod" --all-containers --timestamps --tail=3000
        if previous="$(kubectl -n "$namespace" logs "$pod" --all-containers --timestamps --tail=3000 --previous 2>/dev/null)"; then
            log "operator logs: $pod, previous container (before its last restart)"
            printf '%s\n' "$previous"
        fi
    done
    log "pods in all namespaces"
    kubectl get pods --all-namespaces -o wide
    while read -r line; do
        [[ -n $line ]] || continue
        pod_namespace="${line%% *}"
        pod_name="${line##* }"
        case "$system_namespaces" in
            *" $pod_namespace "*) continue ;;
        esac
        log "logs of $pod_namespace/$pod_name (last 200 lines per container)"
        kubectl -n "$pod_namespace" logs "$pod_name" --all-containers --timestamps --tail=200
    done <<<"$(kubectl get pods --all-namespaces --no-headers \
        -o custom-columns=NAMESPACE:.metadata.namespace,NAME:.metadata.name 2>/dev/null)"
    log "warning events (most recent last)"
    kubectl get events --all-namespaces --field-selector type=Warning --sort-by=.lastTimestamp | tail -n 60
}

on_exit() {
    local status=$?
    set +e
    if [[ $status -ne 0 && $chart_install_started -eq 1 ]]; then
        print_failure_report
    fi
    if [[ $delete_cluster_on_exit -eq 1 ]]; then
        if [[ $keep_cluster == 1 ]]; then
            log "keeping kind cluster $cluster (KEEP_CLUSTER=1). kubectl access: kind export kubeconfig --name $cluster; remove it: kind delete cluster --name $cluster"
        else
            log "deleting kind cluster $cluster (KEEP_CLUSTER=1 keeps it)"
            kind delete cluster --name "$cluster" --kubeconfig "$kubeconfig"
        fi
    fi
    if [[ -n $work_dir ]]; then
        rm -rf "$work_dir"
    fi
    if [[ $status -eq 0 ]]; then
        log "the e2e scenarios passed on kind cluster $cluster"
    else
        log "FAILED (exit status $status)"
    fi
    exit "$status"
}

trap on_exit EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

log "checking tools"
check_tools

work_dir="$(mktemp -d "${TMPDIR:-/tmp}/multisite-e2e-kind.XXXXXX")"
kubeconfig="$work_dir/kubeconfig"
cd "$repo_root"

# 1. The cluster.
existing_clusters="$(kind get clusters 2>/dev/null || true)"
if grep -qx -- "$cluster" <<<"$existing_clusters"; then
    log "reusing kind cluster $cluster"
else
    log "creating kind cluster $cluster: a control plane and two workers in zones $zones"
    delete_cluster_on_exit=1
    kind create cluster --name "$cluster" --config "$script_dir/cluster.yaml" \
        --kubeconfig "$kubeconfig" --wait 3m
fi
kind get kubeconfig --name "$cluster" >"$kubeconfig"
export KUBECONFIG="$kubeconfig"
kubectl wait --for=condition=Ready nodes --all --timeout=180s

node_zones="$(kubectl get nodes -o jsonpath='{range .items[*]}{.metadata.labels.topology\.kubernetes\.io/zone}{"\n"}{end}')"
for zone in $zones; do
    if ! grep -qx -- "$zone" <<<"$node_zones"; then
        die "no node of kind cluster $cluster is in zone $zone (label topology.kubernetes.io/zone), so Sites in that zone cannot place replicas. The cluster was not created from e2e/kind/cluster.yaml (or kind is too old for node labels): delete it with 'kind delete cluster --name $cluster', or choose another KIND_CLUSTER"
    fi
done
# From here on the cluster is fit for the scenarios; a reused one is deleted at the
# end too, unless KEEP_CLUSTER=1.
delete_cluster_on_exit=1

# kind taints the control-plane node when there are workers; zone-a is that node.
for node in $(kubectl get nodes -l node-role.kubernetes.io/control-plane -o jsonpath='{.items[*].metadata.name}'); do
    taint_keys="$(kubectl get node "$node" -o jsonpath='{.spec.taints[*].key}')"
    if [[ " $taint_keys " == *" node-role.kubernetes.io/control-plane "* ]]; then
        log "letting replicas run on control-plane node $node"
        kubectl taint nodes "$node" node-role.kubernetes.io/control-plane:NoSchedule-
    fi
done

# 2. The image.
log "building image $image"
docker build --tag "$image" "$repo_root"
image_id="$(docker image inspect --format '{{.Id}}' "$image")"

log "loading $image into the nodes of $cluster"
if ! kind load docker-image "$image" --name "$cluster"; then
    # With Docker's containerd image store (the default since Docker 29) the import
    # on the nodes can fail with "content digest ... not found". An archive of the
    # image's own platform loads; Docker releases without `save --platform` do not
    # use that store by default, and save the one platform they have anyway.
    log "kind load docker-image failed; loading through an image archive instead"
    platform="$(docker image inspect --format '{{.Os}}/{{.Architecture}}' "$image")"
    if ! docker save --platform "$platform" --output "$work_dir/image.tar" "$image"; then
        docker save --output "$work_dir/image.tar" "$image"
    fi
    kind load image-archive "$work_dir/image.tar" --name "$cluster"
fi

# 3. The CRDs and the operator. Helm installs a chart's CRDs only when they are
# missing, so they are applied first: a reused cluster gets the current ones.
log "applying the CRDs of the chart"
kubectl apply --server-side --force-conflicts -f "$chart/crds/"
kubectl wait --for=condition=Established --timeout=60s \
    crd/replicafamilies.multisite.dev crd/sites.multisite.dev \
    crd/replicas.multisite.dev crd/schemapackages.multisite.dev

log "installing the chart (release $release, namespace $namespace, image $image)"
chart_install_started=1
# The image id as a pod annotation: a rebuilt image under the same tag changes the
# pod template, so a reused cluster's operator is replaced by one running the new
# build.
helm upgrade --install "$release" "$chart" \
    --namespace "$namespace" --create-namespace \
    --set image.repository=multisite \
    --set image.tag=e2e \
    --set image.pullPolicy=Never \
    --set-string "podAnnotations.multisite\.dev/image-id=$image_id" \
    --wait --timeout 5m

log "waiting for the operator Deployment $deployment to be available"
kubectl -n "$namespace" rollout status "deployment/$deployment" --timeout=180s
kubectl -n "$namespace" wait --for=condition=Available "deployment/$deployment" --timeout=180s

# 4. The scenarios, one at a time: they share the cluster and the operator.
log "running the e2e scenarios against kind cluster $cluster"
MULTISITE_E2E_KUBECONFIG="$kubeconfig" MULTISITE_E2E_EXTERNAL_OPERATOR=1 \
    cargo test --release --test e2e -- --test-threads=1 --nocapture "$@"

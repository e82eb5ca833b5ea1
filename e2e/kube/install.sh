#!/usr/bin/env bash
# shellcheck source-path=SCRIPTDIR
# Builds the real Kubernetes control plane (kube-apiserver, kube-controller-manager,
# kube-scheduler from k8s.io/kubernetes, and etcd from go.etcd.io/etcd/server) from
# their published Go modules, at the versions go.mod pins, into a cache directory.
#
#   e2e/kube/install.sh [-q] [CACHE_DIR]
#
# CACHE_DIR defaults to $MULTISITE_KUBE_CACHE, else ~/.cache/multisite-kube. It holds
# the Go module cache (gomod/), Go's build cache (gocache/) and one finished build per
# key (builds/KEY/bin/*, builds/KEY/versions); KEY hashes go.mod, go.sum, etcd/main.go
# and the build recipe, so a run for an unchanged checkout only checks that the
# binaries are there. -q prints nothing in that case.
#
# Exit codes: 0 ready; 1 a failure of ours (go.mod unreadable, a program does not
# compile); 2 the harness cannot be had on this machine (Go missing or too old, the
# Go module proxy unreachable or missing a module), printed as one line starting with
# "kube harness unavailable: ".
set -euo pipefail

quiet=0
if [ "${1:-}" = "-q" ]; then
    quiet=1
    shift
fi
if [ $# -gt 1 ]; then
    echo "usage: $0 [-q] [CACHE_DIR]" >&2
    exit 1
fi

# shellcheck source=lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
here=$kube_here

say() { printf 'kube install: %s\n' "$*"; }
unavailable() {
    echo "kube harness unavailable: $*" >&2
    exit 2
}
fail() {
    echo "kube install: $*" >&2
    exit 1
}

t0=$EPOCHREALTIME
cache=$(kube_cache_dir "${1:-}") || fail "cannot create the cache directory ${1:-}"
key=$(kube_build_key)
build=$cache/builds/$key

if kube_build_complete "$build"; then
    [ "$quiet" = 1 ] || say "up to date: $build/bin ($(tr '\n' ' ' <"$build/versions"| sed 's/ $//'))"
    exit 0
fi

# ---------------------------------------------------------------- Go itself
command -v go >/dev/null || unavailable "go is not installed (Go $(awk '$1 == "go" { print $2; exit }' "$here/go.mod") or newer is needed)"
# Never fetch another toolchain: the installed one builds, or the harness is unavailable.
export GOTOOLCHAIN=local
export CGO_ENABLED=0
export GOMODCACHE=$cache/gomod
export GOCACHE=$cache/gocache
# -modcacherw: the module cache can be deleted with rm -rf like the rest of the cache.
export GOFLAGS="-mod=readonly -modcacherw -buildvcs=false"
export GOWORK=off
unset GOOS GOARCH

need_go=$(awk '$1 == "go" { print $2; exit }' "$here/go.mod")
have_go=$(go env GOVERSION 2>/dev/null) || unavailable "the installed go does not run ($(command -v go))"
have_go=${have_go#go}
have_go=${have_go%% *}
if [ "$(printf '%s\n%s\n' "$need_go" "$have_go" | sort -V | head -n1)" != "$need_go" ]; then
    unavailable "Go $need_go or newer is needed to build Kubernetes at this version; go$have_go is installed"
fi

cd "$here"
go mod edit -json >/dev/null 2>"$cache/gomod-check.log" || fail "go.mod does not parse: $(head -n1 "$cache/gomod-check.log")"

# One install at a time per cache; a second one waits and then finds the build done.
if command -v flock >/dev/null; then
    exec 9>"$cache/.lock"
    if ! flock -n 9; then
        say "another install holds $cache/.lock; waiting for it"
        flock 9
        if kube_build_complete "$build"; then
            [ "$quiet" = 1 ] || say "up to date: $build/bin (built by the other install)"
            exit 0
        fi
    fi
fi

# Times measured on a 2-core machine for a cold build (empty cache); scaled by the
# number of cores for the estimate.
cold_download=10 cold_etcd=80 cold_apiserver=370 cold_kcm=120 cold_scheduler=15
cores=$(nproc 2>/dev/null || echo 2)
estimate() { echo $(($1 * 2 / cores)); }
if ! compgen -G "$cache/builds/*/versions" >/dev/null; then
    total=$((cold_download + cold_etcd + cold_apiserver + cold_kcm + cold_scheduler))
    say "cold build into $cache: expect about $(($(estimate "$total") / 60 + 1)) min on $cores cores" \
        "(download ~$(estimate $cold_download)s, etcd ~$(estimate $cold_etcd)s, kube-apiserver ~$(estimate $cold_apiserver)s," \
        "kube-controller-manager ~$(estimate $cold_kcm)s, kube-scheduler ~$(estimate $cold_scheduler)s); later runs take seconds"
else
    say "building $key (go.mod, go.sum, etcd/main.go or the recipe changed; the Go cache of the earlier build is reused)"
fi
say "Go $have_go, GOPROXY=$(go env GOPROXY), cache $cache"

# ---------------------------------------------------------------- download
t=$EPOCHREALTIME
log=$cache/download.log
if ! go mod download >"$log" 2>&1; then
    reason=$(grep -m1 -E 'dial tcp|no such host|timeout|refused|reset|[45][0-9][0-9] |unrecognized|not found|TLS|x509|verifying' "$log" || head -n1 "$log")
    unavailable "the Go module proxy ($(go env GOPROXY)) could not serve the modules: ${reason:0:300} (see $log)"
fi
say "download: $(kube_elapsed "$t") (module cache $(du -sh "$GOMODCACHE" 2>/dev/null | cut -f1))"

k8s_version=$(go list -m -f '{{.Version}}' k8s.io/kubernetes) || fail "go list -m k8s.io/kubernetes failed"
etcd_version=$(go list -m -f '{{.Version}}' go.etcd.io/etcd/server/v3) || fail "go list -m go.etcd.io/etcd/server/v3 failed"
major=${k8s_version#v}
minor=${major#*.}
minor=${minor%%.*}
major=${major%%.*}

# ---------------------------------------------------------------- build
tmp=$cache/builds/$key.tmp
rm -rf "$tmp"
mkdir -p "$tmp/bin"

# What Kubernetes' own release build stamps into its binaries (hack/lib/version.sh):
# the version that /version and --version report, and the tags of a non-debug build.
stamp=""
for var in "gitVersion=$k8s_version" "gitMajor=$major" "gitMinor=$minor" "gitTreeState=clean" \
    "buildDate=$(date -u +%Y-%m-%dT%H:%M:%SZ)"; do
    stamp+=" -X k8s.io/component-base/version.$var -X k8s.io/client-go/pkg/version.$var"
done
tags=selinux,notest,grpcnotrace

build_one() { # NAME PACKAGE [LDFLAGS]
    local t=$EPOCHREALTIME log=$cache/build-$1.log
    if ! go build -trimpath -tags "$tags" -ldflags "-s -w ${3:-}" -o "$tmp/bin/$1" "$2" >"$log" 2>&1; then
        cat "$log" >&2
        rm -rf "$tmp"
        fail "$1 does not build (go build $2; log in $log)"
    fi
    say "$1: $(kube_elapsed "$t")"
}

build_one etcd ./etcd "-X go.etcd.io/etcd/api/v3/version.GitSHA=$etcd_version"
build_one kube-apiserver k8s.io/kubernetes/cmd/kube-apiserver "$stamp"
build_one kube-controller-manager k8s.io/kubernetes/cmd/kube-controller-manager "$stamp"
build_one kube-scheduler k8s.io/kubernetes/cmd/kube-scheduler "$stamp"

{
    echo "kubernetes $k8s_version"
    echo "etcd $etcd_version"
    echo "go $have_go"
} >"$tmp/versions"
rm -rf "$build"
mv "$tmp" "$build"

# Earlier builds of other keys are of no further use to this checkout.
for old in "$cache"/builds/*; do
    [ "$old" = "$build" ] || rm -rf "$old"
done

say "built Kubernetes $k8s_version and etcd $etcd_version into $build/bin in $(kube_elapsed "$t0")" \
    "(cache $(du -sh "$cache" 2>/dev/null | cut -f1))"

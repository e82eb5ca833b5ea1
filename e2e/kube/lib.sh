# shellcheck shell=bash
# Shared by install.sh, up.sh and node-credentials.sh (sourced, not run).
#
# Where the cache is and which build in it belongs to this checkout. A build is keyed
# by the module files (go.mod, go.sum, etcd/main.go) and by the build recipe below, so
# a change to any of them makes a new build and an unchanged checkout finds its
# binaries without running Go at all.

# Bump when the way install.sh builds changes (flags, tags, the list of programs).
kube_recipe=1

kube_here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

# kube_cache_dir [DIR]: the cache directory, created, as an absolute path.
kube_cache_dir() {
    local dir=${1:-${MULTISITE_KUBE_CACHE:-$HOME/.cache/multisite-kube}}
    mkdir -p "$dir" && (cd "$dir" && pwd)
}

# kube_build_key: 16 hex digits naming the build of this checkout.
kube_build_key() {
    { echo "recipe $kube_recipe"; cat "$kube_here/go.mod" "$kube_here/go.sum" "$kube_here/etcd/main.go"; } |
        sha256sum | cut -c1-16
}

# The programs a build holds, in the order install.sh builds them.
kube_programs=(etcd kube-apiserver kube-controller-manager kube-scheduler)

# kube_build_complete DIR: DIR holds a finished build (install.sh writes
# DIR/versions last).
kube_build_complete() {
    local p
    [ -f "$1/versions" ] || return 1
    for p in "${kube_programs[@]}"; do
        [ -x "$1/bin/$p" ] || return 1
    done
}

# kube_elapsed START: seconds since START (an $EPOCHREALTIME value), as "12.3s".
kube_elapsed() {
    awk -v a="$1" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.1fs", b - a }'
}

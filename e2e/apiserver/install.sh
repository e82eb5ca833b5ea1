#!/usr/bin/env bash
# Builds the real Kubernetes CRD server (k8s.io/apiextensions-apiserver, the code
# kube-apiserver serves CRDs with) and etcd from Debian sid packages, into a cache
# directory. Nothing is installed system-wide and the machine's apt state is not
# touched: apt runs with a private configuration whose lists, caches and dpkg
# status all live in the cache.
#
#   e2e/apiserver/install.sh [-q] [CACHE_DIR]
#
# CACHE_DIR defaults to $MULTISITE_APISERVER_CACHE, else ~/.cache/multisite-apiserver.
# Results: CACHE_DIR/bin/multisite-apiserver (built from e2e/apiserver/main.go) and
# CACHE_DIR/bin/etcd. -q prints nothing when the cache is already up to date.
#
# Exit codes: 0 ready; 1 our main.go does not build (or another failure of ours);
# 2 the harness cannot be had here (Debian archive unreachable, a package missing,
# the Debian sources do not build), printed as one line starting with
# "apiserver harness unavailable:".
#
# Environment:
#   MULTISITE_APISERVER_CACHE          cache directory (when no argument is given)
#   MULTISITE_APISERVER_MIRROR         Debian mirror URL (default: the one the machine's
#                                      apt sources use, else http://deb.debian.org/debian)
#   MULTISITE_APISERVER_SUITE          Debian suite (default: sid)
#   MULTISITE_APISERVER_RECHECK_HOURS  how long a build is used without asking the archive
#                                      whether its packages moved (default 24; 0: always)
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

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
cache=${1:-${MULTISITE_APISERVER_CACHE:-$HOME/.cache/multisite-apiserver}}
mkdir -p "$cache"
cache=$(cd "$cache" && pwd)
suite=${MULTISITE_APISERVER_SUITE:-sid}
recheck_hours=${MULTISITE_APISERVER_RECHECK_HOURS:-24}
server_pkg=golang-k8s-apiextensions-apiserver-dev
main_import=multisite.dev/apiserver

t0=$EPOCHREALTIME
# With -q, messages are held back until there is work to do (then they all show).
held=()
say() {
    if [ "$quiet" = 1 ]; then
        held+=("$*")
    else
        printf 'apiserver install: %s\n' "$*"
    fi
}
working() {
    if [ "$quiet" = 1 ]; then
        quiet=0
        [ ${#held[@]} -eq 0 ] || printf 'apiserver install: %s\n' "${held[@]}"
    fi
}
loud() { printf 'apiserver install: %s\n' "$*" >&2; }
elapsed() { awk -v a="$1" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.1fs", b - a }'; }
unavailable() {
    [ -z "${main_hash:-}" ] || use_cached_build "$*"
    echo "apiserver harness unavailable: $*" >&2
    exit 2
}
use_cached_build() { # nothing new can be had, but an earlier build of the same main.go is still good
    if built && grep -qx "main $main_hash" "$stamp"; then
        loud "WARNING: $1; using the build of $(date -r "$stamp" '+%Y-%m-%d %H:%M')"
        exit 0
    fi
}

for tool in apt-get apt-cache dpkg dpkg-deb sha256sum awk flock; do
    command -v "$tool" >/dev/null || unavailable "$tool is not installed (a Debian or Ubuntu machine is needed)"
done

# One install at a time per cache.
exec 9>"$cache/.lock"
if ! flock -n 9; then
    loud "another install holds $cache/.lock; waiting"
    flock 9
fi

bin=$cache/bin
stamp=$cache/stamp
mkdir -p "$bin"

built() { [ -x "$bin/multisite-apiserver" ] && [ -x "$bin/etcd" ] && [ -f "$stamp" ]; }
main_hash=$(cat "$here/main.go" "$here/install.sh" | sha256sum | cut -c1-16)

# Fast path: a build from the same main.go whose package versions were checked
# against the archive recently enough is used without any network access.
if built && [ "$recheck_hours" != 0 ] && grep -qx "main $main_hash" "$stamp"; then
    age=$(($(date +%s) - $(stat -c %Y "$stamp")))
    if [ "$age" -lt $((recheck_hours * 3600)) ]; then
        say "up to date ($bin/multisite-apiserver, packages checked $((age / 60)) min ago)"
        exit 0
    fi
fi

# ---------------------------------------------------------------- private apt
mirror=${MULTISITE_APISERVER_MIRROR:-}
if [ -z "$mirror" ]; then
    # The mirror the machine already uses for Debian itself (not -security).
    mirror=$( (grep -h '^URIs:' /etc/apt/sources.list.d/*.sources 2>/dev/null | awk '{ for (i = 2; i <= NF; i++) print $i }'
        grep -hE '^deb ' /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null |
            sed -E 's/\[[^]]*\]//' | awk '{ print $2 }') | grep -E '^https?://[^ ]*/debian/?$' | head -n1 || true)
    mirror=${mirror:-http://deb.debian.org/debian}
fi
mirror=${mirror%/}

apt_dir=$cache/apt
mkdir -p "$apt_dir"/etc/apt.conf.d "$apt_dir"/etc/sources.list.d "$apt_dir"/etc/preferences.d \
    "$apt_dir"/etc/trusted.gpg.d "$apt_dir"/state/lists/partial "$apt_dir"/cache/archives/partial "$apt_dir"/log
: >"$apt_dir/state/status"
arch=$(dpkg --print-architecture)
keyring=/usr/share/keyrings/debian-archive-keyring.gpg

write_apt_conf() { # $1: sources.list options ("signed-by=..." or "trusted=yes")
    echo "deb [$1] $mirror $suite main" >"$apt_dir/etc/sources.list"
    {
        echo "Dir::Etc \"$apt_dir/etc\";"
        echo "Dir::Etc::SourceList \"$apt_dir/etc/sources.list\";"
        echo "Dir::Etc::SourceParts \"$apt_dir/etc/sources.list.d\";"
        echo "Dir::Etc::Parts \"$apt_dir/etc/apt.conf.d\";"
        echo "Dir::Etc::Preferences \"$apt_dir/etc/preferences\";"
        echo "Dir::Etc::PreferencesParts \"$apt_dir/etc/preferences.d\";"
        echo "Dir::Etc::Trusted \"$apt_dir/etc/trusted.gpg\";"
        echo "Dir::Etc::TrustedParts \"$apt_dir/etc/trusted.gpg.d\";"
        echo "Dir::State \"$apt_dir/state\";"
        echo "Dir::State::Lists \"$apt_dir/state/lists\";"
        echo "Dir::State::status \"$apt_dir/state/status\";"
        echo "Dir::Cache \"$apt_dir/cache\";"
        echo "Dir::Log \"$apt_dir/log\";"
        echo "APT::Architecture \"$arch\";"
        echo "APT::Architectures { \"$arch\"; };"
        echo "APT::Sandbox::User \"$(id -un)\";"
        echo "Acquire::Languages \"none\";"
        echo "Acquire::GzipIndexes \"true\";"
        echo "Dir::Cache::srcpkgcache \"\";"
        echo "Acquire::Retries \"2\";"
        echo "Acquire::http::Timeout \"30\";"
        echo "Acquire::https::Timeout \"30\";"
        # Keep the machine's proxy settings and its choice about the Release files'
        # dates (a machine whose archive is a frozen mirror turns the checks off).
        env -u APT_CONFIG apt-config dump 2>/dev/null |
            grep -iE '^Acquire::((https?|ftp)::Proxy|Check-Valid-Until|Check-Date|Max-ValidTime) ' || true
    } >"$apt_dir/apt.conf"
}
export APT_CONFIG=$apt_dir/apt.conf

update_log=$apt_dir/log/update.log
apt_update() {
    apt-get -q -o APT::Update::Error-Mode=any update >"$update_log" 2>&1
}

t=$EPOCHREALTIME
if [ -r "$keyring" ]; then
    write_apt_conf "signed-by=$keyring"
    verified=yes
else
    write_apt_conf "trusted=yes"
    verified="no ($keyring is missing)"
fi
if ! apt_update; then
    if [ -r "$keyring" ] && grep -qE 'NO_PUBKEY|EXPKEYSIG|not signed|signatures (were invalid|couldn.t be verified)' "$update_log"; then
        loud "WARNING: $suite's Release file is not signed by a key in $keyring; using it unverified"
        write_apt_conf "trusted=yes"
        verified="no (signature not verifiable with $keyring)"
        apt_update || true
    fi
    if ! ls "$apt_dir"/state/lists/*_Packages* >/dev/null 2>&1 || grep -qE '^(E|Err):' "$update_log"; then
        reason=$( (grep -E '^E:' "$update_log" || grep -E '^(Err|W):' "$update_log" || true) | head -n1 | cut -c1-240)
        unavailable "the Debian archive ($mirror $suite) cannot be reached: ${reason:-see $update_log}"
    fi
fi
say "package index of $mirror $suite read in $(elapsed "$t") (signature verified: $verified)"

# ---------------------------------------------------------------- what to fetch
version_of() { apt-cache show --no-all-versions "$1" 2>/dev/null | awk '/^Version:/ { print $2; exit }'; }

go_pkg=$(apt-cache depends golang-go 2>/dev/null | awk '$1 == "Depends:" && $2 ~ /^golang-[0-9.]+-go$/ { print $2; exit }')
[ -n "$go_pkg" ] || unavailable "no Go toolchain in $suite (golang-go does not name a golang-1.N-go package)"
go_minor=${go_pkg#golang-}
go_minor=${go_minor%-go}
toolchain=("$go_pkg" "golang-$go_minor-src")
for p in "${toolchain[@]}" etcd-server "$server_pkg"; do
    [ -n "$(version_of "$p")" ] || unavailable "package $p is not in $suite"
done
goroot_rel=usr/lib/go-$go_minor

work=$cache/work
mkdir -p "$work" "$cache/debs"

# versions of a list of packages, one "name=version" a line, sorted
versions() { apt-cache show --no-all-versions "$@" 2>/dev/null | awk '/^Package:/ { p = $2 } /^Version:/ { print p "=" $2 }' | sort -u; }

if built && [ -f "$cache/closure.txt" ] && grep -qx "main $main_hash" "$stamp"; then
    # Same main.go: the build is current when every package it was made from is still
    # at the same version in the archive.
    mapfile -t names < <(sed 's/=.*//' "$cache/closure.txt")
    if [ "$(versions "${names[@]}")" = "$(cat "$cache/closure.txt")" ] && grep -q "^toolchain $go_pkg\$" "$stamp"; then
        touch "$stamp"
        say "up to date: the ${#names[@]} packages of the last build are unchanged in $suite ($(elapsed "$t0"))"
        exit 0
    fi
    working
    say "packages moved in $suite since the last build; resolving again"
fi
working

# The dependency graph Debian declares for the server's sources: one "package dep" a
# line, -dev packages only, virtual packages replaced by their providers.
apt-cache depends --recurse --no-recommends --no-suggests --no-conflicts --no-breaks \
    --no-replaces --no-enhances "$server_pkg" 2>/dev/null | awk '
    /^[^ ]/ { pkg = $1; sub(/^</, "", pkg); sub(/>$/, "", pkg); virt = ""; next }
    /^ [ |]Depends:/ {
        dep = $2
        if (dep ~ /^</) { virt = 1; next }
        virt = ""
        if (dep ~ /-dev$/ && dep !~ /^lib/) print pkg, dep
        next
    }
    /^    / { if (virt && $1 ~ /-dev$/ && $1 !~ /^lib/) print pkg, $1; next }
    { virt = "" }' | sort -u >"$work/graph.txt"
# The main package stands for a package depending on the server sources.
root_deps=$(awk -v s="$server_pkg" '$1 == s { print "ROOT", $2 }' "$work/graph.txt")
printf 'ROOT %s\n%s\n' "$server_pkg" "$root_deps" >>"$work/graph.txt"

# ---------------------------------------------------------------- fetch, unpack
debs=$cache/debs
root_new=$cache/root.new
rm -rf "$root_new"
mkdir -p "$root_new"
: >"$work/fetched.txt"
rm -rf "$work/owners.d"
mkdir -p "$work/owners.d"
fetched_bytes=0
download_time=0
unpack_time=0

# "package version architecture" of every package that may be needed, in one look-up
{ cut -d' ' -f2 "$work/graph.txt"; printf '%s\n' "${toolchain[@]}" etcd-server "$server_pkg"; } | sort -u |
    xargs apt-cache show --no-all-versions 2>/dev/null | awk '
    /^Package:/ { p = $2 } /^Version:/ { v = $2 } /^Architecture:/ { a = $2 }
    /^$/ { if (p != "") print p, v, a; p = "" }
    END { if (p != "") print p, v, a }' | sort -u >"$work/info.txt"

deb_file() { # the file apt-get download writes for package $1
    awk -v p="$1" '$1 == p { v = $2; gsub(/:/, "%3a", v); print p "_" v "_" $3 ".deb"; exit }' "$work/info.txt"
}

unpack_one() { # $1 package, $2 .deb: unpack and record the Go import paths it ships
    dpkg-deb -x "$2" "$root_new" || return 1
    # Directories holding .go files, and symbolic links (Debian links alternative
    # import paths to the real ones).
    dpkg-deb -c "$2" | awk -v pkg="$1" '
        { path = $6; sub(/^\.\//, "", path) }
        path !~ /^usr\/share\/gocode\/src\// { next }
        { sub(/^usr\/share\/gocode\/src\//, "", path) }
        /^l/ { print path, pkg; next }
        path ~ /\.go$/ { sub(/\/[^\/]*$/, "", path); print path, pkg }' | sort -u >"$work/owners.d/$1"
}
export -f unpack_one
export root_new work

fetch() { # download (when not cached) and unpack the packages named
    local want=() p f t
    for p in "$@"; do
        f=$(deb_file "$p")
        [ -n "$f" ] || unavailable "package $p is not in $suite"
        [ -f "$debs/$f" ] || want+=("$p")
    done
    t=$EPOCHREALTIME
    if [ ${#want[@]} -gt 0 ]; then
        if ! (cd "$debs" && apt-get -q download "${want[@]}" >"$apt_dir/log/download.log" 2>&1); then
            reason=$( (grep -E '^E:' "$apt_dir/log/download.log" || true) | head -n1 | cut -c1-240)
            unavailable "downloading ${want[*]} from $mirror failed: ${reason:-see $apt_dir/log/download.log}"
        fi
    fi
    download_time=$(awk -v d="$download_time" -v a="$t" -v b="$EPOCHREALTIME" 'BEGIN { print d + b - a }')
    t=$EPOCHREALTIME
    for p in "$@"; do
        fetched_bytes=$((fetched_bytes + $(stat -c %s "$debs/$(deb_file "$p")")))
        echo "$p" >>"$work/fetched.txt"
    done
    for p in "$@"; do
        printf '%s\0%s\0' "$p" "$debs/$(deb_file "$p")"
    done | xargs -0 -n 2 -P "$(nproc)" bash -c 'unpack_one "$@"' unpack || unavailable "cannot unpack the packages of $suite (in $debs)"
    cat "$work"/owners.d/* | sort -u >"$work/owners.txt"
    unpack_time=$(awk -v d="$unpack_time" -v a="$t" -v b="$EPOCHREALTIME" 'BEGIN { print d + b - a }')
}

gopath_main=$cache/gopath/src/$main_import
mkdir -p "$gopath_main"
cp "$here/main.go" "$gopath_main/main.go"

goenv() {
    env GOROOT="$1/$goroot_rel" GOPATH="$cache/gopath:$1/usr/share/gocode" \
        GO111MODULE=off GOTOOLCHAIN=local GOPROXY=off GOFLAGS= GOWORK=off GOENV=off \
        GOTELEMETRY=off CGO_ENABLED=0 GOCACHE="$cache/gocache" XDG_CONFIG_HOME="$cache/go-config" \
        "$1/$goroot_rel/bin/go" "${@:2}"
}

t=$EPOCHREALTIME
say "fetching the toolchain (${toolchain[*]}), etcd-server and $server_pkg"
fetch "${toolchain[@]}" etcd-server "$server_pkg"

# The closure: list the imports of our main package and everything it reaches; for
# each import no unpacked package provides, the Debian package that holds the
# importing code names the candidates in its Depends (the best name match is taken,
# the others only if that was not it). Repeat until nothing is missing.
round=0
while :; do
    round=$((round + 1))
    goenv "$root_new" list -e -deps -f '{{.ImportPath}} {{if .Error}}ERR{{else}}ok{{end}} {{join .Imports " "}}' \
        "$main_import" >"$work/golist.txt" 2>"$work/golist.err" || true
    awk '$2 == "ERR" { missing[$1] = 1 }
         { for (i = 3; i <= NF; i++) imp[$1] = imp[$1] " " $i }
         END { for (p in imp) { n = split(imp[p], a, " "); for (i = 1; i <= n; i++) if (a[i] in missing) print p, a[i] } }' \
        "$work/golist.txt" | sort -u >"$work/missing.txt"
    [ -s "$work/missing.txt" ] || break
    [ "$round" -le 40 ] || unavailable "the package closure does not converge (see $work/missing.txt)"
    picks=$(awk -v main="$main_import" '
        FILENAME == ARGV[1] { owner[$1] = $2; next }
        FILENAME == ARGV[2] { deps[$1] = deps[$1] " " $2; next }
        FILENAME == ARGV[3] { have[$1] = 1; next }
        function tokens(s, t,   n, a, i, k) {
            delete t; k = 0
            n = split(tolower(s), a, /[\/.\-_]/)
            for (i = 1; i <= n; i++) if (a[i] !~ /^(com|org|io|in|net|dev|golang|www|go|v[0-9]+)$/ && a[i] != "") { t[a[i]] = 1; k++ }
            return k
        }
        function reach(o, seen,   n, a, i) { # all packages reachable from o
            n = split(deps[o], a, " ")
            for (i = 1; i <= n; i++) if (!(a[i] in seen)) { seen[a[i]] = 1; reach(a[i], seen) }
        }
        {
            importer = $1; path = $2
            o = (importer == main) ? "ROOT" : owner[importer]
            if (o == "") {                  # longest recorded prefix of the importer
                q = importer
                while (q ~ /\//) { sub(/\/[^\/]*$/, "", q); if (q in owner) { o = owner[q]; break } }
            }
            if (o == "") o = "ROOT"
            delete cand; nc = 0
            n = split(deps[o], a, " ")
            for (i = 1; i <= n; i++) if (!(a[i] in have)) { cand[a[i]] = 1; nc++ }
            if (nc == 0) {                  # not a direct dependency: anything below it
                delete seen; reach(o, seen)
                for (c in seen) if (!(c in have)) { cand[c] = 1; nc++ }
            }
            if (nc == 0) { print "NONE", path, importer, o; next }
            # Score candidates by the words of the import path their names contain.
            split(path, seg, "/"); head = seg[1] "/" seg[2] "/" seg[3]
            tokens(head, pt)
            best = -1
            for (c in cand) {
                tokens(c, ct); s = 0
                for (w in pt) if (w in ct) s++
                score[c] = s; if (s > best) best = s
            }
            for (c in cand) if (best == 0 || score[c] == best) print "PICK", c
        }' "$work/owners.txt" "$work/graph.txt" "$work/fetched.txt" "$work/missing.txt")
    if grep -q '^NONE' <<<"$picks"; then
        read -r _ path importer o < <(grep '^NONE' <<<"$picks" | head -n1)
        if [ "$importer" = "$main_import" ]; then
            echo "apiserver install: e2e/apiserver/main.go imports $path, which no package reached from $server_pkg provides" >&2
            exit 1
        fi
        unavailable "no Debian package in $suite provides Go package $path (imported by $importer from $o)"
    fi
    mapfile -t next < <(awk '$1 == "PICK" { print $2 }' <<<"$picks" | sort -u)
    say "round $round: $(wc -l <"$work/missing.txt") missing imports; fetching ${#next[@]}: ${next[*]}"
    fetch "${next[@]}"
done
say "closure: $(wc -l <"$work/fetched.txt") packages, $((fetched_bytes / 1048576)) MiB in $round rounds ($(elapsed "$t"): download $(printf '%.1f' "$download_time")s, unpack $(printf '%.1f' "$unpack_time")s)"

rm -rf "$cache/root"
mv "$root_new" "$cache/root"
sort -u "$work/fetched.txt" >"$work/fetched.sorted"
mapfile -t names <"$work/fetched.sorted"
versions "${names[@]}" >"$cache/closure.txt.new"

# ---------------------------------------------------------------- build
server_version=$(awk -v p="$server_pkg" '$1 == p { print $2 }' "$work/info.txt") # 0.36.4-1: Kubernetes 1.36.4
server_version=${server_version#*:}
server_version=${server_version%%-*}
server_version=${server_version%%+*}
kube_minor=$(cut -d. -f2 <<<"$server_version")
kube_patch=$(cut -d. -f3 <<<"$server_version")
git_version=v1.$kube_minor.${kube_patch:-0}-multisite
ldflags="-s -w"
for kv in "gitVersion=$git_version" gitMajor=1 "gitMinor=$kube_minor" gitTreeState=clean \
    "buildDate=$(date -u +%Y-%m-%dT%H:%M:%SZ)" "gitCommit=debian-$suite"; do
    ldflags="$ldflags -X k8s.io/component-base/version.$kv -X k8s.io/client-go/pkg/version.$kv"
done
t=$EPOCHREALTIME
say "building $main_import ($git_version) with $("$cache/root/$goroot_rel/bin/go" version | awk '{ print $3 }'); a cold build takes minutes"
if ! goenv "$cache/root" build -trimpath -ldflags "$ldflags" -o "$bin/multisite-apiserver.new" "$main_import" >"$work/build.log" 2>&1; then
    cat "$work/build.log" >&2
    if grep -qE "(^|/)$main_import/main.go|^# $main_import\$" "$work/build.log"; then
        echo "apiserver install: e2e/apiserver/main.go does not build against the packages of $suite (log: $work/build.log)" >&2
        exit 1
    fi
    unavailable "the Debian sources of $suite do not build (log: $work/build.log)"
fi
mv "$bin/multisite-apiserver.new" "$bin/multisite-apiserver"
cp "$cache/root/usr/bin/etcd" "$bin/etcd.new"
mv "$bin/etcd.new" "$bin/etcd"
# The unpacked tree is not needed any more (0.7 GB): a rebuild unpacks the cached
# .deb files again, at the same path, so Go's build cache still applies.
rm -rf "$cache/root"
say "built in $(elapsed "$t"): $bin/multisite-apiserver, $bin/etcd ($("$bin/etcd" --version | awk 'NR == 1 { print $3 }'))"

# Keep only the packages of this build.
(cd "$debs" && for f in *.deb; do
    p=${f%%_*}
    v=${f#*_}
    v=${v%_*}
    grep -qxF "$p=${v//%3a/:}" "$cache/closure.txt.new" || rm -f "$f"
done)
mv "$cache/closure.txt.new" "$cache/closure.txt"
{
    echo "main $main_hash"
    echo "toolchain $go_pkg"
    echo "version $git_version"
    echo "mirror $mirror $suite"
    cat "$cache/closure.txt"
} >"$stamp"
say "ready in $(elapsed "$t0") (cache: $(du -sh "$cache" | cut -f1) in $cache)"

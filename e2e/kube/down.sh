#!/usr/bin/env bash
# Stops what up.sh started in STATE_DIR: kube-scheduler, kube-controller-manager,
# kube-apiserver, then etcd. Each gets TERM, then KILL once the timeout passes. A pid
# file is acted on only while its process is still that program of that state
# directory (its executable has the program's name and its arguments name STATE_DIR),
# so a stale pid reused by another process is left alone. Nothing running is fine.
#
#   e2e/kube/down.sh STATE_DIR
#
# Environment: MULTISITE_KUBE_STOP_TIMEOUT  seconds before KILL (default 10)
set -euo pipefail

if [ $# -ne 1 ]; then
    echo "usage: $0 STATE_DIR" >&2
    exit 1
fi
[ -d "$1" ] || exit 0
state=$(cd "$1" && pwd)
timeout=${MULTISITE_KUBE_STOP_TIMEOUT:-10}

ours() { # PROGRAM PID: the process is PROGRAM started for this state directory
    local exe
    exe=$(readlink "/proc/$2/exe" 2>/dev/null) || return 1
    [ "${exe##*/}" = "$1" ] || [ "${exe##*/}" = "$1 (deleted)" ] || return 1
    tr '\0' '\n' <"/proc/$2/cmdline" 2>/dev/null | grep -qF "$state/"
}

stop() { # PROGRAM
    local file=$state/$1.pid pid deadline
    [ -f "$file" ] || return 0
    pid=$(cat "$file")
    if [[ "$pid" =~ ^[0-9]+$ ]] && ours "$1" "$pid"; then
        kill -TERM "$pid" 2>/dev/null || true
        deadline=$((SECONDS + timeout))
        while ours "$1" "$pid" && [ $SECONDS -lt $deadline ]; do
            sleep 0.1
        done
        if ours "$1" "$pid"; then
            echo "kube down: $1 (pid $pid) did not stop within ${timeout}s; killing it" >&2
            kill -KILL "$pid" 2>/dev/null || true
            while ours "$1" "$pid"; do sleep 0.1; done
        fi
        echo "kube down: stopped $1 (pid $pid)"
    fi
    rm -f "$file"
}

for p in kube-scheduler kube-controller-manager kube-apiserver etcd; do
    stop "$p"
done

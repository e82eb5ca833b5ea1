#!/usr/bin/env bash
# Stops the API server and etcd that e2e/apiserver/up.sh started in STATE_DIR:
# SIGTERM, then SIGKILL for whatever is still running after the timeout. Removes the
# pid files; keeps the logs and etcd's data. Safe to run when nothing runs.
#
#   e2e/apiserver/down.sh STATE_DIR
#
# Environment: MULTISITE_APISERVER_STOP_TIMEOUT (seconds, default 10).
set -euo pipefail

if [ $# -ne 1 ]; then
    echo "usage: $0 STATE_DIR" >&2
    exit 1
fi
state=$1
timeout=${MULTISITE_APISERVER_STOP_TIMEOUT:-10}

ours() { # pid $1 still runs the program $2 (the pid was not reused by another one)
    [ -r "/proc/$1/cmdline" ] && tr '\0' '\n' <"/proc/$1/cmdline" | head -n1 | grep -q "/$2\$"
}

stop() { # $1 name, $2 program
    local file=$state/$1.pid pid i
    [ -f "$file" ] || return 0
    pid=$(cat "$file")
    if [[ "$pid" =~ ^[0-9]+$ ]] && ours "$pid" "$2"; then
        kill -TERM "$pid" 2>/dev/null || true
        for ((i = 0; i < timeout * 10; i++)); do
            ours "$pid" "$2" || break
            sleep 0.1
        done
        if ours "$pid" "$2"; then
            echo "apiserver down: $1 (pid $pid) did not stop within ${timeout}s; killing it" >&2
            kill -KILL "$pid" 2>/dev/null || true
            for ((i = 0; i < 50; i++)); do
                ours "$pid" "$2" || break
                sleep 0.1
            done
        fi
        echo "apiserver down: stopped $1 (pid $pid)" >&2
    fi
    rm -f "$file"
}

# The server first: it is etcd's client.
stop apiserver multisite-apiserver
stop etcd etcd

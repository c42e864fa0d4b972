#!/usr/bin/env bash
# A Redis Cluster for development: 3 primaries and 3 replicas on loopback (make cluster / make cluster-stop).
#
#   scripts/redis-cluster.sh start   # ports CLUSTER_PORT..CLUSTER_PORT+5 (default 7000), data in CLUSTER_DIR
#   scripts/redis-cluster.sh stop    # shuts the six nodes down and removes their data
#
# Then run the service against it with the line it prints (docs/cluster.md). The tests start a cluster
# of their own on free ports instead (tests/processes.py PrivateCluster, make test-cluster).
set -euo pipefail

base=${CLUSTER_PORT:-7000}
dir=${CLUSTER_DIR:-.redis-cluster}
ports=$(seq "$base" $((base + 5)))

case "${1:-start}" in
start)
    mkdir -p "$dir"
    for port in $ports; do
        if redis-cli -p "$port" ping >/dev/null 2>&1; then
            continue
        fi
        redis-server --port "$port" --bind 127.0.0.1 --daemonize yes --dir "$dir" \
            --pidfile "$PWD/$dir/redis-$port.pid" --logfile "redis-$port.log" \
            --cluster-enabled yes --cluster-config-file "nodes-$port.conf" --cluster-node-timeout 2000 \
            --cluster-require-full-coverage no --appendonly yes --maxmemory-policy noeviction
    done
    for port in $ports; do
        until redis-cli -p "$port" ping >/dev/null 2>&1; do sleep 0.1; done
    done
    if [ "$(redis-cli -p "$base" cluster info | tr -d '\r' | sed -n 's/^cluster_slots_assigned://p')" = "0" ]; then
        # shellcheck disable=SC2046
        redis-cli --cluster create $(for port in $ports; do printf '127.0.0.1:%s ' "$port"; done) \
            --cluster-replicas 1 --cluster-yes >/dev/null
    fi
    for port in $ports; do
        until redis-cli -p "$port" cluster info | tr -d '\r' | grep -q '^cluster_state:ok'; do sleep 0.2; done
    done
    echo "Redis Cluster up (3 primaries, 3 replicas). Run the service with:"
    echo "  REDIS_CLUSTER=true REDIS_URL=redis://127.0.0.1:$base,127.0.0.1:$((base + 1)),127.0.0.1:$((base + 2))"
    ;;
stop)
    for port in $ports; do
        redis-cli -p "$port" shutdown nosave >/dev/null 2>&1 || true
    done
    rm -rf "$dir"
    ;;
*)
    echo "usage: $0 start|stop" >&2
    exit 2
    ;;
esac

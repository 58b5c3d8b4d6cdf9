#!/usr/bin/env bash
# A two-node Slurm cluster on one machine: each "node" is a network namespace (own address,
# own loopback) plus a UTS namespace (own host name), joined by a veth pair. Node 1 also runs
# slurmctld. Rendezvous between ranks on the two nodes really crosses an IP link.
#
#   tests/launch/netns_cluster.sh up   DIR ID   # ID 1..250 picks names and the subnet
#   tests/launch/netns_cluster.sh down DIR ID
#   tests/launch/netns_cluster.sh run  DIR ID CMD...   # run CMD on node 1 with SLURM_CONF set
#
# Node names mt<ID>a / mt<ID>b, addresses 10.250.<ID>.1 / .2 (inside the namespaces only;
# nothing is routed outside). Needs root, iproute2, util-linux unshare, Slurm and munge
# (bash .ci/setup_services.sh). Slurm state, logs and pid files live under DIR.
set -euo pipefail

ACTION=${1:?usage: netns_cluster.sh up|down|run DIR ID}
DIR=${2:?DIR}
ID=${3:?ID}
shift 3
NS_A=mt${ID}a NS_B=mt${ID}b
HOST_A=$NS_A HOST_B=$NS_B
NET=10.250.${ID}
ADDR_A=$NET.1 ADDR_B=$NET.2
CONF=$DIR/slurm.conf

log() { echo "[netns_cluster] $*" >&2; }
# shellcheck source=.ci/slurm_common.sh
source "$(dirname "${BASH_SOURCE[0]}")/../../.ci/slurm_common.sh"

write_config() {
  mkdir -p "$DIR/ctld" "$DIR/spool-$HOST_A" "$DIR/spool-$HOST_B"
  cat >"$CONF" <<CONF
# Two-node test cluster in network namespaces (tests/launch/netns_cluster.sh)
ClusterName=mt${ID}
SlurmctldHost=${HOST_A}(${ADDR_A})
$(slurm_common_settings)
StateSaveLocation=$DIR/ctld
SlurmdSpoolDir=$DIR/spool-%n
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd-%n.pid
SlurmctldLogFile=$DIR/slurmctld.log
SlurmdLogFile=$DIR/slurmd-%n.log
NodeName=${HOST_A} NodeAddr=${ADDR_A} CPUs=4 State=UNKNOWN
NodeName=${HOST_B} NodeAddr=${ADDR_B} CPUs=4 State=UNKNOWN
PartitionName=two Nodes=${HOST_A},${HOST_B} Default=YES MaxTime=INFINITE State=UP
CONF
}

# Each node resolves both names to the namespace addresses (and its own name is not 127.0.1.1).
write_hosts() {
  local ns
  for ns in "$NS_A" "$NS_B"; do
    mkdir -p "/etc/netns/$ns"
    printf '127.0.0.1 localhost\n%s %s\n%s %s\n' "$ADDR_A" "$HOST_A" "$ADDR_B" "$HOST_B" >"/etc/netns/$ns/hosts"
  done
}

make_network() {
  ip netns add "$NS_A"
  ip netns add "$NS_B"
  ip link add eth0 netns "$NS_A" type veth peer name eth0 netns "$NS_B"
  ip -n "$NS_A" addr add "$ADDR_A/24" dev eth0
  ip -n "$NS_B" addr add "$ADDR_B/24" dev eth0
  local ns
  for ns in "$NS_A" "$NS_B"; do
    ip -n "$ns" link set lo up
    ip -n "$ns" link set eth0 up
  done
}

# Run CMD "on" a node: its network namespace, a UTS namespace with the node's host name, and a
# mount namespace where /etc/hosts is the node's. (Not `ip netns exec`: it remounts /sys, which
# hides /sys/fs/cgroup, and slurmd refuses to start without it.)
on_node() {  # on_node NS HOSTNAME CMD...
  local ns=$1 host=$2
  shift 2
  nsenter --net="/run/netns/$ns" unshare --uts --mount --propagation private \
    sh -c 'mount --bind "/etc/netns/$1/hosts" /etc/hosts && hostname "$2" && shift 2 && exec "$@"' \
    on_node "$ns" "$host" "$@"
}

wait_ready() {
  local state=""
  for _ in $(seq 150); do
    state=$(on_node "$NS_A" "$HOST_A" env SLURM_CONF="$CONF" sinfo -h -o '%n %T' 2>/dev/null | sort | tr '\n' ' ' || true)
    if [[ $state == "$HOST_A idle $HOST_B idle " ]]; then
      log "ready: $state"
      return 0
    fi
    sleep 0.2
  done
  log "nodes not ready (sinfo: '${state:-no answer}'); logs in $DIR"
  tail -n 5 "$DIR"/*.log >&2 || true
  return 1
}

up() {
  down 2>/dev/null || true
  mkdir -p "$DIR"
  write_config
  write_hosts
  make_network
  on_node "$NS_A" "$HOST_A" slurmctld -i -f "$CONF"
  on_node "$NS_A" "$HOST_A" slurmd -f "$CONF"
  on_node "$NS_B" "$HOST_B" slurmd -f "$CONF"
  wait_ready
}

stop_pidfile() {
  local f=$1 pid
  [[ -s $f ]] || return 0
  pid=$(cat "$f")
  kill "$pid" 2>/dev/null || true
  for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  kill -9 "$pid" 2>/dev/null || true
  rm -f "$f"
}

down() {
  stop_pidfile "$DIR/slurmd-$HOST_B.pid"
  stop_pidfile "$DIR/slurmd-$HOST_A.pid"
  stop_pidfile "$DIR/slurmctld.pid"
  ip netns del "$NS_A" 2>/dev/null || true
  ip netns del "$NS_B" 2>/dev/null || true
  rm -rf "/etc/netns/$NS_A" "/etc/netns/$NS_B"
}

case $ACTION in
  up) up ;;
  down) down ;;
  run) on_node "$NS_A" "$HOST_A" env SLURM_CONF="$CONF" "$@" ;;
  *) echo "usage: netns_cluster.sh up|down|run DIR ID [CMD...]" >&2; exit 2 ;;
esac

#!/usr/bin/env bash
# Install and start the services megatrain's launch tests run against: munge + Slurm
# (slurmctld, slurmd; Debian's slurm-wlm) as a one-node cluster, and OpenMPI's mpirun.
#
# Idempotent: packages are installed only when a command is missing, the config is
# rewritten only when it changes, and daemons are (re)started only when they are not
# answering or their config changed. Meant for CI and developer machines where we are
# root and no init system runs the daemons (containers, sandboxes).
#
#   bash .ci/setup_services.sh            # install, configure, start; prints a summary
#   MEGATRAIN_SLURM_CPUS=16 bash .ci/...  # CPUs the node advertises (default: max(nproc, 8))
set -euo pipefail

log() { echo "[setup_services] $*"; }
die() { echo "[setup_services] ERROR: $*" >&2; exit 1; }

[[ $(id -u) == 0 ]] || die "must run as root (it installs packages and starts slurmctld/slurmd/munged)"

PACKAGES=(slurmctld slurmd slurm-client munge openmpi-bin libopenmpi3 iproute2 procps util-linux)
COMMANDS=(slurmctld slurmd sbatch srun scontrol sinfo munged munge mpirun ip pgrep unshare nsenter runuser)

install_packages() {
  local missing=()
  for c in "${COMMANDS[@]}"; do command -v "$c" >/dev/null 2>&1 || missing+=("$c"); done
  # mpi4py's wheel dlopens libmpi.so.40 (OpenMPI) at run time, so check the library too.
  # (grep without -q reads all input: an early exit would SIGPIPE ldconfig and fail under pipefail)
  ldconfig -p 2>/dev/null | grep 'libmpi\.so\.40' >/dev/null || missing+=("libmpi.so.40")
  if ((${#missing[@]} == 0)); then log "packages already installed"; return; fi
  log "installing ${PACKAGES[*]} (missing: ${missing[*]})"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${PACKAGES[@]}" >/dev/null
}

munge_ok() { munge -n 2>/dev/null | unmunge >/dev/null 2>&1; }

start_munge() {
  install -d -o munge -g munge -m 0700 /etc/munge /var/lib/munge /var/log/munge
  install -d -o munge -g munge -m 0755 /run/munge
  if [[ ! -s /etc/munge/munge.key ]]; then
    log "creating /etc/munge/munge.key"
    dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
  fi
  chown munge:munge /etc/munge/munge.key && chmod 0400 /etc/munge/munge.key
  if munge_ok; then log "munged already running"; return; fi
  log "starting munged"
  # munged refuses to run as root; Debian's unit runs it as the munge user.
  runuser -u munge -- /usr/sbin/munged --force
  for _ in $(seq 50); do munge_ok && return; sleep 0.1; done
  die "munged did not start; see /var/log/munge/munged.log"
}

SLURM_CONF=/etc/slurm/slurm.conf
# shellcheck source=.ci/slurm_common.sh
source "$(dirname "${BASH_SOURCE[0]}")/slurm_common.sh"
NODE=$(hostname -s)
CPUS=${MEGATRAIN_SLURM_CPUS:-$(( $(nproc) > 8 ? $(nproc) : 8 ))}

write_slurm_conf() {
  # A one-node cluster with the controller and the compute daemon on this host.
  local tmp
  tmp=$(mktemp)
  cat >"$tmp" <<CONF
# Written by megatrain's .ci/setup_services.sh: one-node test cluster. Do not use in production.
ClusterName=megatrain-ci
SlurmctldHost=${NODE}(127.0.0.1)
$(slurm_common_settings)
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
JobRequeue=1
InactiveLimit=0
NodeName=${NODE} NodeAddr=127.0.0.1 CPUs=${CPUS} State=UNKNOWN
PartitionName=ci Nodes=${NODE} Default=YES MaxTime=INFINITE State=UP
CONF
  install -d /etc/slurm /var/spool/slurmctld /var/spool/slurmd /var/log/slurm
  if [[ -f $SLURM_CONF ]] && cmp -s "$tmp" "$SLURM_CONF"; then
    rm -f "$tmp"; return 1
  fi
  chmod 0644 "$tmp" && mv "$tmp" "$SLURM_CONF"
  log "wrote $SLURM_CONF (node $NODE, $CPUS CPUs)"
  return 0
}

pid_alive() { [[ -s $1 ]] && kill -0 "$(cat "$1")" 2>/dev/null; }

stop_daemon() {  # pidfile name
  pid_alive "$1" || return 0
  local pid; pid=$(cat "$1")
  log "stopping $2 (pid $pid) to apply the new config"
  kill "$pid"
  for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.1; done
  kill -9 "$pid" 2>/dev/null || true
}

start_slurm() {
  local changed=0
  write_slurm_conf && changed=1
  if ((changed)); then
    stop_daemon /run/slurmd.pid slurmd
    stop_daemon /run/slurmctld.pid slurmctld
  fi
  if pid_alive /run/slurmctld.pid; then log "slurmctld already running"
  else log "starting slurmctld"; slurmctld -i; fi
  if pid_alive /run/slurmd.pid; then log "slurmd already running"
  else log "starting slurmd"; slurmd; fi
  wait_node_ready
}

wait_node_ready() {
  local state=""
  for i in $(seq 150); do
    state=$(sinfo -h -n "$NODE" -o %T 2>/dev/null | head -1 || true)
    case $state in
      idle|mixed|allocated|completing) log "node $NODE is $state"; return 0 ;;
      down*|drain*|fail*) ((i % 10 == 1)) && scontrol update NodeName="$NODE" State=RESUME 2>/dev/null || true ;;
    esac
    sleep 0.2
  done
  die "Slurm node $NODE did not become ready (state '${state:-no answer}'); see /var/log/slurm/slurmctld.log and slurmd.log"
}

main() {
  local t0=$SECONDS
  install_packages
  start_munge
  start_slurm
  mpirun --allow-run-as-root --version >/dev/null 2>&1 || die "mpirun does not run"
  log "ready in $((SECONDS - t0))s: $(sinfo -h -o '%P %D node(s) %C cpus(A/I/O/T) %T' | head -1);" \
      "$(mpirun --allow-run-as-root --version 2>/dev/null | head -1)"
}

main "$@"

#!/usr/bin/env bash
# Single-node SLURM (Debian 12's slurm 22.05 + munge) for CI and development: no systemd, no cgroups.
#
# Usage: tools/slurm_local.sh up|down|status      (as root; `up` installs the packages with apt if missing)
# After `up`, clients need: export SLURM_CONF=$SLURM_DIR/slurm.conf   (default /tmp/slurm-local)
#
# Known pitfalls it avoids: no systemd (daemons are started by hand), munged refuses to run as root (run
# as the munge user, with /run/munge created), cgroup plugins fail in containers (proctrack/linuxproc,
# task/none), the node must be named so slurmd finds itself (localhost). Jobs with more tasks than cores
# need `srun --overcommit` (-O) or SLURM_CPUS=N at `up` (config_overrides lets slurmd accept it).
# `up` is idempotent: a running cluster from this SLURM_DIR is reused.
set -euo pipefail
SLURM_DIR=${SLURM_DIR:-/tmp/slurm-local}
CPUS=${SLURM_CPUS:-$(nproc)}
NODE=${SLURM_NODE:-localhost}
export SLURM_CONF=$SLURM_DIR/slurm.conf

[ "$(id -u)" = 0 ] || { echo "$0: must run as root (starts munged, slurmctld, slurmd)" >&2; exit 1; }

install_pkgs() {
  if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v srun >/dev/null || ! command -v munged >/dev/null; then
    # Exit status 3: the packages cannot be had (no apt, no network) - callers may skip rather than fail.
    command -v apt-get >/dev/null || { echo "$0: slurm is not installed and there is no apt-get" >&2; exit 3; }
    apt-get update -qq || { echo "$0: apt-get update failed" >&2; exit 3; }
    # Debian's postinst tries to start services; policy-rc.d (exit 101) / no systemd just denies it - harmless.
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
      slurmctld slurmd slurm-client munge >/dev/null || { echo "$0: apt-get install failed" >&2; exit 3; }
  fi
}

start_munge() {
  if munge -n >/dev/null 2>&1; then return; fi
  # munge postinst creates /etc/munge/munge.key; create one if missing.
  if [ ! -s /etc/munge/munge.key ]; then
    mkdir -p /etc/munge
    dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none
  fi
  chown -R munge:munge /etc/munge; chmod 700 /etc/munge; chmod 400 /etc/munge/munge.key
  mkdir -p /run/munge /var/log/munge /var/lib/munge
  chown munge:munge /run/munge /var/log/munge /var/lib/munge; chmod 755 /run/munge
  runuser -u munge -- /usr/sbin/munged      # daemonizes; refuses to run as root without --force
  touch "$SLURM_DIR/.started-munge"         # so `down` stops only a munged that `up` started
  for _ in $(seq 50); do munge -n >/dev/null 2>&1 && return; sleep 0.1; done
  echo "munged failed to start" >&2; exit 1
}

write_conf() {
  mkdir -p "$SLURM_DIR"/{state,spool,log}
  cat > "$SLURM_CONF" <<EOF
ClusterName=local
SlurmctldHost=localhost
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
# a requeued job waits out its old credential before it starts again (default 120 s)
AuthInfo=cred_expire=15
CredType=cred/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
SlurmdParameters=config_overrides
StateSaveLocation=$SLURM_DIR/state
SlurmdSpoolDir=$SLURM_DIR/spool
SlurmctldPidFile=$SLURM_DIR/slurmctld.pid
SlurmdPidFile=$SLURM_DIR/slurmd.pid
SlurmctldLogFile=$SLURM_DIR/log/slurmctld.log
SlurmdLogFile=$SLURM_DIR/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$CPUS State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
}

running() {
  [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null
}

wait_idle() {
  for _ in $(seq 100); do
    sinfo -h -o '%T' 2>/dev/null | grep -qE '^(idle|mixed|allocated)' && return 0
    sleep 0.2
  done
  return 1
}

up() {
  if running "$SLURM_DIR/slurmctld.pid" && running "$SLURM_DIR/slurmd.pid" && wait_idle; then
    echo "slurm already up"; echo "export SLURM_CONF=$SLURM_CONF"; return
  fi
  install_pkgs
  mkdir -p "$SLURM_DIR"
  start_munge
  write_conf
  /usr/sbin/slurmctld -f "$SLURM_CONF"        # daemonizes (use -D to stay in foreground)
  /usr/sbin/slurmd -f "$SLURM_CONF" -N "$NODE" # -N not needed for NODE=localhost or $(hostname -s)
  if wait_idle; then sinfo; echo "export SLURM_CONF=$SLURM_CONF"; return; fi
  echo "slurm did not come up; logs in $SLURM_DIR/log" >&2
  tail -n 20 "$SLURM_DIR"/log/*.log >&2 || true
  exit 1
}

stop_pidfile() {
  local f=$1
  [ -s "$f" ] || return 0
  local p; p=$(cat "$f")
  if kill -0 "$p" 2>/dev/null; then
    kill "$p"
    for _ in $(seq 50); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
    kill -0 "$p" 2>/dev/null && kill -9 "$p" || true
  fi
  rm -f "$f"
}

down() {
  scancel --state=RUNNING,PENDING -u root 2>/dev/null || true
  stop_pidfile "$SLURM_DIR/slurmd.pid"
  stop_pidfile "$SLURM_DIR/slurmctld.pid"
  if [ -e "$SLURM_DIR/.started-munge" ] && [ "${KEEP_MUNGE:-0}" != 1 ]; then
    stop_pidfile /run/munge/munged.pid
  fi
  rm -rf "$SLURM_DIR"
}

case "${1:-}" in
  up) up ;;
  down) down ;;
  status) sinfo; squeue ;;
  *) echo "usage: $0 up|down|status" >&2; exit 2 ;;
esac

#!/usr/bin/env bash
# Start a one-node SLURM cluster on 127.0.0.1 for Strata's launcher tests (Debian 12, as root,
# no systemd). Installs slurm-wlm + munge with apt-get when missing, writes its own slurm.conf
# under $STRATA_SLURM_BASE (clients find it through SLURM_CONF) and waits for the node to be idle.
# Leaves /etc/slurm alone; ports are taken from the environment so it can run beside another cluster.
set -euo pipefail
BASE=${STRATA_SLURM_BASE:-/tmp/strata-test-slurm}
CTLD_PORT=${STRATA_SLURMCTLD_PORT:-6917}
SLURMD_PORT=${STRATA_SLURMD_PORT:-6918}
HERE=$(cd "$(dirname "$0")" && pwd)

if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null \
   || ! command -v sbatch >/dev/null || ! command -v munged >/dev/null; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends slurm-wlm munge >/dev/null
fi

# A previous session that died without cleaning up: stop its daemons first.
"$HERE/stop.sh" >/dev/null 2>&1 || true
rm -rf "$BASE"
mkdir -p "$BASE"/state/ctld "$BASE"/state/d "$BASE"/run "$BASE"/log

# --- munge: one daemon per machine; reuse it when it already answers ---
if ! (munge -n | unmunge) >/dev/null 2>&1; then
  if [ ! -s /etc/munge/munge.key ]; then
    dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
    chown munge:munge /etc/munge/munge.key
    chmod 400 /etc/munge/munge.key
  fi
  install -d -o munge -g munge -m 0755 /run/munge
  runuser -u munge -- /usr/sbin/munged
  echo /run/munge/munged.pid >"$BASE/run/started-munge"
  for _ in $(seq 100); do (munge -n | unmunge) >/dev/null 2>&1 && break; sleep 0.1; done
fi

HOST=$(hostname -s)
NODE_LINE=$(slurmd -C | head -1)               # NodeName=<host> CPUs=.. ... RealMemory=..
CONF="$BASE/slurm.conf"
cat >"$CONF" <<CONF
ClusterName=stratatest
SlurmctldHost=${HOST}(127.0.0.1)
SlurmctldPort=${CTLD_PORT}
SlurmdPort=${SLURMD_PORT}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# a requeued job waits cred_expire seconds before it may start again (default 120)
AuthInfo=cred_expire=5
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SchedulerType=sched/backfill
# the defaults (sched_interval=60, bf_interval=30) leave queued jobs waiting for seconds
SchedulerParameters=batch_sched_delay=0,sched_interval=1,bf_interval=1
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
# finished jobs stay visible to scontrol for 5 minutes (there is no accounting database)
MinJobAge=300
MailProg=/bin/true
StateSaveLocation=$BASE/state/ctld
SlurmdSpoolDir=$BASE/state/d
SlurmctldPidFile=$BASE/run/slurmctld.pid
SlurmdPidFile=$BASE/run/slurmd.pid
SlurmctldLogFile=$BASE/log/slurmctld.log
SlurmdLogFile=$BASE/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
$NODE_LINE NodeAddr=127.0.0.1 State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
CONF
export SLURM_CONF="$CONF"

/usr/sbin/slurmctld -f "$CONF"
/usr/sbin/slurmd -f "$CONF"
for _ in $(seq 300); do
  [ "$(sinfo -h -o %t 2>/dev/null)" = idle ] && break
  sleep 0.1
done
if [ "$(sinfo -h -o %t 2>/dev/null)" != idle ]; then
  echo "slurm node did not become idle; last log lines:" >&2
  tail -n 30 "$BASE"/log/*.log >&2 || true
  exit 1
fi
echo "SLURM_CONF=$CONF"

#!/usr/bin/env bash
# Start a single-node SLURM on this machine for the tests (idempotent: re-runnable; a running
# munged/slurmctld/slurmd is kept). Debian's slurmctld, slurmd, slurm-client and munge packages;
# proctrack/linuxproc, task/none, no cgroups, one partition "ci" whose one node is this host on
# 127.0.0.1. Needs root for apt-get and the daemons. Exit status 0 when `sinfo` shows the node
# idle, else 1 with the reason on stderr (the SLURM test then skips, saying why).
set -uo pipefail

CONF=/etc/slurm/slurm.conf
MARK="# written by midasflow ci/slurm.sh"
LOGDIR=/var/log/slurm

fail() { echo "ci/slurm.sh: SLURM not started: $*" >&2; exit 1; }

node_ready() {  # the default partition has a node that takes jobs
    sinfo -h -o "%t" 2>/dev/null | grep -qE '^(idle|mix|alloc)'
}

if [ -e "$CONF" ] && ! grep -qF "$MARK" "$CONF"; then  # a SLURM set up by someone else
    node_ready && { echo "ci/slurm.sh: using this machine's SLURM: $(sinfo -h -o '%P %D %t' | head -1)"; exit 0; }
    fail "$CONF exists and was not written by ci/slurm.sh; not touching it (and sinfo shows no idle node)"
fi
[ "$(id -u)" = 0 ] || fail "not root (need apt-get and the daemons)"

if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v sbatch >/dev/null \
        || ! command -v munged >/dev/null; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -qq slurmctld slurmd slurm-client munge >/dev/null \
        || { apt-get update -qq >/dev/null && apt-get install -y -qq slurmctld slurmd slurm-client munge >/dev/null; } \
        || fail "apt-get install slurmctld slurmd slurm-client munge failed"
fi

# munge: the package makes the key; start munged as its own user unless it already answers
if [ ! -s /etc/munge/munge.key ]; then
    runuser -u munge -- mungekey --create --keyfile /etc/munge/munge.key || fail "cannot create the munge key"
fi
if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
    install -d -o munge -g munge -m 0755 /run/munge
    runuser -u munge -- /usr/sbin/munged || fail "munged did not start (see /var/log/munge/munged.log)"
    for _ in $(seq 20); do munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.5; done
    munge -n | unmunge >/dev/null 2>&1 || fail "munge credentials do not round-trip"
fi

# slurm.conf: this host's CPUs and memory as slurmd measures them; never overwrite a foreign one
host="$(hostname -s)"
node_line="$(slurmd -C | head -1)"  # NodeName=<host> CPUs=… RealMemory=…
case "$node_line" in NodeName=*) ;; *) fail "slurmd -C gave no node line: $node_line" ;; esac
node_line="${node_line% UpTime=*}"
mem_mb="${node_line##*RealMemory=}"
# 90 % of what slurmd measures, so a little less free memory never drains the node
node_line="${node_line%RealMemory=*}RealMemory=$(( mem_mb * 9 / 10 ))"
conf="$MARK
ClusterName=midasflow-ci
SlurmctldHost=${host}(127.0.0.1)
SlurmUser=slurm
AuthType=auth/munge
CommunicationParameters=NoInAddrAny
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
MinJobAge=600
StateSaveLocation=/var/lib/slurm/slurmctld
SlurmdSpoolDir=/var/lib/slurm/slurmd
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=$LOGDIR/slurmctld.log
SlurmdLogFile=$LOGDIR/slurmd.log
${node_line} NodeAddr=127.0.0.1 State=UNKNOWN
PartitionName=ci Nodes=${host} Default=YES MaxTime=INFINITE State=UP"
changed=0
if [ ! -e "$CONF" ] || [ "$(cat "$CONF")" != "$conf" ]; then
    printf '%s\n' "$conf" > "$CONF.tmp" && mv "$CONF.tmp" "$CONF" && changed=1
fi
install -d -o slurm -g slurm /var/lib/slurm/slurmctld "$LOGDIR"
install -d /var/lib/slurm/slurmd

if [ "$changed" = 1 ]; then  # node definitions need a restart, not just `scontrol reconfigure`
    for pidfile in /run/slurmd.pid /run/slurmctld.pid; do
        [ -s "$pidfile" ] && kill "$(cat "$pidfile")" 2>/dev/null
    done
    for _ in $(seq 20); do pgrep -x slurmctld >/dev/null || pgrep -x slurmd >/dev/null || break; sleep 0.5; done
fi
pgrep -x slurmctld >/dev/null || /usr/sbin/slurmctld || fail "slurmctld did not start (see $LOGDIR/slurmctld.log)"
pgrep -x slurmd >/dev/null || /usr/sbin/slurmd || fail "slurmd did not start (see $LOGDIR/slurmd.log)"

for _ in $(seq 60); do
    node_ready && break
    # a node left DOWN/DRAINED by an earlier run (e.g. a killed slurmd) is put back in service
    sinfo -h -o "%t" 2>/dev/null | grep -qE '^(down|drain|drng)' \
        && scontrol update NodeName="$host" State=RESUME 2>/dev/null
    sleep 1
done
node_ready || fail "no idle node after 60 s: $(sinfo -h 2>&1 | head -3) (see $LOGDIR/slurmctld.log, slurmd.log)"
echo "ci/slurm.sh: SLURM $(sinfo -V | cut -d' ' -f2) up: $(sinfo -h -o 'partition %P, %D node(s) %N, %c CPUs, %t' | head -1)"

#!/usr/bin/env bash
# A single-node Slurm on this machine, for `make test-slurm` and for trying `ufgir reproduce
# --launcher slurm` without a cluster: munge, MariaDB + slurmdbd (submitit reads job states with
# sacct, which needs accounting), slurmctld and slurmd, all on localhost, all state in one folder.
#
#   tests/slurm/cluster.sh start    write the configuration, start the daemons, wait for the node
#   tests/slurm/cluster.sh stop     stop them (the folder stays; `start` reuses it)
#   tests/slurm/cluster.sh conf     print the path of its slurm.conf: SLURM_CONF=$(... conf) sbatch ...
#
# Needs root (slurmd runs jobs as their user) and Debian's packages:
#   apt-get install -y slurm-wlm slurmdbd munge mariadb-server
# LOCAL_SLURM_DIR (default /tmp/ufgir-slurm) holds configuration, logs, spool and the database.
# The node is this host with its own CPUs and memory (`slurmd -C`) and four stand-in GPUs: empty
# character devices declared in gres.conf (slurmd 22.05 ignores a count-only GPU line), enough for Slurm to
# assign and set CUDA_VISIBLE_DEVICES. Two partitions: `cpu` (the default) and `gpu`.
set -euo pipefail

DIR=${LOCAL_SLURM_DIR:-/tmp/ufgir-slurm}
HOST=$(hostname -s)
CONF=$DIR/etc/slurm.conf
DB_PORT=${LOCAL_SLURM_DB_PORT:-3307}

log() { echo "slurm-local: $*" >&2; }

wait_for() {  # wait_for SECONDS WHAT COMMAND...
    local n=$1 what=$2; shift 2
    for _ in $(seq "$n"); do
        if "$@" >/dev/null 2>&1; then return 0; fi
        sleep 1
    done
    log "$what did not come up; see $DIR/log"
    return 1
}

write_config() {
    mkdir -p "$DIR"/{etc,log,run,spool/ctld,spool/d,dev}
    for i in 0 1 2 3; do  # stand-in GPUs: character devices with NVIDIA's major number (nothing opens them)
        [ -c "$DIR/dev/nvidia$i" ] || { rm -f "$DIR/dev/nvidia$i"; mknod "$DIR/dev/nvidia$i" c 195 "$i"; }
    done
    # this machine as slurmd sees it (CPUs, sockets, memory), less the uptime line
    local node
    node=$(slurmd -C | head -1 | sed "s/^NodeName=[^ ]*/NodeName=$HOST/")
    cat > "$CONF" <<CONF
ClusterName=ufgir
SlurmctldHost=$HOST
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=$DIR/spool/ctld
SlurmdSpoolDir=$DIR/spool/d
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmdPidFile=$DIR/run/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
ReturnToService=2
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
EnforcePartLimits=ALL
JobRequeue=1
KillWait=30
MinJobAge=300
# accounting: submitit follows its jobs with sacct
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
GresTypes=gpu
$node Gres=gpu:4 State=UNKNOWN
PartitionName=cpu Nodes=$HOST Default=YES MaxTime=INFINITE State=UP
PartitionName=gpu Nodes=$HOST MaxTime=INFINITE State=UP
CONF
    cat > "$DIR/etc/gres.conf" <<CONF
NodeName=$HOST Name=gpu File=$DIR/dev/nvidia[0-3]
CONF
    cat > "$DIR/etc/slurmdbd.conf" <<CONF
AuthType=auth/munge
DbdHost=localhost
SlurmUser=root
PidFile=$DIR/run/slurmdbd.pid
LogFile=$DIR/log/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$DB_PORT
StorageUser=slurm
StoragePass=slurm
StorageLoc=slurm_acct_db
CONF
    chmod 600 "$DIR/etc/slurmdbd.conf"
}

start_munge() {  # a munged that answers already (the machine's own) is used and left alone by `stop`
    if munge -n >/dev/null 2>&1; then return; fi
    mkdir -p /run/munge && chown munge:munge /run/munge
    runuser -u munge -- /usr/sbin/munged --force  # --force: over a socket a dead munged left
    wait_for 10 munge munge -n
    cp /run/munge/munged.pid "$DIR/run/munged.pid"
}

start_db() {
    local data=$DIR/mysql
    if [ ! -d "$data/mysql" ]; then
        mariadb-install-db --user=root --datadir="$data" --auth-root-authentication-method=socket >"$DIR/log/mariadb-install.log" 2>&1
    fi
    if ! mariadb-admin --socket="$DIR/run/mysql.sock" ping >/dev/null 2>&1; then
        (setsid mariadbd --user=root --datadir="$data" --socket="$DIR/run/mysql.sock" --port="$DB_PORT" \
            --bind-address=127.0.0.1 --pid-file="$DIR/run/mariadb.pid" --log-error="$DIR/log/mariadb.log" \
            --innodb-buffer-pool-size=64M </dev/null >/dev/null 2>&1 &)
        wait_for 60 MariaDB mariadb-admin --socket="$DIR/run/mysql.sock" ping
    fi
    mariadb --socket="$DIR/run/mysql.sock" <<SQL
CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY 'slurm';
CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY 'slurm';
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';
SQL
}

start() {
    write_config
    export SLURM_CONF=$CONF
    start_munge
    start_db
    [ -s "$DIR/run/slurmdbd.pid" ] && kill -0 "$(cat "$DIR/run/slurmdbd.pid")" 2>/dev/null \
        || slurmdbd  # reads slurmdbd.conf beside $SLURM_CONF
    wait_for 30 slurmdbd sacctmgr -n list cluster
    sacctmgr -i -n add cluster ufgir >/dev/null 2>&1 || true
    [ -s "$DIR/run/slurmctld.pid" ] && kill -0 "$(cat "$DIR/run/slurmctld.pid")" 2>/dev/null \
        || slurmctld -f "$CONF"
    wait_for 30 slurmctld scontrol ping
    [ -s "$DIR/run/slurmd.pid" ] && kill -0 "$(cat "$DIR/run/slurmd.pid")" 2>/dev/null \
        || slurmd -f "$CONF"
    wait_for 60 "the node" bash -c "sinfo -h -N -o %T | grep -qE '^(idle|mixed|allocated)'"
    log "up: $(sinfo -h -o '%P %D %T' | tr '\n' ' ')(SLURM_CONF=$CONF)"
}

stop_pidfile() {  # stop_pidfile NAME: SIGTERM the daemon, wait for it to go
    local f=$DIR/run/$1.pid
    [ -s "$f" ] || return 0
    local pid; pid=$(cat "$f")
    if kill "$pid" 2>/dev/null; then
        for _ in $(seq 30); do kill -0 "$pid" 2>/dev/null || break; sleep 1; done
    fi
    rm -f "$f"
}

stop() {
    export SLURM_CONF=$CONF
    [ -f "$CONF" ] && scancel --full --quiet --user=root 2>/dev/null || true
    stop_pidfile slurmd
    stop_pidfile slurmctld
    stop_pidfile slurmdbd
    stop_pidfile munged
    if [ -S "$DIR/run/mysql.sock" ]; then mariadb-admin --socket="$DIR/run/mysql.sock" shutdown 2>/dev/null || true; fi
    log "stopped (state kept in $DIR)"
}

case "${1:-}" in
    start) start ;;
    stop) stop ;;
    conf) echo "$CONF" ;;
    *) echo "usage: $0 start|stop|conf" >&2; exit 2 ;;
esac

# Shared paths and helpers for up.sh, down.sh and status.sh; sourced, never run.
# The cluster: munged, a private MariaDB, slurmdbd, slurmctld and two emulated slurmd
# nodes (n1, n2) on 127.0.0.1, all started as plain daemons (the machine has no systemd).

STATE_DIR=/var/lib/flowmill-slurm      # everything generated: spools, logs, DB data
RUN_DIR=/run/flowmill-slurm            # pid files; cleared with /run so stale pids vanish
LOG_DIR=$STATE_DIR/log
DB_DATA_DIR=$STATE_DIR/mysql
DB_RUN_DIR=$STATE_DIR/mysql-run        # owned by user mysql: mariadbd writes its socket here
DB_SOCKET=$DB_RUN_DIR/mysqld.sock
DB_PORT=3307                           # not 3306, so a system MariaDB can coexist
DB_PASSWORD_FILE=$STATE_DIR/db-password
LOCK_FILE=$STATE_DIR/lock
SLURM_ETC=/etc/flowmill-slurm          # slurm.conf and slurmdbd.conf of this cluster, never the system's /etc/slurm
# Every SLURM daemon and command these scripts start reads this cluster's configuration, whatever
# /etc/slurm holds (slurmdbd finds slurmdbd.conf beside it).
export SLURM_CONF=$SLURM_ETC/slurm.conf
SYSTEM_SLURM_CONF=/etc/slurm/slurm.conf  # where SLURM's commands look without SLURM_CONF
INSTALLED_MARKER=$STATE_DIR/installed-slurm  # present when up.sh installed SLURM's packages on this machine
CLUSTER_NAME=flowmill
NODES=(n1 n2)
declare -A NODE_PORT=([n1]=6818 [n2]=6828)
MUNGE_PID_FILE=/run/munge/munged.pid   # munged's compiled-in default
BOOT_TIMEOUT_S=${FLOWMILL_SLURM_BOOT_TIMEOUT_S:-60}  # bound on every wait, in seconds

log() { printf '[slurm-cluster] %s\n' "$*" >&2; }
die() { printf '[slurm-cluster] ERROR: %s\n' "$*" >&2; exit 1; }

# alive PID: the process exists and is not a zombie. Daemons are reparented to pid 1,
# which here reaps them only ~1.5 s after they exit.
alive() {
    local stat
    # Not $(<file): under set -e, bash 5.2 exits the whole script when that redirection
    # fails, even inside `|| return`.
    stat=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
    stat=${stat##*) }
    [[ ${stat%% *} != Z ]]
}

# pid_of PIDFILE COMM: prints the pid if PIDFILE names a live process called COMM
# (checking the name guards against a stale file whose pid was reused).
pid_of() {
    local pidfile=$1 comm=$2 pid
    [[ -r $pidfile ]] || return 1
    pid=$(<"$pidfile")
    [[ $pid =~ ^[0-9]+$ ]] && alive "$pid" || return 1
    [[ $(cat "/proc/$pid/comm" 2>/dev/null) == "$comm" ]] || return 1
    echo "$pid"
}

# wait_until DESCRIPTION COMMAND...: retries COMMAND every 0.2 s for BOOT_TIMEOUT_S.
wait_until() {
    local what=$1; shift
    local deadline=$((SECONDS + BOOT_TIMEOUT_S))
    until "$@" >/dev/null 2>&1; do
        ((SECONDS < deadline)) || return 1
        sleep 0.2
    done
    log "$what: ok"
}

# stop_pid NAME PIDFILE COMM: SIGTERM, wait for the exit; SIGKILL (announced) after 30 s.
stop_pid() {
    local name=$1 pidfile=$2 comm=$3 pid
    if ! pid=$(pid_of "$pidfile" "$comm"); then
        log "$name: not running"
        return 0
    fi
    kill -TERM "$pid"
    local deadline=$((SECONDS + 30)) killed=0
    while alive "$pid"; do
        if ((SECONDS >= deadline && !killed)); then
            log "$name (pid $pid) ignored SIGTERM for 30 s; sending SIGKILL"
            kill -KILL "$pid"
            killed=1
        fi
        sleep 0.2
    done
    rm -f "$pidfile"
    log "$name: stopped (pid $pid)"
}

# node_state NODE: sinfo's state word for NODE, e.g. idle, mixed, down*, drained.
node_state() { sinfo -h -N -n "$1" -o '%T' 2>/dev/null | awk 'NR == 1'; }

# nodes_up: every node is schedulable (idle/mixed/allocated/completing, and responding).
nodes_up() {
    local node state
    for node in "${NODES[@]}"; do
        state=$(node_state "$node")
        [[ $state =~ ^(idle|mixed|allocated|completing)$ ]] || return 1
    done
}

sacct_works() { sacct -n -X -S now-1minutes -o JobID >/dev/null; }

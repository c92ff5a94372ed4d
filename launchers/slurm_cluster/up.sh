#!/usr/bin/env bash
# Bring up a real SLURM cluster on this machine for tests, or verify the running one.
#
# Installs the packages if missing, writes /etc/flowmill-slurm/{slurm,slurmdbd}.conf, then
# starts whatever is not running: munged, a private MariaDB (port 3307, data in
# /var/lib/flowmill-slurm), slurmdbd, slurmctld and two emulated slurmd nodes n1, n2
# (partition `debug`). Returns once both nodes are schedulable and `sacct` answers, or
# fails naming the log to read. Idempotent: when everything runs it only verifies.
# The daemons read SLURM_CONF=/etc/flowmill-slurm/slurm.conf; /etc/slurm/slurm.conf becomes a
# link to it only when it is this script's to set (see link_system_config), so a SLURM
# installation already on the machine keeps its configuration.
# Needs root. Stop it with down.sh.
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
source "$HERE/common.sh"

[[ $EUID -eq 0 ]] || die "run as root: it installs packages, writes $SLURM_ETC and starts daemons"
mkdir -p "$STATE_DIR"
exec 9>"$LOCK_FILE"
flock -w 600 9 || die "another up.sh/down.sh holds $LOCK_FILE for over 600 s"

# spawn COMMAND...: runs COMMAND with only fds 0-2 open. munged, mariadbd and slurmdbd
# keep the fds they inherit: holding the lock's fd 9 they would hold the lock forever,
# holding a caller's pipe they would keep it waiting for end of file.
spawn() {
    (
        for fd in /proc/$BASHPID/fd/*; do
            fd=${fd##*/}
            if ((fd > 2)); then exec {fd}>&-; fi
        done
        exec "$@"
    )
}

install_packages() {
    local missing=() bin
    for bin in munged mungekey slurmctld slurmd slurmdbd sbatch sacct sacctmgr mariadbd mariadb-install-db; do
        command -v "$bin" >/dev/null || missing+=("$bin")
    done
    ((${#missing[@]} == 0)) && return 0
    log "installing packages (missing: ${missing[*]})"
    # Exit code 101 from policy-rc.d stops the packages' init scripts from starting the
    # daemons with their default configuration; this script starts them itself.
    local policy=/usr/sbin/policy-rc.d own_policy=0
    if [[ ! -e $policy ]]; then
        printf '#!/bin/sh\nexit 101\n' >"$policy"
        chmod +x "$policy"
        own_policy=1
        trap 'rm -f /usr/sbin/policy-rc.d' EXIT
    fi
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    # Recommends would add ~60 packages (HDF5, ROCm, InfluxDB plugins...) that nothing here uses.
    apt-get install -y -qq --no-install-recommends -o DPkg::Lock::Timeout=300 \
        slurm-wlm slurmdbd munge mariadb-server >/dev/null
    if ((own_policy)); then
        rm -f "$policy"
        trap - EXIT
    fi
    touch "$INSTALLED_MARKER"
}

ensure_hosts() {
    local node addr missing=()
    for node in "${NODES[@]}"; do
        addr=$(getent hosts "$node" | awk '{print $1}' || true)
        if [[ -z $addr ]]; then
            missing+=("$node")
        elif [[ $addr != 127.0.0.1 ]]; then
            die "$node resolves to $addr; the emulated nodes need 127.0.0.1 (fix /etc/hosts)"
        fi
    done
    ((${#missing[@]} == 0)) && return 0
    echo "127.0.0.1 ${missing[*]}  # flowmill-slurm emulated nodes" >>/etc/hosts
    log "added ${missing[*]} to /etc/hosts"
}

# node_hardware: slurmd -C's CPU layout, memory lowered 5% so that slurmd's own
# measurement never falls under the declared value (that would drain the node).
node_hardware() {
    local line field memory="" out=()
    line=$(slurmd -C)
    for field in ${line%%$'\n'*}; do
        case $field in
            CPUs=* | Boards=* | SocketsPerBoard=* | CoresPerSocket=* | ThreadsPerCore=*) out+=("$field") ;;
            RealMemory=*) memory=$((${field#RealMemory=} * 95 / 100)) ;;
        esac
    done
    [[ -n $memory ]] || die "could not read RealMemory from 'slurmd -C': $line"
    echo "${out[*]} RealMemory=$memory"
}

# install_if_changed NEW PATH MODE: moves NEW to PATH unless identical; records a change.
install_if_changed() {
    local new=$1 path=$2 mode=$3
    if [[ -f $path ]] && cmp -s "$new" "$path"; then
        rm -f "$new"
        return 0
    fi
    install -m "$mode" -o root -g root "$new" "$path"
    rm -f "$new"
    CONFIG_CHANGED=1
    log "wrote $path"
}

render() {
    sed -e "s|@CLUSTER_NAME@|$CLUSTER_NAME|g" -e "s|@CTLD_HOST@|$(hostname -s)|g" \
        -e "s|@STATE_DIR@|$STATE_DIR|g" -e "s|@RUN_DIR@|$RUN_DIR|g" -e "s|@LOG_DIR@|$LOG_DIR|g" \
        -e "s|@N1_PORT@|${NODE_PORT[n1]}|g" -e "s|@N2_PORT@|${NODE_PORT[n2]}|g" \
        -e "s|@NODE_HARDWARE@|$NODE_HARDWARE|g" -e "s|@DB_PORT@|$DB_PORT|g" \
        -e "s|@DB_PASSWORD@|$DB_PASSWORD|g" "$1"
}

write_configs() {
    mkdir -p "$SLURM_ETC" "$RUN_DIR" "$LOG_DIR" "$STATE_DIR/slurmctld" "${NODES[@]/#/$STATE_DIR/slurmd-}"
    if [[ ! -s $DB_PASSWORD_FILE ]]; then
        (umask 077 && od -An -tx1 -N16 /dev/urandom | tr -d ' \n' >"$DB_PASSWORD_FILE")
    fi
    DB_PASSWORD=$(<"$DB_PASSWORD_FILE")
    NODE_HARDWARE=$(node_hardware)
    CONFIG_CHANGED=0
    local tmp
    tmp=$(mktemp)
    render "$HERE/slurm.conf.in" >"$tmp"
    install_if_changed "$tmp" "$SLURM_ETC/slurm.conf" 644
    tmp=$(mktemp)
    render "$HERE/slurmdbd.conf.in" >"$tmp"
    # slurmdbd refuses a config that others can read (it holds the DB password).
    install_if_changed "$tmp" "$SLURM_ETC/slurmdbd.conf" 600
}

GENERATED_HEADER="# Generated by launchers/slurm_cluster/up.sh"

# generated_here FILE: FILE is a regular file this script wrote (earlier versions wrote into /etc/slurm).
generated_here() {
    [[ -f $1 && ! -L $1 ]] && [[ $(head -c ${#GENERATED_HEADER} "$1") == "$GENERATED_HEADER" ]]
}

# link_system_config: SLURM's commands reach this cluster without SLURM_CONF when
# /etc/slurm/slurm.conf is this script's to set: already a link to SLURM_CONF, a file this script
# wrote, or absent on a machine where this script installed SLURM. Anything else belongs to
# another SLURM installation and is left as it is (SYSTEM_CONF_KEPT=1).
SYSTEM_CONF_KEPT=0
link_system_config() {
    local system=$SYSTEM_SLURM_CONF old_dbd=${SYSTEM_SLURM_CONF%/*}/slurmdbd.conf
    [[ -L $system && $(readlink "$system") == "$SLURM_CONF" ]] && return 0
    if generated_here "$system" || [[ ! -e $system && ! -L $system && -e $INSTALLED_MARKER ]]; then
        mkdir -p "${system%/*}"
        ln -sfn "$SLURM_CONF" "$system"
        log "linked $system to $SLURM_CONF"
        if generated_here "$old_dbd"; then
            rm -f "$old_dbd"
            log "removed $old_dbd (slurmdbd reads the one in $SLURM_ETC)"
        fi
        return 0
    fi
    SYSTEM_CONF_KEPT=1
}

munge_works() { munge -n | unmunge; }

start_munge() {
    if [[ ! -s /etc/munge/munge.key ]]; then
        mungekey --create --keyfile=/etc/munge/munge.key
        chown munge:munge /etc/munge/munge.key
        chmod 0400 /etc/munge/munge.key
        log "created /etc/munge/munge.key"
    fi
    if ! pid_of "$MUNGE_PID_FILE" munged >/dev/null; then
        install -d -o munge -g munge -m 0755 /run/munge
        spawn runuser -u munge -- /usr/sbin/munged
    fi
    wait_until "munged" munge_works || die "munge -n | unmunge fails; see /var/log/munge/munged.log"
}

db() { mariadb --socket="$DB_SOCKET" -uroot "$@"; }
db_ping() { mariadb-admin --socket="$DB_SOCKET" -uroot ping; }

start_mariadb() {
    install -d -o mysql -g mysql -m 0750 "$DB_DATA_DIR" "$DB_RUN_DIR"
    if [[ ! -d $DB_DATA_DIR/mysql ]]; then
        log "initialising MariaDB data in $DB_DATA_DIR"
        mariadb-install-db --user=mysql --datadir="$DB_DATA_DIR" --skip-test-db \
            >"$LOG_DIR/mariadb-install.log" 2>&1 ||
            die "mariadb-install-db failed; see $LOG_DIR/mariadb-install.log"
    fi
    if ! pid_of "$DB_RUN_DIR/mariadb.pid" mariadbd >/dev/null; then
        # mariadbd does not daemonize: setsid --fork puts it in its own session, away from
        # the caller's signals, and returns at once.
        spawn setsid --fork mariadbd --no-defaults --user=mysql --datadir="$DB_DATA_DIR" \
            --socket="$DB_SOCKET" --pid-file="$DB_RUN_DIR/mariadb.pid" \
            --bind-address=127.0.0.1 --port="$DB_PORT" --skip-name-resolve \
            --log-error="$LOG_DIR/mariadb.log" --innodb-buffer-pool-size=64M \
            --performance-schema=OFF </dev/null >/dev/null 2>&1
        wait_until "mariadb" db_ping || die "MariaDB does not answer; see $LOG_DIR/mariadb.log"
        db -e "CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY '$DB_PASSWORD';
               ALTER USER 'slurm'@'127.0.0.1' IDENTIFIED BY '$DB_PASSWORD';
               GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';"
    else
        wait_until "mariadb" db_ping || die "MariaDB does not answer; see $LOG_DIR/mariadb.log"
    fi
}

cluster_registered() { sacctmgr -n -P show cluster format=cluster | grep -qx "$CLUSTER_NAME"; }

start_slurmdbd() {
    pid_of "$RUN_DIR/slurmdbd.pid" slurmdbd >/dev/null || spawn slurmdbd
    wait_until "slurmdbd" sacctmgr -n show cluster || die "slurmdbd does not answer; see $LOG_DIR/slurmdbd.log"
    if ! cluster_registered; then
        sacctmgr -i add cluster "$CLUSTER_NAME" >/dev/null
        log "registered cluster $CLUSTER_NAME in accounting"
    fi
}

start_slurmctld() {
    pid_of "$RUN_DIR/slurmctld.pid" slurmctld >/dev/null || spawn slurmctld
    wait_until "slurmctld" scontrol ping || die "slurmctld does not answer; see $LOG_DIR/slurmctld.log"
}

# resume_admin_down: a node left drained or down by an admin or a failure (slurmctld keeps
# that across restarts) is put back in service. Nodes that merely do not respond yet show
# as e.g. "down*" and are left to ReturnToService=2.
resume_admin_down() {
    local node state
    for node in "${NODES[@]}"; do
        state=$(node_state "$node")
        if [[ $state =~ ^(drained|draining|drain|down)$ ]]; then
            log "$node is $state (reason: $(sinfo -h -N -n "$node" -o '%E' | awk 'NR == 1')); resuming it"
            scontrol update nodename="$node" state=resume
        fi
    done
}

start_slurmd() {
    local node
    for node in "${NODES[@]}"; do
        pid_of "$RUN_DIR/slurmd-$node.pid" slurmd >/dev/null || spawn slurmd -N "$node"
    done
    resume_admin_down
    wait_until "nodes ${NODES[*]}" nodes_up ||
        die "nodes not schedulable: $(sinfo -h -N -o '%N=%T' | tr '\n' ' '); see $LOG_DIR/slurmd-*.log"
}

restart_slurm_if_reconfigured() {
    ((CONFIG_CHANGED)) || return 0
    local node running=0
    pid_of "$RUN_DIR/slurmdbd.pid" slurmdbd >/dev/null && running=1
    pid_of "$RUN_DIR/slurmctld.pid" slurmctld >/dev/null && running=1
    for node in "${NODES[@]}"; do
        pid_of "$RUN_DIR/slurmd-$node.pid" slurmd >/dev/null && running=1
    done
    ((running)) || return 0
    log "configuration changed: restarting the slurm daemons"
    for node in "${NODES[@]}"; do
        stop_pid "slurmd $node" "$RUN_DIR/slurmd-$node.pid" slurmd
    done
    stop_pid slurmctld "$RUN_DIR/slurmctld.pid" slurmctld
    stop_pid slurmdbd "$RUN_DIR/slurmdbd.pid" slurmdbd
}

install_packages
ensure_hosts
write_configs
link_system_config
restart_slurm_if_reconfigured
start_munge
start_mariadb
start_slurmdbd
start_slurmctld
start_slurmd
wait_until "sacct" sacct_works || die "sacct fails; see $LOG_DIR/slurmdbd.log and slurmctld.log"
log "cluster up in ${SECONDS} s: partition debug, nodes ${NODES[*]}, accounting on"
if ((SYSTEM_CONF_KEPT)); then
    log "$SYSTEM_SLURM_CONF is left to the SLURM installation this script did not make;" \
        "SLURM's commands reach this cluster with: export SLURM_CONF=$SLURM_CONF"
fi

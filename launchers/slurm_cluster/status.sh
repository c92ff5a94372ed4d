#!/usr/bin/env bash
# Print which daemons of the local SLURM test cluster run, then the nodes and the queue.
# Exit status 0 when every daemon runs, 1 otherwise.
set -uo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
source "$HERE/common.sh"

all_running=1
report() {
    local name=$1 pidfile=$2 comm=$3 pid
    if pid=$(pid_of "$pidfile" "$comm"); then
        printf '%-12s running (pid %s)\n' "$name" "$pid"
    else
        printf '%-12s stopped\n' "$name"
        all_running=0
    fi
}

report munged "$MUNGE_PID_FILE" munged
report mariadb "$DB_RUN_DIR/mariadb.pid" mariadbd
report slurmdbd "$RUN_DIR/slurmdbd.pid" slurmdbd
report slurmctld "$RUN_DIR/slurmctld.pid" slurmctld
for node in "${NODES[@]}"; do
    report "slurmd $node" "$RUN_DIR/slurmd-$node.pid" slurmd
done
if pid_of "$RUN_DIR/slurmctld.pid" slurmctld >/dev/null; then
    echo
    sinfo -N -o '%N %P %T %c %m %E'
    echo
    squeue -o '%i %u %j %T %D %R'
fi
((all_running))

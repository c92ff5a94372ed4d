#!/usr/bin/env bash
# Stop the local SLURM test cluster started by up.sh: cancel every job, wait for the jobs
# to end (their processes would be orphaned otherwise), then stop slurmd n1/n2, slurmctld,
# slurmdbd, MariaDB and munged. Idempotent; keeps packages, configs and all state
# (job ids keep counting up across restarts). Needs root.
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
source "$HERE/common.sh"

[[ $EUID -eq 0 ]] || die "run as root: it stops daemons that run as root"
mkdir -p "$STATE_DIR"
exec 9>"$LOCK_FILE"
flock -w 600 9 || die "another up.sh/down.sh holds $LOCK_FILE for over 600 s"

no_jobs() { [[ -z $(squeue -h -o %i) ]]; }

cancel_jobs() {
    if ! pid_of "$RUN_DIR/slurmctld.pid" slurmctld >/dev/null; then
        log "slurmctld: not running, no jobs to cancel"
        return 0
    fi
    local jobs
    jobs=$(squeue -h -o %i | tr '\n' ' ')
    if [[ -n ${jobs// /} ]]; then
        log "cancelling jobs: $jobs"
        # shellcheck disable=SC2086  # one argument per job id
        scancel $jobs
    fi
    wait_until "all jobs ended" no_jobs ||
        die "jobs still listed after ${BOOT_TIMEOUT_S} s: $(squeue -h -o '%i:%T' | tr '\n' ' ')"
}

cancel_jobs
for node in "${NODES[@]}"; do
    stop_pid "slurmd $node" "$RUN_DIR/slurmd-$node.pid" slurmd
done
stop_pid slurmctld "$RUN_DIR/slurmctld.pid" slurmctld
stop_pid slurmdbd "$RUN_DIR/slurmdbd.pid" slurmdbd
stop_pid mariadb "$DB_RUN_DIR/mariadb.pid" mariadbd
stop_pid munged "$MUNGE_PID_FILE" munged
log "cluster stopped in ${SECONDS} s"

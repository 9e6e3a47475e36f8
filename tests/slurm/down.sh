#!/bin/sh
# Stop the single-node Slurm that up.sh brings up: slurmd, slurmctld and the munge daemon, waiting until they
# are gone. The test suite runs it when it started them itself.
set -u
for daemon in slurmd slurmctld munged; do
    pkill -x "$daemon" 2>/dev/null
done
for _ in $(seq 40); do
    pgrep -x slurmd >/dev/null || pgrep -x slurmctld >/dev/null || pgrep -x munged >/dev/null || exit 0
    sleep 0.25
done
echo "slurm daemons did not stop" >&2
exit 1

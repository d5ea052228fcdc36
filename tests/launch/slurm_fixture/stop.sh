#!/usr/bin/env bash
# Stop the daemons that start.sh started, by the PIDs they recorded (slurmd, slurmctld, then
# munged only if start.sh started it). Safe to run when nothing is running.
BASE=${STRATA_SLURM_BASE:-/tmp/strata-test-slurm}
pidfiles=("$BASE/run/slurmd.pid" "$BASE/run/slurmctld.pid")
[ -s "$BASE/run/started-munge" ] && pidfiles+=("$(cat "$BASE/run/started-munge")")
for f in "${pidfiles[@]}"; do
  [ -s "$f" ] || continue
  pid=$(cat "$f")
  kill "$pid" 2>/dev/null || continue
  for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  kill -0 "$pid" 2>/dev/null && kill -9 "$pid" 2>/dev/null
  echo "stopped $f ($pid)"
done
rm -f "$BASE/run/started-munge"

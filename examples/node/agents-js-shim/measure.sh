#!/bin/sh
# The figures in README.md: serves agents.toml (this proof of concept beside the Node echo)
# on a daemon of its own, dispatches JOBS jobs to each agent one after the other (cold: a
# new process per job), waits for the memory samples, prints each job's offer -> running
# and resident memory from `lkrun jobs ls --json`, and stops. Run it here, after `npm ci`
# here and in ../echo. LIVEKIT_URL, LIVEKIT_API_KEY and LIVEKIT_API_SECRET name a server;
# without them the daemon starts livekit-server in dev mode (ws://127.0.0.1:7880).
#
#   ./measure.sh [JOBS]        (default 3; lkrun on PATH, or LKRUN=/path/to/lkrun)
set -eu
JOBS=${1:-3}
LKRUN=${LKRUN:-lkrun}
WORK=$(mktemp -d)
export LKRUN_CONTROL_SOCKET="$WORK/control.sock"
"$LKRUN" serve agents.toml --state-dir "$WORK/state" --http-addr '' >"$WORK/serve.log" 2>&1 &
DAEMON=$!
trap 'kill -TERM $DAEMON 2>/dev/null; sleep 1; kill -TERM $DAEMON 2>/dev/null; wait $DAEMON; rm -rf "$WORK"' EXIT
until "$LKRUN" status >/dev/null 2>&1; do  # exit 0 once every agent is registered
  kill -0 $DAEMON 2>/dev/null || { cat "$WORK/serve.log"; exit 1; }
  sleep 0.5
done
if [ -z "${LIVEKIT_URL:-}" ]; then  # the daemon's dev server
  export LIVEKIT_URL=ws://127.0.0.1:7880 LIVEKIT_API_KEY=devkey LIVEKIT_API_SECRET=secret
fi
i=0
while [ $i -lt "$JOBS" ]; do
  i=$((i + 1))
  for agent in agents-js-echo node-echo; do
    "$LKRUN" dispatch --agent $agent --room "measure-$agent-$i-$$" --wait >/dev/null
  done
done
sleep 3  # memory is sampled every second while the jobs sit in their rooms
"$LKRUN" jobs ls --json >"$WORK/jobs.json"
python3 - "$WORK/jobs.json" <<'PY'
import json, sys
print(f"{'agent':16} {'warm':5} {'offer->running':>15} {'resident MB':>12}")
jobs = json.load(open(sys.argv[1]))
for job in sorted(jobs, key=lambda j: (j["agent"], j["offered_at"] or 0)):
    took = (job["started_at"] or 0) - (job["offered_at"] or 0)
    print(f"{job['agent']:16} {str(job['warm']):5} {took:>14.3f}s {job['memory_mb']:>12}")
PY

#!/bin/bash
# Scheduler trace of a guest round trip (diagnostic for the Latency section; needs root).
#
#   bench/trace_latency.sh OUT [bench_latency.py variant options...]
#
# Boots one guest with bench_latency.py (DescribeNSM only, a long loop), waits until
# the backend is busy, records 30 ms of sched_switch/sched_waking/sched_wakeup and
# cpu_idle events from tracefs into OUT, and lets the run finish.  Thread names in
# OUT: "CPU 0/TCG" is the guest's vCPU, ld-linux-x86-64 is QEMU's main loop (QEMU
# runs through the cache's loader), python is the backend.  PYTHON: the interpreter
# (default .venv/bin/python, else python3).
set -euo pipefail
out=${1:?usage: trace_latency.sh OUT [variant options]}
shift
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
T=/sys/kernel/tracing
[ -d "$T/events" ] || mount -t tracefs nodev "$T"
echo 0 > "$T/tracing_on"
echo > "$T/trace"
echo 8192 > "$T/buffer_size_kb"
echo "sched:sched_switch sched:sched_waking sched:sched_wakeup power:cpu_idle" > "$T/set_event"
log=$(mktemp)
"$PY" bench/bench_latency.py -n 200000 --runs 1 --ops DescribeNSM --idle 0 "$@" \
    > "$log" 2>&1 &
bench=$!
busy=0
for _ in $(seq 600); do
    pid=$(pgrep -f -- "serve.*--vhost-user" | head -1 || true)
    if [ -z "$pid" ]; then sleep 0.2; continue; fi
    a=$(awk '{print $14+$15}' "/proc/$pid/stat" 2>/dev/null || echo 0)
    sleep 0.2
    b=$(awk '{print $14+$15}' "/proc/$pid/stat" 2>/dev/null || echo 0)
    if [ $((b - a)) -gt 3 ]; then busy=$((busy + 1)); else busy=0; fi
    [ "$busy" -ge 3 ] && break   # three busy 200 ms samples in a row: the loop runs
done
sleep 0.5
echo 1 > "$T/tracing_on"; sleep 0.03; echo 0 > "$T/tracing_on"
cat "$T/trace" > "$out"
echo > "$T/set_event"
wait "$bench" || true
tail -4 "$log"
rm -f "$log"
echo "trace: $out ($(grep -vc '^#' "$out") events)"

#!/usr/bin/env bash
# CPU seconds of each thread of a `pdserve up --colocated` worker during one all-at-once `pdserve bench`
# (random 256/64, 60 prompts), from /proc/PID/task: how many cores the engine keeps busy, and which thread.
#   bash benchmarks/worker_threads_cpu.sh [tiny|small|MODEL_DIR] [HTTP_PORT]
set -u
if [ "${1:-}" = "-h" ] || [ "${1:-}" = "--help" ]; then sed -n 2,4p "$0"; exit 0; fi
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}; SIZE=${1:-small}; PORT=${2:-8300}
MODEL=$($PY -c "import sys; from pdserve.engine.builtin_model import ensure_builtin_model as e; \
a = sys.argv[1]; print(e(a) if a in ('tiny', 'small') else a)" "$SIZE")
OUT=$(mktemp -d)
setsid $PY -m pdserve --log-level warning up --colocated --model "$MODEL" --http-port "$PORT" --port $((PORT + 100)) \
  --log-dir "$OUT/logs" > "$OUT/up.log" 2>&1 &
UP=$!
trap 'kill -INT -- -$UP 2>/dev/null; sleep 5; kill -KILL -- -$UP 2>/dev/null' EXIT
for _ in $(seq 1 180); do curl -sf "http://127.0.0.1:$PORT/v1/models" >/dev/null && break; sleep 1; done
W=$(pgrep -g "$UP" -f "pdserve.* worker " | head -1)
[ -n "$W" ] || { echo "no worker process found; see $OUT/up.log" >&2; exit 1; }
snap() { for t in /proc/$W/task/*; do echo "$(basename "$t") $(awk '{print $14 + $15}' "$t/stat")"; done; }
snap > "$OUT/before"; T0=$(date +%s.%N)
$PY -m pdserve --log-level warning bench --base-url "http://127.0.0.1:$PORT" --dataset random --num-prompts 60 \
  --random-input-len 256 --random-output-len 64 --request-rate inf --tokenizer "$MODEL" --seed 11 --no-progress \
  --result-json "$OUT/bench.json" > "$OUT/bench.log" 2>&1 || { echo "bench failed; see $OUT/bench.log" >&2; exit 1; }
T1=$(date +%s.%N); snap > "$OUT/after"
$PY - "$OUT" "$T0" "$T1" <<'PY'
import json, os, sys
out, t0, t1 = sys.argv[1], float(sys.argv[2]), float(sys.argv[3])
hz = os.sysconf("SC_CLK_TCK")
read = lambda name: {l.split()[0]: int(l.split()[1]) for l in open(f"{out}/{name}")}
before, after = read("before"), read("after")
wall = t1 - t0
s = json.load(open(f"{out}/bench.json"))["summary"]
print(f"{s['output_throughput']:.0f} out tok/s; {wall:.1f} s of wall (the bench client's start included)")
used = sorted(((after[t] - before.get(t, 0)) / hz, t) for t in after)
for cpu, tid in reversed(used):
    if cpu >= 0.05:
        print(f"  thread {tid:>8s} {cpu:7.2f} s  {cpu / wall:5.2f} cores")
total = sum(c for c, _ in used)
print(f"  all threads {total:.2f} s = {total / wall:.2f} cores")
PY

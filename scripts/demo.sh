#!/usr/bin/env bash
# One command from a fresh machine to a finished run: installs everything, generates the sample HDTF dataset,
# starts a local Prefect server (SQLite) and the served deployments, runs
# `prefect deployment run preprocess/hdtf --watch` on the sample with the tiny profile, and prints what was
# kept and rejected and where the shards and tables are.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
export PATH="$PWD/.venv/bin:$PATH" PREFECT_SERVER_ANALYTICS_ENABLED=false DO_NOT_TRACK=1 HF_HUB_OFFLINE=1
export PREFECT_API_URL=http://127.0.0.1:4200/api PREFECT_RUNNER_POLL_FREQUENCY=2
RAW=sample_data/hdtf OUT=out/demo
mkdir -p .prefect

echo "== generating the sample HDTF dataset in $RAW"
synchrorama sample-data "$RAW"

serve_pid=""
cleanup() {  # SIGTERM (background jobs of a script ignore SIGINT), SIGKILL if still there after 30 s
  [ -n "$serve_pid" ] || return 0
  kill -TERM "$serve_pid" 2>/dev/null || return 0
  for _ in $(seq 1 60); do kill -0 "$serve_pid" 2>/dev/null || return 0; sleep 0.5; done
  kill -KILL "$serve_pid" 2>/dev/null || true
}
trap cleanup EXIT

echo "== synchrorama serve: Prefect server + deployments preprocess/{hdtf,vfhq,mead,folder} (log: .prefect/serve.log)"
env -u PREFECT_API_URL synchrorama serve --raw-root sample_data --out-root out --profile tiny \
  --server-log .prefect/server.log >.prefect/serve.log 2>&1 &
serve_pid=$!
for _ in $(seq 1 240); do prefect deployment inspect preprocess/hdtf >/dev/null 2>&1 && break; sleep 0.5; done

echo "== prefect deployment run preprocess/hdtf --watch"
status=0
prefect deployment run preprocess/hdtf --watch --watch-timeout 1800 \
  -p raw_dir="$PWD/$RAW" -p out_dir="$PWD/$OUT" -p profile=tiny || status=$?
if [ $status -ne 0 ]; then
  echo "!! the flow run failed; its log:"; tail -n 60 .prefect/serve.log
  exit $status
fi
echo
echo "== result. TINY PROFILE ON GENERATED SAMPLE DATA: these numbers say nothing about real data (MediaPipe is real; model stages run tiny random models)"
synchrorama inspect "$OUT"
synchrorama validate "$OUT"

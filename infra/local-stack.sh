#!/usr/bin/env bash
# The local service stack, all bound to 127.0.0.1 with telemetry off:
#   Prefect server + a process worker on pool m1-process (deployments from prefect.yaml applied),
#   MLflow tracking server (sqlite backend, artifacts proxied), and with --s3 a moto S3 server.
#
#   infra/local-stack.sh start [--s3]   # start everything, deploy, print the env to use it
#   infra/local-stack.sh status
#   infra/local-stack.sh stop           # stops exactly the processes it started (by their recorded PIDs)
#
# Then:  source runs/stack/env.sh && prefect deployment run m1-pipeline/local -p profile=tiny --watch
# (env.sh also puts the venv's bin first on PATH: prefect, mlflow and m1 work in a shell without the venv activated)
#
# Ports and folders: PREFECT_PORT (4200), MLFLOW_PORT (5000), S3_PORT (9000), M1_STACK_DIR (runs/stack),
# M1_VENV (.venv). PREFECT_HOME is left as it is (default ~/.prefect), so runs made without the stack
# (`m1 pipeline`, ephemeral API) show up in this server's UI too.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
STACK_DIR=${M1_STACK_DIR:-$ROOT/runs/stack}
BIN=${M1_VENV:-$ROOT/.venv}/bin
PREFECT_PORT=${PREFECT_PORT:-4200}
MLFLOW_PORT=${MLFLOW_PORT:-5000}
S3_PORT=${S3_PORT:-9000}
S3_BUCKET=${S3_BUCKET:-m1-stack}
PIDS=$STACK_DIR/pids
# MLflow's database holds artifact locations relative to the server's --artifacts-destination
# (mlflow-artifacts:/...), so one database must always be served with the same destination: it is recorded here.
ARTIFACTS_OF_DB=$STACK_DIR/mlflow.db.artifacts
HOST=127.0.0.1

export MLFLOW_DISABLE_TELEMETRY=true DO_NOT_TRACK=true DVC_NO_ANALYTICS=1 PREFECT_SERVER_ANALYTICS_ENABLED=false \
       RAY_USAGE_STATS_ENABLED=0 HF_HUB_DISABLE_TELEMETRY=1 TOKENIZERS_PARALLELISM=false
export PREFECT_API_URL=http://$HOST:$PREFECT_PORT/api
export PREFECT_UI_API_URL=$PREFECT_API_URL
export MLFLOW_TRACKING_URI=http://$HOST:$MLFLOW_PORT

die() { echo "local-stack: $*" >&2; exit 1; }

alive() { kill -0 "$1" 2>/dev/null; }

# Each service runs in its own session (setsid), so its PID is also its process-group id and `stop` ends the
# service with its children (uvicorn workers, flow-run subprocesses) and nothing else.
start_bg() {
  local name=$1; shift
  setsid "$@" >"$STACK_DIR/$name.log" 2>&1 </dev/null &
  echo "$name $!" >>"$PIDS"
}

wait_http() {  # url, seconds, name
  local url=$1 limit=$2 name=$3 t=0
  until "$BIN/python" - "$url" <<'EOF' 2>/dev/null
import sys, urllib.request
urllib.request.urlopen(sys.argv[1], timeout=2).read()
EOF
  do
    t=$((t + 1))
    if [ "$t" -ge "$((limit * 2))" ]; then
      tail -n 20 "$STACK_DIR/$name.log" >&2 || true
      die "$name did not answer on $url within ${limit}s (log: $STACK_DIR/$name.log)"
    fi
    if ! alive "$(awk -v n="$name" '$1 == n {print $2}' "$PIDS")"; then
      tail -n 20 "$STACK_DIR/$name.log" >&2 || true
      die "$name exited (log: $STACK_DIR/$name.log)"
    fi
    sleep 0.5
  done
}

running() {
  [ -f "$PIDS" ] || return 1
  local name pid
  while read -r name pid; do alive "$pid" && return 0; done <"$PIDS"
  return 1
}

start() {
  local with_s3=0
  for arg in "$@"; do
    case $arg in
      --s3) with_s3=1 ;;
      *) die "unknown option $arg (start [--s3])" ;;
    esac
  done
  [ -x "$BIN/prefect" ] || die "no $BIN/prefect: create the venv first (make env)"
  running && die "already running (see $0 status; stop it with $0 stop)"
  local artifacts="$STACK_DIR/mlartifacts" env_s3=""
  [ "$with_s3" = 1 ] && artifacts="s3://$S3_BUCKET/mlflow"
  if [ -f "$STACK_DIR/mlflow.db" ] && [ -f "$ARTIFACTS_OF_DB" ] && [ "$(cat "$ARTIFACTS_OF_DB")" != "$artifacts" ]; then
    die "$STACK_DIR/mlflow.db keeps its artifacts in $(cat "$ARTIFACTS_OF_DB"), not $artifacts (its runs and models would lose them): start as before (with or without --s3, the same S3_BUCKET) or set another M1_STACK_DIR"
  fi
  mkdir -p "$STACK_DIR"
  : >"$PIDS"

  if [ "$with_s3" = 1 ]; then
    export AWS_ACCESS_KEY_ID=${AWS_ACCESS_KEY_ID:-testing} AWS_SECRET_ACCESS_KEY=${AWS_SECRET_ACCESS_KEY:-testing}
    export AWS_DEFAULT_REGION=${AWS_DEFAULT_REGION:-us-east-1}
    export AWS_ENDPOINT_URL=http://$HOST:$S3_PORT MLFLOW_S3_ENDPOINT_URL=http://$HOST:$S3_PORT
    export M1_RESULT_STORAGE=s3://$S3_BUCKET/prefect-results M1_CHECKPOINT_URI=s3://$S3_BUCKET/checkpoints
    start_bg s3 "$BIN/python" -m moto.server -H "$HOST" -p "$S3_PORT"
    wait_http "http://$HOST:$S3_PORT/" 60 s3
    "$BIN/python" -c "import boto3; boto3.client('s3').create_bucket(Bucket='$S3_BUCKET')"
    env_s3="export AWS_ACCESS_KEY_ID=$AWS_ACCESS_KEY_ID AWS_SECRET_ACCESS_KEY=$AWS_SECRET_ACCESS_KEY AWS_DEFAULT_REGION=$AWS_DEFAULT_REGION
export AWS_ENDPOINT_URL=$AWS_ENDPOINT_URL MLFLOW_S3_ENDPOINT_URL=$MLFLOW_S3_ENDPOINT_URL
export M1_RESULT_STORAGE=$M1_RESULT_STORAGE M1_CHECKPOINT_URI=$M1_CHECKPOINT_URI"
  fi

  start_bg prefect-server "$BIN/prefect" server start --host "$HOST" --port "$PREFECT_PORT"
  echo "$artifacts" >"$ARTIFACTS_OF_DB"
  start_bg mlflow "$BIN/mlflow" server --backend-store-uri "sqlite:///$STACK_DIR/mlflow.db" \
    --artifacts-destination "$artifacts" --host "$HOST" --port "$MLFLOW_PORT" --workers 1
  wait_http "http://$HOST:$PREFECT_PORT/api/health" 180 prefect-server
  "$BIN/prefect" --no-prompt work-pool create m1-process --type process --overwrite >/dev/null
  # The deployments point their working directory at the repo root ({{ $PWD }} in prefect.yaml).
  (cd "$ROOT" && "$BIN/prefect" --no-prompt deploy --all >"$STACK_DIR/deploy.log" 2>&1) ||
    { tail -n 30 "$STACK_DIR/deploy.log" >&2; die "prefect deploy failed (log: $STACK_DIR/deploy.log)"; }
  (cd "$ROOT" && start_bg worker "$BIN/prefect" worker start --pool m1-process --type process --name m1-local-worker)
  wait_http "http://$HOST:$MLFLOW_PORT/health" 120 mlflow
  # The pipeline's experiment, made now (tagged as model training) so that its address can be printed below.
  local exp_id
  exp_id=$(cd "$ROOT" && "$BIN/python" -c "from components.config import load_config
from components.tracking import ensure_experiment, tracking_uri
t = load_config().tracking
print(ensure_experiment(t, tracking_uri(t)))" 2>"$STACK_DIR/experiment.log" | tail -n 1) ||
    { tail -n 20 "$STACK_DIR/experiment.log" >&2; die "could not create the MLflow experiment (log: $STACK_DIR/experiment.log)"; }

  cat >"$STACK_DIR/env.sh" <<EOF
# source this to point the prefect/mlflow/m1 commands at the local stack; the venv's bin comes first on PATH
case ":\$PATH:" in *":$BIN:"*) ;; *) PATH="$BIN:\$PATH" ;; esac
export PATH
export PREFECT_API_URL=$PREFECT_API_URL
export MLFLOW_TRACKING_URI=$MLFLOW_TRACKING_URI
export MLFLOW_DISABLE_TELEMETRY=true DO_NOT_TRACK=true DVC_NO_ANALYTICS=1 PREFECT_SERVER_ANALYTICS_ENABLED=false
export RAY_USAGE_STATS_ENABLED=0 HF_HUB_DISABLE_TELEMETRY=1
$env_s3
EOF
  echo "local stack up (PIDs in $PIDS, logs in $STACK_DIR):"
  echo "  Prefect UI  http://$HOST:$PREFECT_PORT   (work pool m1-process, worker m1-local-worker)"
  echo "  MLflow UI   $MLFLOW_TRACKING_URI/#/experiments/$exp_id?workflowType=machine_learning   (artifacts: $artifacts)"
  if [ "$with_s3" = 1 ]; then
    echo "  S3 (moto)   http://$HOST:$S3_PORT   bucket $S3_BUCKET   (in memory: stop empties it)"
  fi
  echo "next, run the pipeline through it:"
  echo "  source $STACK_DIR/env.sh && prefect deployment run m1-pipeline/local -p profile=tiny --watch"
}

stop() {
  [ -f "$PIDS" ] || { echo "local stack: nothing recorded in $PIDS"; return 0; }
  local name pid t
  # reverse order: the worker before the server it reports to
  tac "$PIDS" | while read -r name pid; do
    if alive "$pid"; then
      kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true
      for t in $(seq 1 40); do alive "$pid" || break; sleep 0.25; done
      if alive "$pid"; then kill -KILL -- "-$pid" 2>/dev/null || kill -KILL "$pid" 2>/dev/null || true; fi
      echo "stopped $name ($pid)"
    fi
  done
  rm -f "$PIDS"
}

status() {
  [ -f "$PIDS" ] || { echo "local stack: not started"; return 1; }
  local name pid rc=0
  while read -r name pid; do
    if alive "$pid"; then echo "$name: running ($pid)"; else echo "$name: dead ($pid)"; rc=1; fi
  done <"$PIDS"
  return $rc
}

case ${1:-} in
  start) shift; start "$@" ;;
  stop) stop ;;
  status) status ;;
  *) echo "usage: $0 start [--s3] | stop | status" >&2; exit 2 ;;
esac

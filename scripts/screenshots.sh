#!/usr/bin/env bash
# Screenshots of the Prefect and MLflow UIs for docs/ui.md (and the README), taken with headless Chromium:
#
#   bash scripts/screenshots.sh            # writes docs/images/{prefect_*,mlflow_*}.png
#
# 1. Chromium: uses chromium-headless-shell (or chromium); when neither is installed it installs
#    chromium-headless-shell with apt-get when run as root, else stops with the line to run.
# 2. The stack: with PREFECT_API_URL and MLFLOW_TRACKING_URI set and answering (`source runs/stack/env.sh` after
#    `infra/local-stack.sh start`) it uses that stack; otherwise it starts its own with infra/local-stack.sh in
#    runs/screenshots/ (its own PREFECT_HOME and MLflow database, so the UIs show only this run; ports
#    PREFECT_PORT 4280 and MLFLOW_PORT 5080) and stops it at the end, by the PIDs local-stack.sh recorded.
# 3. A tiny run of the deployment m1-pipeline/local (profile tiny, run_dir runs/screenshots/run, or with a running
#    stack runs/screenshot-runs/run-<time>, so that no stage comes from the cache), watched to its end.
# 4. scripts/screenshots.py finds the flow run, a task run with artifacts and the registered model version through
#    the Prefect and MLflow clients and saves the pages as PNGs (each checked not to be blank, under 400 KB).
#
# OUT (default docs/images) moves the images. With its own stack it removes runs/screenshots/ at the end (the run's
# outputs and the stack's databases, ~900 MB) unless SCREENSHOTS_KEEP=1; on failure it leaves them for the logs.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BIN=${M1_VENV:-$ROOT/.venv}/bin
OUT=${OUT:-$ROOT/docs/images}
WORK=$ROOT/runs/screenshots
started=$(date +%s)

export MLFLOW_DISABLE_TELEMETRY=true DO_NOT_TRACK=true DVC_NO_ANALYTICS=1 PREFECT_SERVER_ANALYTICS_ENABLED=false \
       RAY_USAGE_STATS_ENABLED=0 HF_HUB_DISABLE_TELEMETRY=1

die() { echo "screenshots: $*" >&2; exit 1; }

[ -x "$BIN/python" ] || die "no $BIN/python: create the venv first (make env)"
"$BIN/python" -c "import PIL" 2>/dev/null || die "Pillow is missing from the venv: $BIN/pip install pillow"

# --- 1. Chromium ---------------------------------------------------------------------------------------------------
chromium=""
for name in chromium-headless-shell chromium chromium-browser google-chrome; do
  if command -v "$name" >/dev/null 2>&1; then chromium=$(command -v "$name"); break; fi
  if [ -x "/usr/bin/$name" ]; then chromium=/usr/bin/$name; break; fi
done
if [ -z "$chromium" ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "screenshots: installing chromium-headless-shell (apt-get)"
    DEBIAN_FRONTEND=noninteractive apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium-headless-shell >/dev/null ||
      die "apt-get could not install chromium-headless-shell (Debian bookworm and later have it; elsewhere install chromium)"
    chromium=/usr/bin/chromium-headless-shell
  else
    die "no headless Chromium: install it (Debian/Ubuntu: sudo apt-get install chromium-headless-shell, or chromium)"
  fi
fi
echo "screenshots: $("$chromium" --version 2>/dev/null | head -n 1)"

# --- 2. the stack --------------------------------------------------------------------------------------------------
answers() { "$BIN/python" -c "import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=3).read()" "$1" \
              >/dev/null 2>&1; }

own_stack=0
if [ -n "${PREFECT_API_URL:-}" ] && [ -n "${MLFLOW_TRACKING_URI:-}" ] && answers "$PREFECT_API_URL/health" &&
   answers "$MLFLOW_TRACKING_URI/health"; then
  echo "screenshots: using the running stack (Prefect $PREFECT_API_URL, MLflow $MLFLOW_TRACKING_URI)"
else
  export M1_STACK_DIR=$WORK/stack PREFECT_HOME=$WORK/prefect-home
  export PREFECT_PORT=${PREFECT_PORT:-4280} MLFLOW_PORT=${MLFLOW_PORT:-5080}
  if "$ROOT/infra/local-stack.sh" status >/dev/null 2>&1; then
    die "a screenshot stack is already running from $M1_STACK_DIR: M1_STACK_DIR=$M1_STACK_DIR infra/local-stack.sh stop"
  fi
  rm -rf "$WORK"  # a fresh Prefect database and MLflow store: the UIs show this run only
  mkdir -p "$WORK"
  own_stack=1
  trap '"$ROOT/infra/local-stack.sh" stop >/dev/null || true' EXIT
  echo "screenshots: starting a stack in $M1_STACK_DIR (Prefect :$PREFECT_PORT, MLflow :$MLFLOW_PORT)"
  "$ROOT/infra/local-stack.sh" start >"$WORK/stack-start.log" 2>&1 ||
    { tail -n 20 "$WORK/stack-start.log" >&2; die "infra/local-stack.sh start failed (log: $WORK/stack-start.log)"; }
  # shellcheck disable=SC1091
  source "$M1_STACK_DIR/env.sh"
fi

# --- 3. a tiny run through the deployment ---------------------------------------------------------------------------
# with someone's running stack the run's outputs stay after us, out of the folder the next own-stack run removes
if [ "$own_stack" = 1 ]; then run_dir=$WORK/run; else run_dir=$ROOT/runs/screenshot-runs/run-$(date +%Y%m%d-%H%M%S); fi
mkdir -p "$WORK"
log=$WORK/deployment-run.log
echo "screenshots: prefect deployment run m1-pipeline/local (profile tiny, run_dir ${run_dir#"$ROOT"/}) --watch"
t0=$(date +%s)
if ! (cd "$ROOT" && "$BIN/prefect" deployment run m1-pipeline/local --watch --watch-timeout 1800 \
        --params "{\"profile\": \"tiny\", \"overrides\": {\"run_dir\": \"$run_dir\"}}" >"$log" 2>&1); then
  tail -n 30 "$log" >&2
  die "the tiny deployment run did not complete (log: $log)"
fi
flow_run=$(grep -oE 'UUID: *[0-9a-f-]{36}' "$log" | head -n 1 | grep -oE '[0-9a-f-]{36}') ||
  die "no flow run id in the output of prefect deployment run (log: $log)"
echo "screenshots: flow run $flow_run completed in $(($(date +%s) - t0)) s"

# --- 4. the pictures -----------------------------------------------------------------------------------------------
(cd "$ROOT" && "$BIN/python" scripts/screenshots.py --prefect "$PREFECT_API_URL" --mlflow "$MLFLOW_TRACKING_URI" \
   --flow-run "$flow_run" --out "$OUT")

if [ "$own_stack" = 1 ]; then
  "$ROOT/infra/local-stack.sh" stop
  trap - EXIT
  # the run's outputs, checkpoints and MLflow store (~900 MB): only the pictures were wanted
  if [ "${SCREENSHOTS_KEEP:-0}" = 1 ]; then echo "screenshots: kept ${WORK#"$ROOT"/}"; else rm -rf "$WORK"; fi
else
  echo "screenshots: the run's outputs stay in ${run_dir#"$ROOT"/} (its MLflow runs and models point into them)"
fi
echo "screenshots: done in $(($(date +%s) - started)) s; images in ${OUT#"$ROOT"/}"

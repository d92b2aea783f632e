#!/usr/bin/env bash
# The pipeline on one GPU node without internet, from a checkout of this repo and the wheelhouse installed by
# `python3 infra/offline/wheelhouse.py install ... --target $M1_SITE`:
#   infra/offline/node-pipeline.sh start PROFILE [m1 pipeline args]   a local Ray head with every GPU of the node,
#        then the Prefect flow `m1-pipeline` detached (it outlives the shell; log and exit status under the run dir)
#   infra/offline/node-pipeline.sh branches PROFILE [m1 pipeline args]  the same, the arms' branches at once: curate,
#        then one flow run per branch (M1_BRANCHES, default "grpo transformer_grpo": each run takes its target and
#        what it depends on), side by side on the node's GPUs, then the whole flow, which finds them in the cache.
#        The m1 pipeline args go to every run; a --stages among them limits the last one only (curate and each
#        branch run their own stages)
#   infra/offline/node-pipeline.sh bench PROFILE COMMAND [ARGS...]   the same head and stores, COMMAND detached in place
#        of the flow (e.g. python3 bench/distill_recovery.py --parallel 2 ...: flow runs that share the head's GPUs)
#   infra/offline/node-pipeline.sh wait PROFILE SECONDS              wait for it, print the log's tail
#   infra/offline/node-pipeline.sh report PROFILE OUT.json            the run's record (bench/gpu_pipeline_report.py)
#   infra/offline/node-pipeline.sh stop                              stop the Ray head started here (its process session)
# Started again after an interruption, the flow skips finished stages (Prefect cache) and training resumes from
# its checkpoints. MLflow: sqlite under the run dir (runs/<profile>/mlflow.db, artifacts beside it).
# M1_RAY_HEAD=0: no head; the flow starts a Ray instance of its own on 127.0.0.1 (components/ray_utils.py).
# The head binds the node's address (Ray maps 127.0.0.1 to it): meant for a node on a private network.
set -euo pipefail
cd "$(dirname "$0")/../.."
site=${M1_SITE:-/var/tmp/m1-site}
py=${M1_PYTHON:-python3}
export PYTHONPATH=$PWD:$site${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
export MLFLOW_DISABLE_TELEMETRY=true DO_NOT_TRACK=true DVC_NO_ANALYTICS=1 PREFECT_SERVER_ANALYTICS_ENABLED=false \
       RAY_USAGE_STATS_ENABLED=0 HF_HUB_DISABLE_TELEMETRY=1
port=${M1_RAY_PORT:-6379}
# `ray start` turns token authentication on (the token lands in ~/.ray/auth_token); its clients must ask for it.
export RAY_AUTH_MODE=${RAY_AUTH_MODE:-token}
state=runs/node

case "${1:-}" in
start|branches|bench)
  mode=$1
  profile=${2:?usage: node-pipeline.sh $mode PROFILE [m1 pipeline args | COMMAND]}; shift 2
  if [ "$mode" = bench ] && [ $# -eq 0 ]; then echo "usage: node-pipeline.sh bench PROFILE COMMAND [ARGS...]" >&2; exit 2; fi
  run_dir=$("$py" -c "from components.config import load_config as c; print(c('$profile').run_dir)")
  mkdir -p "$run_dir" "$state"
  if [ "${M1_RAY_HEAD:-1}" = 1 ]; then
    if ! { [ -f "$state/ray.sid" ] && pgrep -s "$(cat "$state/ray.sid")" >/dev/null; }; then
      gpus=$("$py" -c "import torch; print(torch.cuda.device_count())")
      # With RAY_AUTH_MODE=token set, `ray start` expects a token to exist already: make one on first use.
      if [ "$RAY_AUTH_MODE" = token ] && [ -z "${RAY_AUTH_TOKEN:-}" ] && [ ! -f "${RAY_AUTH_TOKEN_PATH:-$HOME/.ray/auth_token}" ]; then
        "$py" -c 'import sys; from ray.scripts.scripts import main; sys.argv[0] = "ray"; sys.exit(main())' \
          get-auth-token --generate > /dev/null
      fi
      # its own session, so `stop` ends exactly the processes it started (pkill -s)
      setsid "$py" -c 'import sys; from ray.scripts.scripts import main; sys.argv[0] = "ray"; sys.exit(main())' \
        start --head --port "$port" --num-gpus "$gpus" --include-dashboard=false --disable-usage-stats \
        > "$state/ray-start.log" 2>&1 &
      echo $! > "$state/ray.sid"
      wait $! || { tail -n 5 "$state/ray-start.log" >&2; exit 1; }
      echo "Ray head on port $port with $gpus GPU(s), session $(cat "$state/ray.sid")"
    fi
    export RAY_ADDRESS=127.0.0.1:$port
  fi
  export PREFECT_HOME=$PWD/$run_dir/prefect
  export MLFLOW_TRACKING_URI=${MLFLOW_TRACKING_URI:-sqlite:///$PWD/$run_dir/mlflow.db}
  rm -f "$run_dir/pipeline.rc"
  printf -v m1 '%q ' "$py" -m components.cli pipeline --profile "$profile"
  args=""; [ $# -eq 0 ] || printf -v args '%q ' "$@"
  cmd="$m1 --summary-json $run_dir/pipeline_summary.json $args"
  if [ "$mode" = bench ]; then printf -v cmd '%q ' "$@"; fi
  if [ "$mode" = branches ]; then
    # Each branch is its own flow run (its own MLflow parent run) on the shared Prefect and MLflow stores; curate
    # runs first so that the branches only read it. A failed branch stops the whole run before the last flow.
    branches=() pids=""
    for target in ${M1_BRANCHES:-grpo transformer_grpo}; do
      branches+=("$m1 $args --stages $target --summary-json $run_dir/branch-$target.json > $run_dir/branch-$target.log 2>&1 & pids=\"\$pids \$!\"")
    done
    cmd="$m1 $args --stages curate && { pids=''; $(printf '%s; ' "${branches[@]}") ok=0; \
for p in \$pids; do wait \$p || ok=1; done; [ \$ok = 0 ]; } && $cmd"
  fi
  setsid nohup bash -c "$cmd; echo \$? > $run_dir/pipeline.rc" >> "$run_dir/pipeline.log" 2>&1 < /dev/null &
  echo "started: $cmd (log $run_dir/pipeline.log)" ;;
wait)
  profile=${2:?usage: node-pipeline.sh wait PROFILE SECONDS}; limit=${3:?usage: node-pipeline.sh wait PROFILE SECONDS}
  run_dir=$("$py" -c "from components.config import load_config as c; print(c('$profile').run_dir)")
  end=$((SECONDS + limit))
  while [ ! -f "$run_dir/pipeline.rc" ] && [ "$SECONDS" -lt "$end" ]; do sleep 5; done
  # a full disk ends a run without a word of its own (a node that filled its 128 GB stopped answering)
  df -Ph "$run_dir" | awk 'NR == 2 {print "disk under the run dir: " $4 " free of " $2}' || true
  tail -n "${M1_TAIL:-25}" "$run_dir/pipeline.log" || true
  if [ -f "$run_dir/pipeline.rc" ]; then echo "finished with exit status $(cat "$run_dir/pipeline.rc")"
  else echo "still running"; fi ;;
report)
  profile=${2:?usage: node-pipeline.sh report PROFILE OUT.json}; out=${3:?usage: node-pipeline.sh report PROFILE OUT.json}
  "$py" bench/gpu_pipeline_report.py --profile "$profile" --out "$out" ;;
stop)
  if [ -f "$state/ray.sid" ]; then
    sid=$(cat "$state/ray.sid"); pkill -s "$sid" || true; sleep 3; pkill -9 -s "$sid" || true; rm -f "$state/ray.sid"
    # what `ray stop` would clear: the address file that would point later clients at the stopped head
    grep -qs ":$port\$" /tmp/ray/ray_current_cluster && rm -f /tmp/ray/ray_current_cluster
  fi ;;
*) sed -n 2,15p "$0" >&2; exit 2 ;;
esac

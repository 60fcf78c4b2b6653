#!/usr/bin/env bash
# Work through experiments/converged.py's plan with WORKERS processes for at most SECONDS:
#
#   experiments/workers.sh WORKERS SECONDS LOGS [converged.py arguments ...]
#
# Workers split the plan by the runs' claims (lab/records.py), each writing its log to LOGS/worker-<i>.log.
# At the deadline the runs still going are stopped; each keeps the training state of its last evaluation under
# --cache, and the same command resumes it.  Prints the records written and, for each worker whose last line is not
# one, that line (where its run got to, or why it failed).
#
# With --device cuda the workers share one GPU.  The converged models are small (about 1M parameters): one process
# keeps a GPU mostly idle, waiting on Python and kernel launches.  Through MPS (started here when the driver has it,
# stopped on exit) the workers' kernels run side by side; without it they take turns.
set -uo pipefail
if [ $# -lt 3 ]; then
    echo "usage: $0 WORKERS SECONDS LOGS [converged.py arguments ...]" >&2
    exit 2
fi
workers=$1 seconds=$2 logs=$3
shift 3
cd "$(dirname "$0")/.."
mkdir -p "$logs"
python=${PYTHON:-python3}
export PYTHONUNBUFFERED=1

mps=off
if [[ " $* " == *" --device cuda"* ]] && command -v nvidia-cuda-mps-control >/dev/null; then
    export CUDA_MPS_PIPE_DIRECTORY=/tmp/acr-mps CUDA_MPS_LOG_DIRECTORY=/tmp/acr-mps-log
    mkdir -p "$CUDA_MPS_PIPE_DIRECTORY" "$CUDA_MPS_LOG_DIRECTORY"
    if nvidia-cuda-mps-control -d && timeout 60 "$python" -c "import torch; torch.ones(1, device='cuda').sum().item()"; then
        mps=on
    else
        echo quit | nvidia-cuda-mps-control 2>/dev/null
        unset CUDA_MPS_PIPE_DIRECTORY CUDA_MPS_LOG_DIRECTORY
    fi
fi
trap '[ "$mps" = on ] && echo quit | nvidia-cuda-mps-control' EXIT
echo "workers: $workers for ${seconds}s, MPS $mps"

start=$(date +%s)
in_time() { [ $(($(date +%s) - start)) -lt "$seconds" ]; }
pids=()
for i in $(seq 1 "$workers"); do
    "$python" experiments/converged.py "$@" >"$logs/worker-$i.log" 2>&1 &
    pids+=($!)
    # The first worker alone until it starts training: it writes the caches (datasets', the tokenizer) the others read.
    while [ "$i" -eq 1 ] && kill -0 "${pids[0]}" 2>/dev/null && ! grep -q ": training" "$logs/worker-1.log" && in_time; do
        sleep 1
    done
done
while in_time; do
    running=0
    for pid in "${pids[@]}"; do kill -0 "$pid" 2>/dev/null && running=$((running + 1)); done
    [ "$running" -eq 0 ] && break
    sleep 5
done
for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null; done
wait
echo "workers: stopped after $(($(date +%s) - start))s"
grep -h -- "-> " "$logs"/worker-*.log
for log in "$logs"/worker-*.log; do
    grep -q -- "-> " <(tail -n 1 "$log") || echo "$(basename "$log"): $(tail -n 1 "$log")"
done

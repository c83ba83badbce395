#!/usr/bin/env bash
# Runs a queue of training runs one after another (the measured runs of experiments/README_lm.md).
#
#   nohup flock /tmp/linattn_lm.lock bash experiments/lm/run_queue.sh runs/lm/queue.txt > runs/lm/queue.log 2>&1 &
#
# Each non-comment line of the queue file is "RUN_NAME ARGS...": it runs
#   python -m experiments.lm train --run-dir runs/lm/RUN_NAME ARGS... --threads $LM_THREADS --no-progress --resume
# (log in runs/lm/RUN_NAME/log.txt) unless runs/lm/RUN_NAME/results.json exists (done) or FAILED does.
# The file is re-read after every run, so lines can be appended while it works; with nothing left it
# waits, and it exits once runs/lm/queue.stop exists and nothing is left.
set -uo pipefail
cd "$(dirname "$0")/../.."
queue="$1"
root="${LM_RUNS:-runs/lm}"
threads="${LM_THREADS:-1}"
while true; do
    next=""
    while read -r name args; do
        [[ -z "$name" || "$name" == \#* ]] && continue
        [[ -f "$root/$name/results.json" || -f "$root/$name/FAILED" ]] && continue
        next="$name $args"
        break
    done < "$queue"
    if [[ -z "$next" ]]; then
        [[ -f "$root/queue.stop" ]] && break
        sleep 20
        continue
    fi
    read -r name args <<< "$next"
    mkdir -p "$root/$name"
    echo "$(date -u +%FT%TZ) start $name $args"
    # shellcheck disable=SC2086
    if python -m experiments.lm train --run-dir "$root/$name" $args --threads "$threads" --no-progress --resume \
        >> "$root/$name/log.txt" 2>&1; then
        echo "$(date -u +%FT%TZ) done  $name: $(tail -n 1 "$root/$name/log.txt")"
    else
        echo "$(date -u +%FT%TZ) FAILED $name (see $root/$name/log.txt)"
        touch "$root/$name/FAILED"
    fi
done
echo "$(date -u +%FT%TZ) queue finished"

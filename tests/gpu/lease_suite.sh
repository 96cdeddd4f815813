#!/usr/bin/env bash
# On the lent GPU machine, where one call is cut at 10 minutes and a later call re-syncs the working
# tree: the GPU suite (run_gpu_tests.sh) in the background from a copy of the project in $HOME, and
# a poll that packs what it wrote into $OUT.
#
#   bash tests/gpu/lease_suite.sh start [LIMIT_S]  copy the project (with the carried .whl/) to
#                                                  ~/suite and start the suite there in a new process
#                                                  session, which outlives the call; LIMIT_S per
#                                                  stream (default 600)
#   bash tests/gpu/lease_suite.sh wait SECONDS     poll until the suite ends or SECONDS pass, print
#                                                  the tail of its log, pack ~/suite_out, the log and
#                                                  the exit status into $OUT/suite.tgz
#
# Transformer Engine, megatron-core and pytest must be importable through PYTHONPATH, which `start`
# passes on. Run the suite alone on the GPU: beside the quality study's jobs it ran out of memory.
set -euo pipefail
cd "$(dirname "$0")/../.."
pid_file=$HOME/suite.pid
running() { [ -f "$pid_file" ] && kill -0 "$(cat "$pid_file")" 2>/dev/null; }
case "${1:-}" in
start)
    if running; then
        echo "error: the GPU suite is already running (pid $(cat "$pid_file"))" >&2
        exit 2
    fi
    rm -rf "$HOME/suite" "$HOME/suite_out" "$HOME/suite.rc" "$HOME/suite_scratch"
    mkdir -p "$HOME/suite"
    cp -r . "$HOME/suite/"
    cd "$HOME/suite"
    LIGHTHOUSE_GPU_SCRATCH=$HOME/suite_scratch setsid nohup bash -c \
        'bash tests/gpu/run_gpu_tests.sh "$1" "$2"; echo $? > "$3"' _ \
        "$HOME/suite_out" "${2:-600}" "$HOME/suite.rc" > "$HOME/suite.log" 2>&1 < /dev/null &
    echo $! > "$pid_file"
    echo "started the GPU suite (pid $!) in $HOME/suite; poll with: bash tests/gpu/lease_suite.sh wait SECONDS"
    ;;
wait)
    seconds=${2:?usage: bash tests/gpu/lease_suite.sh wait SECONDS}
    until=$(( $(date +%s) + seconds ))
    while running && [ "$(date +%s)" -lt "$until" ]; do sleep 5; done
    if running; then echo "suite: running"; else echo "suite: ended, exit status $(cat "$HOME/suite.rc" 2>/dev/null || echo unknown)"; fi
    tail -n 40 "$HOME/suite.log" 2>/dev/null || true
    if [ -n "${OUT:-}" ]; then
        files=$(cd "$HOME" && ls -d suite_out suite.log suite.rc 2>/dev/null || true)
        [ -z "$files" ] || tar czf "$OUT/suite.tgz" -C "$HOME" $files
    fi
    ;;
*)
    echo "error: usage: bash tests/gpu/lease_suite.sh start [LIMIT_S] | wait SECONDS" >&2
    exit 2
    ;;
esac

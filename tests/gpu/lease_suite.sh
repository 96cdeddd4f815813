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
# passes on. `start` refuses (exit 2, nothing started) where Transformer Engine does not import or
# a tag's Megatron-LM archive is missing, since the tests that need them would only skip: carry
# .whl/ in the call that starts it (or copy it back from where an earlier call put it).
# LIGHTHOUSE_SUITE_PARTIAL=1 starts it anyway (what this machine lacks skips with its reason).
# Run the suite alone on the GPU: beside the quality study's jobs it ran out of memory.
set -euo pipefail
cd "$(dirname "$0")/../.."
pid_file=$HOME/suite.pid
running() { [ -f "$pid_file" ] && kill -0 "$(cat "$pid_file")" 2>/dev/null; }
lacking() {  # what the suite needs and this machine lacks, one line each
    local tag dir
    for tag in core_v0.16.1 core_v0.19.0; do
        for dir in "${MEGATRON_LM_ARCHIVES:-}" .whl/megatron-lm ../shared/megatron-lm; do
            [ -n "$dir" ] && [ -f "$dir/megatron-lm-$tag.tgz" ] && continue 2
        done
        echo "  megatron-lm-$tag.tgz: not in \$MEGATRON_LM_ARCHIVES, .whl/megatron-lm or ../shared/megatron-lm" \
             "(carry .whl/, see tests/gpu/run_megatron_lm.sh)"
    done
    python3 -c "import transformer_engine.pytorch" > /dev/null 2>&1 \
        || echo "  Transformer Engine: 'import transformer_engine.pytorch' fails with PYTHONPATH=${PYTHONPATH:-}"
}
case "${1:-}" in
start)
    if running; then
        echo "error: the GPU suite is already running (pid $(cat "$pid_file"))" >&2
        exit 2
    fi
    missing=$(lacking)
    if [ -n "$missing" ] && [ "${LIGHTHOUSE_SUITE_PARTIAL:-0}" != 1 ]; then
        printf 'error: the GPU suite would skip the tests that need:\n%s\n' "$missing" >&2
        echo "nothing started; provide them, or set LIGHTHOUSE_SUITE_PARTIAL=1 to run what this machine can" >&2
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

# shellcheck shell=bash
# Sourced first by run_evidence.sh and run_quality.sh. Defines:
#   start_run NAME OUT_DIR SUBDIR...  check the command line (one OUT_DIR; "$#" passed first),
#                                    refuse an OUT_DIR that already holds this run, create
#                                    OUT_DIR/SUBDIR... and OUT_DIR/evidence_run, go to the
#                                    repository root, set PYTHONPATH, PY (the interpreter,
#                                    $PYTHON or python3) and LH (the bench command), save
#                                    nvidia-smi's output and open the JSON manifest
#                                    OUT_DIR/evidence_run/NAME.json (written as NAME.json.tmp)
#   step DIR NAME LIMIT COMMAND...   run COMMAND under a limit of LIMIT seconds, its log in
#                                    OUT/DIR/NAME.log, and record its exit code and seconds
#   manifest_close                   finish the manifest and move it into place
#   finish_run                       manifest_close, then OUT_DIR/DONE (every step exited 0) or
#                                    OUT_DIR/FAILED (naming the steps that did not)

start_run() {
    local name=$1 nargs=$2 dir
    shift 2
    if [ "$nargs" -ne 1 ]; then
        echo "error: usage: bash benchmarks/$name.sh OUT_DIR" >&2
        exit 2
    fi
    OUT=$(realpath -m "$1")
    shift
    MANIFEST_FINAL="$OUT/evidence_run/$name.json"
    MANIFEST="$MANIFEST_FINAL.tmp"
    for dir in "$@"; do
        if [ -e "$MANIFEST_FINAL" ] || [ -e "$MANIFEST" ] || [ -n "$(ls -A "$OUT/$dir" 2>/dev/null)" ]; then
            echo "error: $OUT already holds a $name run ($OUT/$dir); choose a new folder" >&2
            exit 2
        fi
    done
    for dir in "$@" evidence_run; do
        mkdir -p "$OUT/$dir" || exit 2
    done
    cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 2
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
    PY=${PYTHON:-python3}
    # shellcheck disable=SC2034  # used by the scripts that source this file
    LH=("$PY" -m lighthouse_megatron.cli bench)
    FAILED_STEPS=()
    nvidia-smi > "$OUT/evidence_run/nvidia-smi-$name.txt" 2>&1
    echo "[" > "$MANIFEST"
    FIRST=1
}

manifest_close() {
    echo "]" >> "$MANIFEST"
    mv "$MANIFEST" "$MANIFEST_FINAL"
}

step() {
    local log="$OUT/$1/$2.log" name=$2 limit=$3
    shift 3
    echo "=== $name (limit ${limit}s): $*" | tee "$log"
    local t0=$SECONDS rc
    timeout --kill-after=15 "$limit" "$@" >> "$log" 2>&1
    rc=$?
    [ "$rc" -eq 0 ] || FAILED_STEPS+=("$name (exit $rc)")
    tail -n 25 "$log"
    echo "=== $name: exit $rc after $((SECONDS - t0)) s"
    [ "$FIRST" -eq 1 ] || echo "," >> "$MANIFEST"
    FIRST=0
    "$PY" -c 'import json, sys; print(json.dumps({"step": sys.argv[1], "rc": int(sys.argv[2]),
        "seconds": int(sys.argv[3]), "limit_s": int(sys.argv[4]), "command": sys.argv[5:]}))' \
        "$name" "$rc" "$((SECONDS - t0))" "$limit" "$@" >> "$MANIFEST"
}

finish_run() {
    [ -e "$MANIFEST" ] && manifest_close
    if [ "${#FAILED_STEPS[@]}" -eq 0 ]; then
        date -u +%FT%TZ > "$OUT/DONE"
    else
        printf '%s\n' "${FAILED_STEPS[@]}" > "$OUT/FAILED"
    fi
}

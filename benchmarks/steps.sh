# shellcheck shell=bash
# Sourced by run_evidence.sh and run_quality.sh from the repository root (needs OUT set). Sets
# PYTHONPATH to the repository, PY (the interpreter, $PYTHON or python3) and LH (the bench
# command), and defines:
#   manifest_open FILE               start a JSON manifest of the steps (written as FILE.tmp)
#   step DIR NAME LIMIT COMMAND...   run COMMAND under a limit of LIMIT seconds, its log in
#                                    OUT/DIR/NAME.log, and record its exit code and seconds
#   manifest_close                   finish the manifest and move it to FILE

export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-python3}
# shellcheck disable=SC2034  # used by the scripts that source this file
LH=("$PY" -m lighthouse_megatron.cli bench)

manifest_open() {
    MANIFEST_FINAL=$1
    MANIFEST="$1.tmp"
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
    tail -n 25 "$log"
    echo "=== $name: exit $rc after $((SECONDS - t0)) s"
    [ "$FIRST" -eq 1 ] || echo "," >> "$MANIFEST"
    FIRST=0
    "$PY" -c 'import json, sys; print(json.dumps({"step": sys.argv[1], "rc": int(sys.argv[2]),
        "seconds": int(sys.argv[3]), "limit_s": int(sys.argv[4]), "command": sys.argv[5:]}))' \
        "$name" "$rc" "$((SECONDS - t0))" "$limit" "$@" >> "$MANIFEST"
}

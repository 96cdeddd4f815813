"""tests/gpu/run_gpu_tests.sh splits the GPU tests into streams. The script checks after a GPU run
that every collected GPU test ran in some stream; this checks the same on the CPU, in CI, before
device time is spent (a GPU run of 2026-12-07 found two test files in no stream)."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "tests" / "gpu" / "run_gpu_tests.sh"


def streams() -> dict[str, tuple[list[str], str | None]]:
    """name -> (test files, -k expression or None), from the script's `stream NAME GPUS ARGS...` lines."""
    text = SCRIPT.read_text().replace("\\\n", " ")
    variables = dict(re.findall(r"^(\w+)=(tests/\S+)$", text, re.M))
    out = {}
    for name, rest in re.findall(r"^stream (\S+) \S+ (.+)$", text, re.M):
        files, expr, args = [], None, iter(shlex.split(rest))
        for arg in args:
            if arg == "-k":
                expr = next(args)
            else:
                files.append(variables[arg[1:]] if arg.startswith("$") else arg)
        out[name] = (files, expr)
    return out


def selects(nodeid: str, files: list[str], expr: str | None) -> bool:
    """Whether `pytest FILES -k EXPR` runs `nodeid`: its file is listed and each word of EXPR is
    true when it is a case-insensitive substring of the id (pytest's -k on these ids)."""
    if nodeid.split("::")[0] not in files:
        return False
    if expr is None:
        return True
    words = {"and", "or", "not"}
    code = re.sub(r"[\w.]+", lambda m: m[0] if m[0] in words else str(m[0].lower() in nodeid.lower()), expr)
    return bool(eval(code, {"__builtins__": {}}))  # only True, False, and, or, not and brackets remain


def test_the_k_expressions_are_read_as_pytest_reads_them():
    nodeid = "tests/test_megatron_lm_gpu.py::test_megatron_lm_two_stages[core_v0.19.0-te]"
    files = ["tests/test_megatron_lm_gpu.py"]
    assert selects(nodeid, files, "not context_parallel and core_v0.19.0")
    assert not selects(nodeid, files, "two_stages and not core_v0.19.0")
    assert selects(nodeid, files, "recipe_variants or (TWO_STAGES and te)")
    assert not selects(nodeid, ["tests/test_ops.py"], None)


def test_every_gpu_test_runs_in_exactly_one_stream():
    command = [sys.executable, "-m", "pytest", "--collect-only", "-q", "-m", "gpu", "-p", "no:cacheprovider"]
    listed = subprocess.run([*command, "tests"], cwd=REPO, capture_output=True, text=True, check=True,
                            timeout=300).stdout
    collected = [line.strip() for line in listed.splitlines() if "::" in line]
    assert len(collected) > 40, listed[-2000:]
    split = streams()
    assert len(split) >= 10, split
    where = {t: [name for name, (files, expr) in split.items() if selects(t, files, expr)] for t in collected}
    assert [t for t, names in where.items() if not names] == [], "in no stream of run_gpu_tests.sh"
    assert {t: n for t, n in where.items() if len(n) > 1} == {}, "in more than one stream"
    empty = set(split) - {n for names in where.values() for n in names}
    assert not empty, f"streams that select no test: {sorted(empty)}"


def test_lease_suite_runs_the_suite_in_the_background_and_packs_its_outcome(tmp_path):
    """tests/gpu/lease_suite.sh on a copy of the project whose suite is a stand-in (it writes a report
    and exits 3 after a pause): `start` refuses where what the suite needs is lacking, returns at once
    and refuses a second start while the suite runs; `wait` waits for its end and packs the outputs,
    the log and the exit status into $OUT."""
    import os
    import shutil
    import tarfile

    project, home, out = tmp_path / "project", tmp_path / "home", tmp_path / "out"
    (project / "tests" / "gpu").mkdir(parents=True)
    home.mkdir()
    out.mkdir()
    shutil.copy(REPO / "tests" / "gpu" / "lease_suite.sh", project / "tests" / "gpu")
    (project / "tests" / "gpu" / "run_gpu_tests.sh").write_text(
        'sleep 2; mkdir -p "$1"; echo "PASSED limit $2 scratch $LIGHTHOUSE_GPU_SCRATCH" > "$1/unit.log"; '
        'echo suite ran in "$PWD"; exit 3\n')
    env = {**os.environ, "HOME": str(home), "OUT": str(out), "MEGATRON_LM_ARCHIVES": ""}

    def lease(*args):
        return subprocess.run(["bash", "tests/gpu/lease_suite.sh", *args], cwd=project, env=env,
                              capture_output=True, text=True, timeout=60)

    # Without the archives and Transformer Engine (this CPU machine) the tests needing them would only
    # skip: `start` names each thing lacking and starts nothing.
    refused = lease("start")
    assert refused.returncode == 2 and not list(home.iterdir()), refused.stdout
    for needed in ("megatron-lm-core_v0.16.1.tgz", "megatron-lm-core_v0.19.0.tgz", "Transformer Engine",
                   "LIGHTHOUSE_SUITE_PARTIAL=1"):
        assert needed in refused.stderr, refused.stderr
    archives = project / ".whl" / "megatron-lm"
    archives.mkdir(parents=True)
    (archives / "megatron-lm-core_v0.19.0.tgz").touch()
    (archives / "megatron-lm-core_v0.16.1.tgz").touch()
    assert "megatron-lm-core" not in lease("start").stderr  # found in .whl/; TE still lacking here
    env["LIGHTHOUSE_SUITE_PARTIAL"] = "1"
    started = lease("start", "77")
    assert started.returncode == 0 and "started the GPU suite" in started.stdout, started.stderr
    again = lease("start")
    assert again.returncode == 2 and "already running" in again.stderr
    waited = lease("wait", "30")
    assert waited.returncode == 0 and "suite: ended, exit status 3" in waited.stdout, waited.stdout
    assert f"suite ran in {home / 'suite'}" in waited.stdout  # the copy, not the synced tree
    with tarfile.open(out / "suite.tgz") as tar:
        assert sorted(tar.getnames()) == ["suite.log", "suite.rc", "suite_out", "suite_out/unit.log"]
        report = tar.extractfile("suite_out/unit.log").read().decode()
    assert report == f"PASSED limit 77 scratch {home / 'suite_scratch'}\n"
    assert lease("bogus").returncode == 2

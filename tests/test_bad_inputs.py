"""The bad-input table (issue 28): each input a new user tried that once ran silently, burnt
time or printed a raw traceback, with the one line it now prints before any work is done
(exit code 2; warnings exit 0 after the run). docs/bad-inputs.md shows the same messages:
the test reads its table and compares each row with what the command prints here."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

pytest.importorskip("megatron.core")

from lighthouse_megatron.cli import main  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "bad-inputs.md"
TINY = "--mock-data --num-layers 1 --hidden-size 32 --num-attention-heads 4 --seq-length 64 --eval-iters 0"
SLURM = "--checkpoint-root /c --megatron-lm /m --data-path /d"


def _yaml(text):
    def write(tmp: Path):
        (tmp / "run.yaml").write_text(text)
    return write


def _file(tmp: Path):
    (tmp / "file").write_text("not a folder\n")


def _checkpoints(tmp: Path):
    """A run folder with one checkpoint root in it, and an iteration folder."""
    (tmp / "runs" / "stage1").mkdir(parents=True)
    (tmp / "runs" / "stage1" / "latest_checkpointed_iteration.txt").write_text("2\n")
    (tmp / "runs" / "stage1" / "iter_0000002").mkdir()
    (tmp / "runs" / "stage1" / "iter_0000002" / "common.pt").write_bytes(b"")


def _forty_documents(tmp: Path):
    from lighthouse_megatron.data import prepare_data

    (tmp / "docs").mkdir()
    for i in range(40):
        (tmp / "docs" / f"{i}.txt").write_text(f"document {i}\n")
    prepare_data([tmp / "docs"], tmp / "forty", progress=False)


# id: (command line with TMP for a fresh folder, setup, exit code, whole message or, ending in
# "...", its machine-independent start)
CASES = {
    "lr-nan": (f"train {TINY} --lr nan", None, 2, "error: --lr must be a finite number, got nan"),
    "lr-inf": (f"train {TINY} --lr inf", None, 2, "error: --lr must be a finite number, got inf"),
    "dropout": (f"train {TINY} --hidden-dropout 1.5", None, 2,
                "error: --hidden-dropout must be in [0, 1), got 1.5"),
    "yaml-bool": ("train --config TMP/run.yaml", _yaml("mock_data: true\nswiglu: maybe\n"), 2,
                  "error: --config TMP/run.yaml: swiglu must be true or false (also yes/no, on/off), "
                  "got 'maybe'"),
    "yaml-number": ("train --config TMP/run.yaml", _yaml("mock_data: true\nlr: fast\n"), 2,
                    "error: --config TMP/run.yaml: lr must be a number, got 'fast'"),
    "load-typo": (f"train {TINY} --load TMP/chekpoints", None, 2,
                  "error: --load TMP/chekpoints does not exist; give the checkpoint directory to resume from "
                  "(an empty directory, or the --save directory, starts from scratch)"),
    "save-file": (f"train {TINY} --save TMP/file", _file, 2,
                  "error: --save TMP/file: TMP/file is not a directory"),
    "save-special": (f"train {TINY} --save /sys/lighthouse-run", None, 2,
                     "error: --save /sys/lighthouse-run: cannot create /sys/lighthouse-run (..."),
    "metrics-folder": (f"train {TINY} --metrics-file TMP", None, 2,
                       "error: --metrics-file TMP: TMP is not a regular file"),
    "metrics-device": (f"train {TINY} --metrics-file /dev/full", None, 2,
                       "error: --metrics-file /dev/full: /dev/full is not a regular file"),
    "metrics-default": (f"train {TINY} --save TMP", lambda tmp: (tmp / "metrics.jsonl").mkdir(), 2,
                        "error: --metrics-file TMP/metrics.jsonl: TMP/metrics.jsonl is not a regular file "
                        "(the default under --save TMP)"),
    "tensorboard-special": (f"train {TINY} --tensorboard-dir /proc/lighthouse-tb", None, 2,
                            "error: --tensorboard-dir /proc/lighthouse-tb: cannot create "
                            "/proc/lighthouse-tb (..."),
    "cache-file": (f"train {TINY} --data-cache-path TMP/file", _file, 2,
                   "error: --data-cache-path TMP/file: TMP/file is not a directory"),
    "data-weight": ("train --data-path -0.5 TMP/a 1.5 TMP/b", None, 2,
                    "error: --data-path weights must be positive numbers, got -0.5 1.5"),
    "seq-cpu": ("train --mock-data --device cpu --seq-length 1048576", None, 2,
                "error: --seq-length 1048576 on the CPU needs at least 32.0 TiB (the attention probabilities "
                "SDPA keeps for the backward pass: 2 dense layers x 4 heads x 1048576 x 1048576 fp32 per "
                "sample), more than this machine's ..."),
    "bf16-yaml": ("train --config examples/98k.yaml --mock-data --device cpu", None, 2,
                  "error: --bf16 needs --device cuda (CPU training runs in fp32); drop it or pass --no-bf16 "
                  "(bf16: true is in --config examples/98k.yaml)"),
    "topk-nearest": (f"train {TINY} --seq-length 512 --attention-impl lighthouse --lighthouse-tile-topk 8 "
                     "--lighthouse-topk 100", None, 2,
                     "error: --lighthouse-topk 100: lighthouse topk must be a positive multiple of "
                     "tile_topk=8, got 100; nearest valid: 32"),
    "topk-none": ("train --mock-data --attention-impl lighthouse", None, 2,
                  "error: --seq-length 256 with --lighthouse-levels 3 --lighthouse-pooling-factor 4 "
                  "--lighthouse-topk 2048 --lighthouse-tile-topk 128: lighthouse: each tile has only 1 "
                  "coarsest entries (sequence length 256 / pooling_factor**(levels-1)=16 / 16 tiles) but "
                  "tile_topk=128 are selected from them; no topk is valid with sequence length 256, "
                  "levels=3, pooling_factor=4 and tile_topk=128 (a tile keeps tile_topk=128 of the 16 "
                  "coarsest entries); change another setting: tile_topk=16 (then topk=16), levels=1 (dense "
                  "attention) or a sequence length that is a multiple of 2048 (then topk=128)"),
    "until-iter": (f"train {TINY} --train-iters 2 --attention-impl lighthouse --lighthouse-levels 2 "
                   "--lighthouse-topk 8 --lighthouse-tile-topk 4 --lighthouse-until-iter 5", None, 0,
                   "warning: --lighthouse-until-iter 5 is not below --train-iters 2: every iteration runs "
                   "Lighthouse attention and the dense recovery never happens in this run; set it below 2 "
                   "(the paper switches at 62.5%: 1), or relaunch with --attention-impl dense from a "
                   "checkpoint"),
    "slurm-time": (f"slurm render stage1 -o TMP/job.sbatch {SLURM} --time tomorrow", None, 2,
                   "error: stage1: time 'tomorrow' is not a Slurm time limit; use one of MINUTES, "
                   "MINUTES:SECONDS, HOURS:MINUTES:SECONDS, DAYS-HOURS, DAYS-HOURS:MINUTES, "
                   "DAYS-HOURS:MINUTES:SECONDS (e.g. 24:00:00 or 2-00:00:00)"),
    "slurm-output": (f"slurm render stage1 -o /sys/job.sbatch {SLURM}", None, 2,
                     "error: -o /sys/job.sbatch: cannot write in /sys (..."),
    "slurm-output-folder": (f"slurm render stage1 -o TMP {SLURM}", None, 2,
                            "error: -o TMP is a directory; name the script file to write"),
    "submit-no-sbatch": (f"slurm submit --output-dir TMP/jobs {SLURM}", None, 2,
                         "error: sbatch not found: submit needs Slurm's sbatch on PATH (nothing was written; "
                         "--dry-run writes the scripts and prints the commands)"),
    "demo-out": ("demo --out /sys/lighthouse-demo", None, 2,
                 "lighthouse-megatron demo: error: --out /sys/lighthouse-demo: cannot create "
                 "/sys/lighthouse-demo (..."),
    # The second hunt (2026-12-08).
    "adam-eps": (f"train {TINY} --adam-eps 0", None, 2, "error: --adam-eps must be > 0, got 0.0"),
    "init-std": (f"train {TINY} --init-method-std 0", None, 2,
                 "error: --init-method-std must be > 0, got 0.0"),
    "rope-odd": (f"train {TINY} --hidden-size 36", None, 2,
                 "error: --kv-channels 9 (the head dimension) must be even with --position-embedding-type "
                 "rope, which rotates pairs of channels; change --hidden-size / --num-attention-heads or "
                 "--kv-channels"),
    "warmup-init": (f"train {TINY} --lr-warmup-init 1e-3", None, 2,
                    "error: --lr-warmup-init 0.001 is above --lr 0.0003"),
    "yaml-null": ("train --config TMP/run.yaml", _yaml("mock_data: true\nnum_layers: null\n"), 2,
                  "error: --config TMP/run.yaml: num_layers must be set (leave it out for the default, 2), "
                  "got null"),
    "yaml-choice": ("train --config TMP/run.yaml", _yaml("mock_data: true\nattention_impl: sparse\n"), 2,
                    "error: --config TMP/run.yaml: attention_impl must be one of ['dense', 'lighthouse'], "
                    "got 'sparse'"),
    "yaml-section": ("train --config TMP/run.yaml", _yaml("mock_data: true\nlighthouse:\n  levels: 3\n"),
                     2,
                     "error: --config TMP/run.yaml: unknown setting 'lighthouse' (did you mean one of "
                     "'lighthouse_backend', 'lighthouse_config', 'lighthouse_dense_every', ...? settings are "
                     "flat keys, not sections); valid: adam_beta1, adam_beta2, ..."),
    "lighthouse-yaml": (f"train {TINY} --lighthouse-config TMP/run.yaml", _yaml("levels: two\n"), 2,
                        "error: --lighthouse-config TMP/run.yaml: levels must be an integer, got 'two'"),
    "lighthouse-dense": (f"train {TINY} --lighthouse-levels -5", None, 2,
                         "error: --lighthouse-levels -5: lighthouse levels must be >= 1 (1 = dense "
                         "attention), got -5; the paper uses 3"),
    "load-parent": (f"train {TINY} --load TMP/runs", _checkpoints, 2,
                    "error: --load TMP/runs holds no checkpoint (no latest_checkpointed_iteration.txt) but "
                    "is not empty (stage1); did you mean --load TMP/runs/stage1?"),
    "load-iteration": (f"train {TINY} --load TMP/runs/stage1/iter_0000002", _checkpoints, 2,
                       "error: --load TMP/runs/stage1/iter_0000002 holds no checkpoint (no "
                       "latest_checkpointed_iteration.txt) but is not empty (common.pt); give the folder "
                       "that holds it: --load TMP/runs/stage1"),
    "split-eval-0": ("train --data-path TMP/forty --eval-iters 0 --num-layers 1 --hidden-size 32 "
                     "--num-attention-heads 4 --seq-length 64", _forty_documents, 2,
                     "error: --data-path TMP/forty has 40 documents: --split 969,30,1 gives its test split "
                     "none; use a larger dataset or another --split (e.g. 90,10,0)"),
    "backend-cpu": (f"train {TINY} --device cpu --attention-impl lighthouse --lighthouse-levels 2 "
                    "--lighthouse-topk 16 --lighthouse-tile-topk 8 --lighthouse-backend te", None, 2,
                    "error: --lighthouse-backend te with --device cpu: lighthouse backend 'te' needs CUDA "
                    "tensors, got cpu tensors; valid on cpu: ['auto', 'math']"),
    "until-iter-0": (f"train {TINY} --train-iters 2 --attention-impl lighthouse --lighthouse-levels 2 "
                     "--lighthouse-topk 8 --lighthouse-tile-topk 4 --lighthouse-until-iter 0", None, 0,
                     "warning: --lighthouse-until-iter 0: no iteration runs Lighthouse attention "
                     "(Lighthouse runs iterations 0 to N-1, none for N = 0); leave it out to train with "
                     "Lighthouse throughout, or use --attention-impl dense"),
    "dense-layers-all": (f"train {TINY} --train-iters 2 --attention-impl lighthouse --lighthouse-levels 2 "
                         "--lighthouse-topk 8 --lighthouse-tile-topk 4 --lighthouse-dense-layers 0", None, 0,
                         "warning: --lighthouse-dense-layers keeps all 1 layers dense: no layer runs "
                         "Lighthouse attention; list fewer layers, or use --attention-impl dense"),
    "yaml-binary": ("train --config TMP/run.yaml", lambda tmp: (tmp / "run.yaml").write_bytes(b"\0\xfd\1"), 2,
                    "error: --config TMP/run.yaml: not a YAML text file (byte 1 is not UTF-8)"),
    "slurm-time-mmss": (f"slurm render stage1 -o TMP/job.sbatch {SLURM} --time 1:00", None, 2,
                        "error: stage1: time '1:00' is 1 minute to Slurm, which reads MINUTES:SECONDS; "
                        "did you mean 1:00:00? (or 1 for 1 minute)"),
    "slurm-time-fields": (f"slurm render stage1 -o TMP/job.sbatch {SLURM} --time 25:99:99", None, 2,
                          "error: stage1: time '25:99:99' is not a Slurm time limit (minutes 99 must be "
                          "below 60, seconds 99 must be below 60); use one of MINUTES, MINUTES:SECONDS, "
                          "HOURS:MINUTES:SECONDS, DAYS-HOURS, DAYS-HOURS:MINUTES, DAYS-HOURS:MINUTES:SECONDS "
                          "(e.g. 24:00:00 or 2-00:00:00)"),
    "slurm-time-short": (f"slurm render stage1 -o TMP/job.sbatch {SLURM} --time 10", None, 2,
                         "error: stage1: time '10' is 10 minutes: a train job needs more than 10 "
                         "(Megatron-LM saves and exits 10 minutes before the limit; set exit_duration_mins "
                         "for a shorter margin)"),
    "slurm-job-name": (f"slurm render stage1 -o TMP/job.sbatch {SLURM} --set job_name=my;rm", None, 2,
                       "error: stage1: job_name 'my;rm' cannot go into an #SBATCH line; use letters, "
                       "digits, '.', '_', '+' and '-' only"),
    "demo-layer-options": ("demo --seq-len 999", None, 2,
                           "lighthouse-megatron demo: error: --seq-len: options of the single-layer demo, "
                           "which runs with --layer; the two-stage workflow takes --out, --force, --tiny and "
                           "--device"),
}


def _matches(message: str, expected: str) -> bool:
    return message.startswith(expected[:-3]) if expected.endswith("(...") or expected.endswith("...") \
        else message == expected


def _run(case: str, tmp_path: Path, capsys, monkeypatch) -> tuple[int, list[str]]:
    command = CASES[case][0]
    if case == "submit-no-sbatch":
        monkeypatch.setenv("PATH", str(tmp_path / "no-sbatch-here"))
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.chdir(REPO)  # examples/98k.yaml, as a user in the clone types it
    capsys.readouterr()
    code = main(command.replace("TMP", str(tmp_path)).split())
    lines = capsys.readouterr().err.strip().splitlines()
    return code, [line.replace(str(tmp_path), "TMP") for line in lines]


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_clear_line(case, tmp_path, capsys, monkeypatch):
    _, setup, want_code, expected = CASES[case]
    if setup:
        setup(tmp_path)
    before = sorted(p.name for p in tmp_path.iterdir())
    code, lines = _run(case, tmp_path, capsys, monkeypatch)
    assert code == want_code, lines
    if want_code:
        assert len(lines) == 1 and _matches(lines[0], expected), lines
        # Refused before any work: nothing written where the command would write.
        assert sorted(p.name for p in tmp_path.iterdir()) == before
    else:
        assert lines[:1] == [expected]
    for special in ("/sys/lighthouse-run", "/proc/lighthouse-tb", "/sys/job.sbatch", "/sys/lighthouse-demo"):
        assert not os.path.exists(special)


def _doc_rows() -> dict[str, str]:
    rows = {}
    for line in DOC.read_text().splitlines():
        m = re.match(r"^\| `([\w-]+)` \| .* \| `(.*)` \|$", line)
        if m:
            rows[m.group(1)] = m.group(2)
    return rows


def test_the_docs_table_shows_these_messages():
    rows = _doc_rows()
    assert sorted(rows) == sorted(CASES), "docs/bad-inputs.md and CASES list different inputs"
    for case, (_, _, _, expected) in CASES.items():
        assert _matches(rows[case], expected), (case, rows[case])


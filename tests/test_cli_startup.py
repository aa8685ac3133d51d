"""`unclip --help` and bad input answer at once: nothing heavy is imported before they do.

Each test runs the CLI in a fresh interpreter (the test process itself may already hold torch or
Ray) and reads back which heavy modules that interpreter had imported when the command ended.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
HEAVY = ("torch", "deepspeed", "ray", "mlflow", "open_clip", "pyarrow", "boto3")
MARKER = "@@unclip-startup@@"

# Runs `unclip <argv>` for every argv in sys.argv[1] (JSON) in one interpreter, then prints one
# marker line per command (its exit code) and, last, the heavy modules imported by then.
CHILD = f"""
import contextlib, io, json, sys
from orchestration.cli import main

results = []
for argv in json.loads(sys.argv[1]):
    sys.argv = ["unclip", *argv]
    out, err = io.StringIO(), io.StringIO()
    code = 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main()
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    sys.stdout.write(out.getvalue())
    sys.stderr.write(err.getvalue())
    results.append(code)
heavy = [name for name in {HEAVY!r} if name in sys.modules]
print("{MARKER}" + json.dumps({{"codes": results, "heavy": heavy}}))
"""


def run_unclip(*argvs: list[str]) -> tuple[list[int], str, str, list[str]]:
    """(exit codes, stdout, stderr, heavy modules imported) of `unclip` commands in one process."""
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", CHILD, json.dumps(list(argvs))],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    seconds = time.monotonic() - start
    assert proc.returncode == 0, proc.stderr
    out, _, report = proc.stdout.rpartition(MARKER)
    result = json.loads(report)
    print(f"unclip {argvs}: {seconds:.2f}s, heavy imports: {result['heavy']}")
    return result["codes"], out, proc.stderr, result["heavy"]


def test_help_imports_nothing_heavy():
    codes, out, err, heavy = run_unclip(["--help"])
    assert codes == [0] and err == ""
    assert "Usage" in out and all(name in out for name in ("train", "pipeline", "tune", "jobs"))
    assert heavy == []


def test_train_help_imports_nothing_heavy():
    codes, out, err, heavy = run_unclip(["train", "--help"])
    assert codes == [0] and err == ""
    assert "unclip train" in out and "stage" in out.lower() and "--set" in out
    assert heavy == []


def test_every_command_help_imports_nothing_heavy():
    commands = [["data", "--help"], ["data", "shapes", "--help"], ["data", "ingest", "--help"],
                ["data", "inspect", "--help"], ["presets", "--help"], ["stream", "--help"],
                ["embed", "--help"], ["pipeline", "--help"], ["generate", "--help"],
                ["serve", "--help"], ["app", "--help"], ["submit", "--help"], ["jobs", "--help"],
                ["jobs", "list", "--help"], ["jobs", "status", "--help"],
                ["jobs", "logs", "--help"], ["jobs", "stop", "--help"], ["models", "--help"],
                ["models", "list", "--help"], ["models", "promote", "--help"],
                ["tune", "--help"], ["tune", "lr", "--help"], ["tune", "guidance", "--help"]]
    codes, out, err, heavy = run_unclip(*commands)
    assert codes == [0] * len(commands) and err == ""
    assert out.count("Usage") == len(commands)
    assert heavy == []


@pytest.mark.parametrize("argv, message", [
    (["train", "clip", "--set", "clip.optim.lr=-1"],
     "error: config error in {tiny}: clip.optim.lr: Input should be greater than 0 (got -1); "
     "fix it in the file or with --set clip.optim.lr=..."),
    (["pipeline", "--set", "nosuchkey=1"],
     "error: config error in {tiny}: unknown key 'nosuchkey'; remove it or check the spelling"),
    (["tune", "lr", "--set", "clip.lrr=1"],
     "error: config error in {tiny}: unknown key 'clip.lrr'"),
    (["embed", "--set", "clip.lrr=1"], "error: config error in {tiny}: unknown key 'clip.lrr'"),
    (["train", "clip", "--config", "nosuch"], "error: config file not found: nosuch"),
])
def test_config_error_is_one_line_before_heavy_imports(argv, message):
    codes, out, err, heavy = run_unclip(argv)
    assert codes == [2]
    assert err.endswith("\n") and len(err.splitlines()) == 1, err  # no DeepSpeed warning
    assert err.startswith(message.format(tiny=REPO_ROOT / "configs" / "tiny.yaml")), err
    assert out == ""
    assert heavy == []


def test_unknown_stage_is_one_line_naming_the_stage():
    codes, out, err, heavy = run_unclip(["train", "nosuchstage"])
    assert codes == [2] and out == ""
    assert len(err.splitlines()) == 1, err
    assert err.startswith("error: unknown stage 'nosuchstage'; choose one of clip, prior, decoder")
    assert heavy == []


@pytest.mark.parametrize("argv, message", [
    (["data", "ingest", "src", "--out", "dst", "--format", "tar"],
     "error: --format 'tar': use webdataset or parquet"),
    (["submit"], "error: nothing to run: put the unclip command after --"),
    (["submit", "--", "train", "clip", "--set", "clip.steps=-1"],
     "error: config error in {tiny}: clip.steps:"),
    (["tune", "lr", "--samples", "0"], "error: --samples 0: must be at least 1"),
    (["tune", "guidance", "--model", "m", "--sampler", "euler"],
     "error: --sampler 'euler': use ddim or ddpm"),
    (["models", "list", "--config", "nosuch"], "error: config file not found: nosuch"),
])
def test_other_bad_input_is_one_line_before_heavy_imports(argv, message):
    codes, out, err, heavy = run_unclip(argv)
    assert codes == [2] and out == ""
    assert len(err.splitlines()) == 1, err
    assert err.startswith(message.format(tiny=REPO_ROOT / "configs" / "tiny.yaml")), err
    assert heavy == []

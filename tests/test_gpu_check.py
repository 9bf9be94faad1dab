"""benchmarks/gpu_check.sh, the one-call GPU check, run dry on the CPU (C2C_CHECK_ALLOW_CPU=1)
with a tiny subset of each stage: the files it leaves, the summary's form, and that its time
limits hold. A GPU lease is short and rare, so the script must work the first time it runs there."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

# On a GPU machine gpu_check.sh runs for real (and leaves this file out of its own test run).
pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="the dry run is for machines without a GPU")

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"
BUDGET = 360
FILES = {"summary.txt", "build.log", "tests-kernel.log", "bench.log", "bench.json", "bench.png", "merge.log",
         "tests-rest.log"}
STAGES = ["build", "kernel-tests", "bench", "merge", "rest-tests"]
STAGE_LINE = re.compile(r"^(?P<name>\S+) +(?P<status>ok|FAILED|TIMEOUT|skipped) +(?P<used>\d+)s +(?P<limit>\d+)s"
                        r" +(?P<start>\d+)s +(?P<file>\S+) *(?P<detail>.*)$")


def run_check(out: Path, **overrides: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_", "C2C_LIMIT_"))}
    env.update(PYTHON=sys.executable, C2C_CHECK_ALLOW_CPU="1", C2C_SKIP_BUILD="1", C2C_WORKERS="0",
               C2C_CUDA_EMULATOR="0",  # the emulator's first build takes minutes
               C2C_TESTS="tests/test_ops.py -k 'test_layouts_and_dtypes and float32 and hf'",
               C2C_REST_TESTS="tests/test_layouts.py",
               C2C_BENCH_ARGS="--device cpu --tokens 8 --layers 1 --dtype fp32 --backends cpu --min-time 0.01"
                              " --threads 1")
    env.update(overrides)
    return subprocess.run(["bash", str(SCRIPT), str(out)], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)


def stages(summary: str) -> dict[str, dict]:
    found = {}
    for line in summary.splitlines():
        m = STAGE_LINE.match(line)
        if m and m["name"] in STAGES:
            assert m["name"] not in found, f"stage {m['name']} reported twice:\n{summary}"
            found[m["name"]] = {k: int(v) if k in ("used", "limit", "start") else v for k, v in m.groupdict().items()}
    assert list(found) == STAGES, f"expected one line per stage {STAGES}, got {list(found)}:\n{summary}"
    return found


def check_budget(summary: str, budget: int) -> None:
    caps = re.search(r"^budget (\d+)s: (.*)$", summary, re.M)
    assert caps, summary
    assert int(caps[1]) == budget
    for name, s in stages(summary).items():
        # a stage may start only where its whole limit still fits in the budget
        assert s["start"] + s["limit"] <= budget, (name, s)
        assert s["used"] <= s["limit"] + 6, (name, s)  # + the kill grace and rounding
    total = re.search(r"^total (\d+)s of (\d+)s; (\d+) files", summary, re.M)
    assert total and int(total[1]) <= budget, summary


def check_files(out: Path) -> None:
    names = {p.name for p in out.iterdir()}
    assert names <= FILES, names - FILES
    assert len(names) <= 8
    assert all(p.is_file() for p in out.iterdir())


def test_dry_run_leaves_the_files_and_a_summary_that_parses(tmp_path):
    out = tmp_path / "out"
    proc = run_check(out)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    check_files(out)
    assert {"summary.txt", "tests-kernel.log", "bench.log", "bench.json", "merge.log", "tests-rest.log"} <= {
        p.name for p in out.iterdir()}
    summary = (out / "summary.txt").read_text()
    assert proc.stdout == summary  # printed as it is saved, nothing after it
    assert summary.rstrip().splitlines()[-1].startswith("total ")
    s = stages(summary)
    assert {name: v["status"] for name, v in s.items()} == {
        "build": "skipped", "kernel-tests": "ok", "bench": "ok", "merge": "skipped", "rest-tests": "ok"}
    assert re.match(r"[1-9]\d* passed, 0 failed, 0 errors", s["kernel-tests"]["detail"]), s["kernel-tests"]
    assert re.match(r"10 passed, 0 failed", s["rest-tests"]["detail"]), s["rest-tests"]
    assert s["bench"]["detail"].startswith("1 rows (tokens 8), 0 failed"), s["bench"]
    assert s["merge"]["detail"] == "skipped: no GPU"
    # the default caps (no C2C_LIMIT_* given) fit the 6 minutes, build included
    caps = [int(c) for c in re.findall(r"<=(\d+)s", re.search(r"^budget .*$", summary, re.M)[0])]
    assert len(caps) == 4 and sum(caps) <= BUDGET, summary
    check_budget(summary, BUDGET)
    # the kernel tests are streamed with -v: one verdict per test, in the log as they finish
    log = (out / "tests-kernel.log").read_text()
    assert re.search(r"^tests/test_ops\.py::test_layouts_and_dtypes\[\S+\] PASSED", log, re.M), log
    assert re.search(r"^  float32 +8 tok  cpu +ok ", summary, re.M), summary


def test_a_stage_past_its_limit_keeps_its_output_and_the_budget_holds(tmp_path):
    hang = tmp_path / "test_hang.py"
    hang.write_text("import time\n\ndef test_quick():\n    pass\n\ndef test_hang():\n    time.sleep(120)\n")
    out = tmp_path / "out"
    budget = 25  # kernel-tests gets 25 - 10 (reserve) - its start: the later stages find no time left
    proc = run_check(out, C2C_BUDGET=str(budget), C2C_TESTS=str(hang))
    assert proc.returncode == 1, proc.stdout + proc.stderr
    check_files(out)
    summary = (out / "summary.txt").read_text()
    assert proc.stdout == summary
    s = stages(summary)
    assert s["kernel-tests"]["status"] == "TIMEOUT"
    assert s["kernel-tests"]["limit"] <= budget - 10
    assert s["kernel-tests"]["detail"].startswith("1 passed, 0 failed, 0 errors, 0 skipped, 1 unfinished")
    assert re.search(r"^    UNFINISHED \S*test_hang\.py::test_hang$", summary, re.M), summary
    for name in ("bench", "merge", "rest-tests"):
        assert s[name]["status"] == "skipped" and s[name]["detail"].startswith("not run:"), s[name]
    assert "NOT OK: kernel-tests" in summary.splitlines()[-1]
    check_budget(summary, budget)
    # the killed stage's streamed output survives
    log = (out / "tests-kernel.log").read_text()
    assert re.search(r"test_hang\.py::test_quick PASSED", log), log


def test_without_a_gpu_the_check_refuses_unless_asked_for_a_dry_run(tmp_path):
    out = tmp_path / "out"
    proc = run_check(out, C2C_CHECK_ALLOW_CPU="0")
    assert proc.returncode == 2
    assert "torch sees no CUDA device" in proc.stdout
    check_files(out)

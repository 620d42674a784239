"""bench/gpu.sh and its driver (fastp2p.bench.gpu_plan) on a CPU: ``--dry-run`` with a small budget, so the plan, the
budget cut, the per-step timeout and the streaming JSON are tested where no GPU is. One run (module fixture) serves
most tests: the budget leaves room for the first steps only, and the env step is stalled after its first row and
killed by a tiny per-step timeout."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from fastp2p.bench import gpu_plan

REPO = Path(__file__).resolve().parents[1]
GPU_SH = REPO / "bench" / "gpu.sh"
BUDGET = 24
ENV_TIMEOUT = 6  # env's first row (host facts, no torch import) takes well under a second


def _rows(out: Path) -> list[dict]:
    lines = (out / gpu_plan.RESULTS).read_text().splitlines()
    return [json.loads(line) for line in lines]  # every line must parse: a JSONDecodeError fails the test


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_dry")
    t0 = time.monotonic()
    p = subprocess.run(["bash", str(GPU_SH), "--dry-run", "--budget", str(BUDGET), "--sleep=env=120",
                        f"--timeout=env={ENV_TIMEOUT}", str(out)], capture_output=True, text=True,
                       timeout=BUDGET + 60, cwd=out)
    return out, p, time.monotonic() - t0


@pytest.mark.slow  # the shared dry run: ~25 s on 2 cores
def test_dry_run_streams_valid_rows_and_keeps_the_budget(dry_run):
    out, p, wall = dry_run
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    rows = _rows(out)
    assert rows[0]["kind"] == "plan" and rows[0]["dry_run"] and rows[0]["budget_s"] <= BUDGET
    assert [s["name"] for s in rows[0]["steps"]] == [s.name for s in gpu_plan.PLAN]
    # the budget holds: each step's limit is at most what was left (plus the kill grace and gpu.sh's start)
    assert wall < BUDGET + 30
    finals = [r for r in rows if r["kind"] == "step" and r["status"] != "started"]
    assert [r["step"] for r in finals] == [s.name for s in gpu_plan.PLAN]  # one final status per step, in order
    assert [r["priority"] for r in finals] == list(range(len(gpu_plan.PLAN)))
    # every measurement row lies between its step's "started" row and its final status row: streamed per row
    for i, r in enumerate(rows):
        if r["kind"] == "measure":
            started = max(j for j, q in enumerate(rows[:i]) if q["kind"] == "step" and q["status"] == "started")
            assert rows[started]["step"] == r["step"]
            assert not any(q["kind"] == "step" and q["step"] == r["step"] and q["status"] != "started"
                           for q in rows[started + 1:i])


@pytest.mark.slow
def test_budget_skips_are_recorded_with_reasons_in_priority_order(dry_run):
    out, _, _ = dry_run
    finals = {r["step"]: r for r in _rows(out) if r["kind"] == "step" and r["status"] != "started"}
    skipped = [name for name, r in finals.items() if r["status"] == "skipped" and r["reason"].startswith("budget")]
    # after env's kill at most BUDGET - ENV_TIMEOUT s are left: less than train_b1's dry estimate, so it never starts
    assert gpu_plan.STEPS["train_b1"].dry_estimate_s > BUDGET - ENV_TIMEOUT
    assert "train_b1" in skipped and "compile_b16" in skipped
    for name in skipped:
        m = re.fullmatch(r"budget: estimate (\d+) s > (\d+) s left of --budget (\d+) s", finals[name]["reason"])
        assert m and int(m[1]) == round(finals[name]["estimate_s"]) and int(m[3]) <= BUDGET, finals[name]["reason"]
        assert int(m[1]) >= int(m[2])
        assert not any(q["kind"] == "measure" and q["step"] == name for q in _rows(out))  # never started
    ran = [name for name, r in finals.items() if r["status"] != "skipped"]
    assert ran[0] == "env" and len(ran) >= 2  # env and at least one more step ran within the budget


@pytest.mark.slow
def test_a_killed_step_keeps_its_rows_and_the_plan_goes_on(dry_run):
    out, _, _ = dry_run
    rows = _rows(out)
    env = [r for r in rows if r["kind"] == "step" and r["step"] == "env" and r["status"] != "started"]
    assert env[0]["status"] == "timeout" and "killed after" in env[0]["reason"]
    assert env[0]["wall_s"] < ENV_TIMEOUT + 8  # the stalled process was killed (not waited on for 120 s)
    host = [r for r in rows if r["kind"] == "measure" and r["step"] == "env"]
    assert [r["what"] for r in host] == ["host"]  # written by the killed process before it stalled: kept
    assert host[0]["cores"] == os.cpu_count() and host[0]["python"]
    later = [r for r in rows if r["kind"] == "measure" and r["step"] != "env"]
    assert later, "no step after the killed one recorded anything"
    ok = [r for r in rows if r["kind"] == "step" and r["status"] == "ok"]
    assert ok and all((out / r["log"]).is_file() for r in ok)
    if any(r["step"] == "kernels_exact" for r in ok):  # the Triton interpreter's kernels vs float64, on the CPU
        checks = [r for r in later if r["what"] == "kernel_check"]
        assert checks and all(r["pass"] for r in checks), [r["label"] for r in checks if not r["pass"]]


@pytest.mark.slow
def test_table_printed_at_the_end_and_on_its_own(dry_run):
    out, p, _ = dry_run
    assert "step                status" in p.stdout
    q = subprocess.run([sys.executable, "-m", "fastp2p.bench.gpu_plan", "--table", str(out)], capture_output=True,
                       text=True, cwd=REPO, timeout=60)
    assert q.returncode == 0, q.stderr
    table = q.stdout
    assert p.stdout.rstrip().endswith(table.rstrip())  # the same table, printed last by gpu.sh
    lines = {line.split()[0]: line for line in table.splitlines() if line.split() and line.split()[0] in
             gpu_plan.STEPS}
    assert set(lines) == set(gpu_plan.STEPS)
    assert "timeout" in lines["env"] and "skipped" in lines["train_b1"] and "budget" in lines["train_b1"]
    assert "host" in table  # the env row that survived the kill


def test_table_survives_a_cut_line_and_a_missing_folder(tmp_path):
    gpu_plan.append_row(tmp_path, {"kind": "plan", "budget_s": 5, "dry_run": True,
                                   "steps": [{"name": "env"}, {"name": "kernels_exact"}]})
    gpu_plan.append_row(tmp_path, {"kind": "step", "step": "env", "status": "started", "estimate_s": 1})
    gpu_plan.append_row(tmp_path, {"kind": "measure", "step": "env", "what": "host", "label": "host",
                                   "summary": "a host"})
    with open(tmp_path / gpu_plan.RESULTS, "a") as f:
        f.write('{"kind": "measure", "step": "env", "lab')  # a write cut short by a SIGKILL
    text = gpu_plan.table(tmp_path)
    assert "1 unreadable line" in text and "a host" in text
    assert "in flight" in text and "not run" in text  # env started (driver killed), kernels_exact never reached
    q = subprocess.run([sys.executable, "-m", "fastp2p.bench.gpu_plan", "--table", str(tmp_path / "nope")],
                       capture_output=True, text=True, cwd=REPO, timeout=60)
    assert q.returncode == 2 and "no results.jsonl" in q.stderr


def test_sigterm_to_gpu_sh_kills_the_step_records_it_and_prints_the_table(tmp_path):
    p = subprocess.Popen(["bash", str(GPU_SH), "--dry-run", "--budget", "60", "--sleep=env=120", str(tmp_path)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # wait for the env step's first row, then stop the run
            path = tmp_path / gpu_plan.RESULTS
            if path.is_file() and '"what": "host"' in path.read_text():
                break
            time.sleep(0.2)
        else:
            pytest.fail("the env step wrote no row within 30 s")
        os.kill(p.pid, signal.SIGTERM)
        stdout, _ = p.communicate(timeout=30)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
    assert p.returncode == 143
    rows = _rows(tmp_path)
    assert [r["status"] for r in rows if r["kind"] == "step"] == ["started", "killed"]
    assert any(r["kind"] == "measure" and r["what"] == "host" for r in rows)
    assert "in flight" not in stdout and "killed" in stdout and "step                status" in stdout


def test_plan_shape():
    assert set(gpu_plan.STEP_FUNCS) == set(gpu_plan.STEPS)
    names = [s.name for s in gpu_plan.PLAN]
    # the priority order
    order = ["env", "kernels_exact", "kernels_timing", "train_b1", "train_b16", "train_b64", "cuda_graph",
             "compile_b16", "infer", "loaders"]
    assert [n for n in names if n in order] == order
    # the must-have part (through the one --compile) fits the default budget by its own GPU estimates
    must = sum(gpu_plan.STEPS[n].estimate_s for n in order[:order.index("compile_b16") + 1])
    assert must <= 480
    assert all(s.timeout_s >= s.estimate_s and s.dry_timeout_s >= s.dry_estimate_s for s in gpu_plan.PLAN)


@pytest.mark.parametrize("n,expected", [(1, 2e-5), (512, 2e-5), (512 * 4, 4e-5), (512 * 512, 2e-5 * 512 ** 0.5)])
def test_fp32_tolerance_grows_like_a_random_walk(n, expected):
    assert gpu_plan.fp32_tolerance(n) == pytest.approx(expected)


def test_usage_errors():
    for args in ([], ["--budget", "abc", "/tmp/x"], ["--bogus", "/tmp/x"]):
        p = subprocess.run(["bash", str(GPU_SH), *args], capture_output=True, text=True, timeout=30)
        assert p.returncode == 2 and "usage" in (p.stderr + p.stdout)

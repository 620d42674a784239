"""CPU thread and worker sizing (fastp2p.perf.thread_plan, the loader's worker cap and worker init), the bench
plot's row filtering and per-dtype peaks, and `train --nproc 2` stopped by Ctrl-C."""

import json
import multiprocessing as mp
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from fastp2p.bench import harness, ladder

from fastp2p import perf
from fastp2p.data import loader as loader_mod
from fastp2p.data.datasets import Pair

ROOT = Path(__file__).resolve().parents[1]


class ThreadRecorder(torch.utils.data.Dataset):
    """A PairDataset stand-in whose items carry the torch thread count and pid of the process that made them."""

    def __init__(self, n: int = 6):
        self.n, self.bad_files = n, []

    def __len__(self):
        return self.n

    def set_epoch(self, epoch):
        pass

    def record_bad(self, path, problem, warn=True):
        self.bad_files.append((path, problem))

    def __getitem__(self, key):
        _, i = key
        info = torch.tensor([[[float(torch.get_num_threads())]], [[float(os.getpid())]], [[float(i)]]])
        return Pair(info, info.clone(), f"item{i}")


def _items(loader):
    return [(int(b.A[k, 0, 0, 0]), int(b.A[k, 1, 0, 0]), int(b.A[k, 2, 0, 0]))
            for b in loader.batches(0) for k in range(b.A.shape[0])]


def test_thread_plan_arithmetic():
    assert perf.thread_plan(4, 2) == (2, 2)  # 4 workers on 2 cores: capped to 2
    assert perf.thread_plan(1, 2) == (2, 1)
    assert perf.thread_plan(0, 2) == (2, 0)  # num_workers 0 stays 0 (load in the main process)
    assert perf.thread_plan(4, 16, nproc=2) == (8, 4)
    assert perf.thread_plan(8, 16, nproc=4) == (4, 4)
    assert perf.thread_plan(2, 3, nproc=2) == (1, 1)  # floor of the share, never 0 threads
    assert perf.thread_plan(2, 2, nproc=4) == (1, 1)


def test_available_cores_reads_the_affinity_mask(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {3, 5, 7}, raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    assert perf.available_cores() == 3

    def no_affinity(pid):
        raise OSError("not supported")

    monkeypatch.setattr(os, "sched_getaffinity", no_affinity, raising=False)
    assert perf.available_cores() == 64


def test_local_processes(monkeypatch):
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert perf.local_processes() == 1
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert perf.local_processes() == 4
    assert loader_mod.effective_workers(8, cores=8) == 2  # 8 cores shared by 4 ranks


def test_workers_run_one_intra_op_thread_and_are_capped(monkeypatch, caplog):
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    monkeypatch.setattr(perf, "available_cores", lambda: 2)
    ds = ThreadRecorder()
    with caplog.at_level("INFO", logger="fastp2p.data"):
        loader = loader_mod.make_loader(ds, 2, 3, seed=0)
    try:
        assert loader.requested_workers == 3 and loader.num_workers == 2 and loader._loader.num_workers == 2
        assert any("--num_workers 3: using 2" in r.getMessage() for r in caplog.records)
        items = _items(loader)
    finally:
        loader.close()
    assert {threads for threads, _, _ in items} == {1}
    pids = {pid for _, pid, _ in items}
    assert os.getpid() not in pids and 1 <= len(pids) <= 2
    # the same items in the same order as without workers
    plain = loader_mod.make_loader(ThreadRecorder(), 2, 0, seed=0)
    assert [i for _, _, i in _items(plain)] == [i for _, _, i in items]
    caplog.clear()
    with caplog.at_level("INFO", logger="fastp2p.data"):
        loader_mod.make_loader(ThreadRecorder(), 2, 2, seed=0).close()
    assert not caplog.records  # not reduced: nothing to say


def _probe_worker_init(q):
    torch.set_num_threads(2)
    loader_mod._init_worker(0)
    q.put((torch.get_num_threads(), signal.getsignal(signal.SIGINT) == signal.SIG_IGN,
           signal.getsignal(signal.SIGTERM) == signal.SIG_IGN))


def test_worker_init_sets_one_thread_and_ignores_stop_signals():
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    p = ctx.Process(target=_probe_worker_init, args=(q,))
    p.start()
    got = q.get(timeout=30)
    p.join(30)
    assert got == (1, True, True)


# -- bench plot and peaks --------------------------------------------------------------------------------------
def _row(rung, skipped=None, **kw):
    group = rung.rsplit(":", 1)[0]
    return {"section": rung.split(":")[0], "group": group, "rung": rung, "skipped": skipped, **kw}


def test_plot_leaves_out_skipped_rungs_and_lists_them():
    rows = [_row("train:b1:baseline", img_per_s=1.0), _row("train:b1:triton", "GPU only: no CUDA"),
            _row("train:b4:baseline", img_per_s=2.0), _row("train:b4:triton", "GPU only: no CUDA"),
            _row("train:b4:compile", "CPU: pass --compile-cpu"), _row("infer:b1:torch-eager", img_per_s=9.0)]
    drawn, skipped = harness.plot_rows({"rows": rows})
    assert [r["rung"] for r in drawn] == ["train:b1:baseline", "train:b4:baseline"]
    assert [r["rung"] for r in skipped] == ["train:b1:triton", "train:b4:triton", "train:b4:compile"]
    assert harness.skipped_lines(skipped) == ["triton (b1, b4): GPU only: no CUDA", "compile (b4): CPU: pass "
                                              "--compile-cpu"]


def test_plot_writes_png_with_skipped_text(tmp_path):
    rows = [_row("train:b1:baseline", img_per_s=1.0, speedup=1.0, peak_key="fp32", pct_matmul_peak=50.0),
            _row("train:b1:amp", img_per_s=2.0, speedup=2.0, peak_key="bf16", pct_matmul_peak=None),
            _row("train:b1:triton", "GPU only: no CUDA")]
    out = tmp_path / "p.png"
    harness.plot({"rows": rows, "env": {"gpu": None, "cpu": "test"}}, str(out))
    assert out.read_bytes()[:4] == b"\x89PNG"
    assert harness.bar_label(rows[0]) == "1.00x\n50% fp32 peak"
    assert harness.bar_label(rows[1]) == "2.00x\nbf16 peak n/a"


def test_rows_are_measured_against_their_own_dtype_peak():
    peaks = {"fp32": 100.0, "fp32_dtype": "float32", "bf16": 400.0, "bf16_dtype": "bfloat16"}
    assert harness.peak_for("bf16", peaks) == ("bf16", 400.0)
    assert harness.peak_for("fp32", peaks) == ("fp32", 100.0)
    no_bf16 = {"fp32": 100.0, "fp32_dtype": "float32", "bf16_note": "n/a"}
    assert harness.peak_for("bf16", no_bf16) == ("bf16", None)  # n/a, never the fp32 peak
    r32 = harness.Rung("g:fp32", "", 1, group="g", baseline="g:fp32", flops=1e9, times=[0.1, 0.1, 0.1])
    r16 = harness.Rung("g:bf16", "", 1, group="g", baseline="g:fp32", flops=1e9, amp=True, dtype="bf16",
                       times=[0.05, 0.05, 0.05])
    a, b = harness.summarize([r32, r16], peaks)
    assert a["peak_key"] == "fp32" and a["pct_matmul_peak"] == pytest.approx(100 * 10.0 / 100.0)
    assert b["peak_key"] == "bf16" and b["pct_matmul_peak"] == pytest.approx(100 * 20.0 / 400.0)
    _, b = harness.summarize([r32, r16], no_bf16)
    assert b["peak_key"] == "bf16" and b["pct_matmul_peak"] is None and b["tflops"] == pytest.approx(0.02)
    res = {"matmul_peaks": dict(no_bf16), "rows": [dict(b)]}
    harness.merge_peaks(res, {"fp32": 150.0, "bf16": 300.0})  # a bf16 peak seen later is used
    assert res["rows"][0]["pct_matmul_peak"] == pytest.approx(100 * 20.0 / 300.0)


def test_ladder_dtype_of_a_rung_and_peaks_keys():
    from fastp2p.train import amp_dtype

    cpu = torch.device("cpu")
    assert ladder.compute_dtype(False, cpu) == "fp32"
    assert ladder.compute_dtype(True, cpu) == ("bf16" if amp_dtype(cpu) == torch.bfloat16 else "fp32")
    peaks = harness.matmul_peaks("cpu", n=128, repeats=2)
    assert peaks["fp32"] > 0
    assert ("bf16" in peaks) == harness.native_bf16("cpu") != ("bf16_note" in peaks)


# -- train --nproc 2 + Ctrl-C ----------------------------------------------------------------------------------
@pytest.mark.slow
def test_nproc_ctrl_c_exits_130_quietly(tmp_path):
    if not torch.distributed.is_available():
        pytest.skip("torch without torch.distributed")
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    cmd = [sys.executable, "-m", "fastp2p", "train", "--nproc", "2", "--preset", "debug", "--ngf", "8", "--ndf", "8",
           "--out", str(tmp_path), "--name", "r", "--log_every", "1", "--no_progress"]
    p = subprocess.Popen(cmd, cwd=ROOT, env=env, start_new_session=True, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "r" / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while p.poll() is None and time.monotonic() < deadline:
        if metrics.is_file() and len(metrics.read_text().splitlines()) >= 2:
            break
        time.sleep(0.1)
    assert p.poll() is None, p.communicate()[1][-2000:]
    os.killpg(p.pid, signal.SIGINT)  # what a terminal's Ctrl-C sends: the whole foreground process group
    try:
        out, err = p.communicate(timeout=90)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        raise
    assert p.returncode == 130, err[-3000:]
    assert "Traceback" not in err and "SignalException" not in err, err[-3000:]
    assert err.count("SIGINT: stopping after this step") <= 2, err  # at most once per rank
    summary = json.loads(out)
    assert summary["interrupted"] == "SIGINT" and summary["steps"] >= 2
    assert (tmp_path / "r" / "checkpoints" / "latest.safetensors").is_file()


def test_core_bench_rows_use_their_dtype_peak():
    from fastp2p.bench import core

    base = core.Rung("baseline", "", None, 1, flops=1e9, times=[0.1, 0.1])
    amp = core.Rung("fastp2p-amp", "", None, 1, flops=1e9, times=[0.05, 0.05], dtype="bf16")
    peaks = {"fp32": 100.0, "bf16": 400.0}
    a, b = core.summarize([base, amp], peaks, lambda n: "baseline")
    assert a["pct_matmul_peak"] == pytest.approx(10.0) and b["pct_matmul_peak"] == pytest.approx(5.0)
    _, b = core.summarize([base, amp], {"fp32": 100.0, "bf16_note": "n/a"}, lambda n: "baseline")
    assert b["peak_key"] == "bf16" and b["pct_matmul_peak"] is None
    core.print_table([a, b], {"fp32": 100.0, "bf16_note": "n/a"})  # prints n/a, does not fail on None


def test_cli_wait_settings_match_perf(monkeypatch):
    """bench/cli.main sets the OpenMP wait variables before torch loads (it cannot import fastp2p.perf for them)."""
    from fastp2p.bench import cli

    for k in perf.WAIT_ENV:
        monkeypatch.delenv(k, raising=False)
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    assert {k: os.environ[k] for k in perf.WAIT_ENV} == perf.WAIT_ENV


def test_cli_sets_the_openmp_wait_settings_perf_documents(monkeypatch):
    """fastp2p.cli.main sets WAIT_ENV's values literally (importing perf would load torch first): keep them equal."""
    from fastp2p.cli.main import main
    from fastp2p.perf import WAIT_ENV

    for k in WAIT_ENV:
        monkeypatch.delenv(k, raising=False)
    with pytest.raises(SystemExit):
        main(["--version"])
    assert {k: os.environ.get(k) for k in WAIT_ENV} == WAIT_ENV
    monkeypatch.setenv("GOMP_SPINCOUNT", "7")  # a user's own setting wins
    with pytest.raises(SystemExit):
        main(["--version"])
    assert os.environ["GOMP_SPINCOUNT"] == "7"

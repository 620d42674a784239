"""Data-parallel training (fastp2p.distributed) on the CPU: gloo, 2 processes started by torchrun, tiny nets.

The multi-process runs start ``python -m torch.distributed.run`` in subprocesses (as a user does); a small worker
script wraps ``fastp2p.cli.main`` to record each rank's final weights and which rank wrote files, and to kill a rank.
"""

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from fastp2p import distributed
from fastp2p.config import override, preset
from fastp2p.data import build_dataset, make_loader
from fastp2p.data.loader import EpochSampler
from fastp2p.errors import UserError
from fastp2p.models import build_discriminator, build_generator
from fastp2p.train import fit

REPO = Path(__file__).resolve().parents[1]

# Tiny nets on the built-in synthetic pairs: instance norm and no dropout, so a batch's result does not depend on how
# it is split over ranks (the 2 ranks x b == 1 process x 2b check).
ARGS = ["--preset", "debug", "--ngf", "8", "--ndf", "8", "--norm", "instance", "--no_dropout", "--num_workers", "0",
        "--log_every", "1", "--sample_every", "100", "--save_every", "100", "--no_progress"]

WORKER = """
import os, sys
import torch

rank, out = int(os.environ.get("RANK", "0")), sys.argv[1]
die_after = int(os.environ.get("FASTP2P_TEST_DIE_AFTER", "0"))
fp64 = os.environ.get("FASTP2P_TEST_FP64") == "1"
if fp64:  # parameters, optimizer state and the batches in float64 (see test_two_ranks_equal_...)
    torch.set_default_dtype(torch.float64)
from fastp2p import checkpoint, cli, report, train

calls, seen = [], {}
step0, save0, rep0 = train.Trainer.train_step, checkpoint.save, report.RunReporter.__init__

def train_step(self, A, B):
    seen["trainer"] = self
    losses = step0(self, A.double(), B.double()) if fp64 else step0(self, A, B)
    if die_after and rank == 1 and self.step == die_after:
        os._exit(3)  # a rank that dies without a word (OOM kill, segfault)
    return losses

def save(*a, **k):
    calls.append("checkpoint")
    return save0(*a, **k)

def reporter(self, *a, **k):
    calls.append("reporter")
    return rep0(self, *a, **k)

train.Trainer.train_step, checkpoint.save, report.RunReporter.__init__ = train_step, save, reporter
code = cli.main(sys.argv[2:])
t = seen["trainer"]
torch.save({"G": t.G.state_dict(), "D": t.D.state_dict(), "calls": calls}, os.path.join(out, f"rank{rank}.pt"))
sys.exit(code)
"""


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    env["OMP_NUM_THREADS"] = "1"  # 2 ranks on 2 cores
    return env


def torchrun(tmp_path, *args, monitor_s=None, env=None, timeout=120) -> subprocess.CompletedProcess:
    worker = tmp_path / "worker.py"
    worker.write_text(WORKER)
    mon = ["--monitor-interval", str(monitor_s)] if monitor_s else []
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *mon,
           str(worker), str(tmp_path), "train", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO, env={**_env(), **(env or {})})


def single_process(tmp_path, *args, env=None, timeout=120) -> subprocess.CompletedProcess:
    """The torchrun worker run as one plain process (no process group), so both sides of a comparison are set up
    alike (same thread count, same float64 switch)."""
    worker = tmp_path / "worker.py"
    worker.write_text(WORKER)
    return subprocess.run([sys.executable, str(worker), str(tmp_path), "train", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO, env={**_env(), **(env or {})})


def _ok(p):
    assert p.returncode == 0, f"exit {p.returncode}\nstdout:\n{p.stdout[-3000:]}\nstderr:\n{p.stderr[-6000:]}"


def _rows(run_dir: Path) -> list[dict]:
    return [json.loads(s) for s in (run_dir / "metrics.jsonl").read_text().splitlines() if s.strip()]


# -- sharding -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n,k,drop_last", [(12, 3, False), (10, 3, False), (10, 3, True), (2, 3, False)])
def test_shards_cover_every_index(n, k, drop_last):
    full = EpochSampler(n, seed=5).order(4)
    shards = [EpochSampler(n, 5, True, r, k, drop_last).shard(4) for r in range(k)]
    lens = {len(s) for s in shards}
    assert lens == {n // k if drop_last else math.ceil(n / k)}  # every rank runs the same number of steps
    together = sorted(i for s in shards for i in s)
    if n % k == 0:
        assert together == list(range(n))  # exactly once each
    elif drop_last:
        assert len(set(together)) == len(together) == (n // k) * k  # never twice, the tail left for this epoch
    else:
        assert set(together) == set(range(n))  # every pair at least once; the repeats are the epoch's first pairs
        extra = sorted(together)
        for i in range(n):
            extra.remove(i)
        assert sorted(extra) == sorted((full * k)[n:math.ceil(n / k) * k])
    # DistributedSampler's stride: the ranks' batch j together is batch j of one process with a k times larger batch.
    if not drop_last and n % k == 0:
        b = 2
        for j in range(n // (k * b)):
            assert sorted(i for s in shards for i in s[j * b:(j + 1) * b]) == sorted(full[j * k * b:(j + 1) * k * b])


def test_loader_shards_batches_and_resume(tmp_path):
    cfg = override(preset("debug"), synthetic_size=10, load_size=32, crop_size=32, num_workers=0)
    ds = build_dataset(cfg.data, seed=0)
    loaders = [make_loader(ds, 2, 0, seed=1, shard_id=r, num_shards=2) for r in range(2)]
    assert [len(ld) for ld in loaders] == [3, 3]  # 5 pairs per shard, batches of 2, last one partial
    paths = [p for ld in loaders for b in ld.batches(0) for p in b.paths]
    assert sorted(paths) == sorted(ds.paths)
    # mid-epoch resume stays inside the shard
    full = [p for b in loaders[1].batches(0) for p in b.paths]
    assert [p for b in loaders[1].batches(0, start=1) for p in b.paths] == full[2:]
    with pytest.raises(ValueError, match="shard_id"):
        make_loader(ds, 2, 0, seed=1, shard_id=2, num_shards=2)


# -- small pure pieces ----------------------------------------------------------------------------------------------
def test_resume_step_keeps_epoch_and_images_seen():
    saved = {"steps_per_epoch": 32, "global_batch": 2}
    assert distributed.resume_step(40, 1, saved, 32, 2) == 40  # same layout: unchanged
    assert distributed.resume_step(40, 1, saved, 64, 1) == 64 + 16  # 8 steps x 2 images into epoch 1 = 16 batches
    assert distributed.resume_step(3, 0, saved, 16, 4) == 1  # 6 images seen, rounded down to a batch of 4
    assert distributed.resume_step(7, 0, {}, 16, 4) == 7  # older checkpoints: the step as it is


def test_strip_nproc_and_launcher_refuses_nesting(monkeypatch):
    assert distributed.strip_nproc(["train", "--nproc", "2", "--lr", "1"]) == ["train", "--lr", "1"]
    assert distributed.strip_nproc(["train", "--nproc=4"]) == ["train"]
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "0")
    with pytest.raises(UserError, match="--nproc"):
        distributed.launch(["train", "--nproc", "2"], 2)


def test_sync_batch_builds_batch_norm_keys():
    for build, args in ((build_generator, ("unet_128", 3, 3, 8)), (build_discriminator, ("basic", 6, 8, 3))):
        a, b = build(*args, norm="batch"), build(*args, norm="sync_batch")
        assert {k: v.shape for k, v in a.state_dict().items()} == {k: v.shape for k, v in b.state_dict().items()}
        conv = nn.SyncBatchNorm.convert_sync_batchnorm(b)
        assert list(conv.state_dict()) == list(a.state_dict())  # checkpoints interchange with --norm batch
    with pytest.raises(UserError, match="sync_batch"):
        distributed.sync_batch_norm(a, b, torch.device("cpu"))


# -- 2 processes ----------------------------------------------------------------------------------------------------
def test_two_ranks_equal_one_process_with_twice_the_batch(tmp_path):
    """2 ranks x batch 2 (with --scale_lr: lr 4e-4) == 1 process x batch 4 at lr 4e-4; both ranks end bitwise equal;
    rank 0 alone writes; the logged losses are the ranks' mean (== the big batch's loss).

    Both sides train in float64. The two sides sum the same per-sample gradients in different orders (a mean of two
    rank means vs one mean of four, and oneDNN/ATen pick their reduction order by ISA and thread count), so in float32
    they differ by rounding: ~2^-24 relative, times the number of terms. Adam then amplifies that where a gradient is
    near zero: its first step is lr * g / (|g| + eps), a sign, so a gradient whose rounding noise exceeds its size
    moves its weight by up to 2 lr either way, and GAN steps 2 and 3 feed those differences forward. How many weights
    that hits depends on the CPU (0.6% on an AMD EPYC, 6.4% on a Xeon with AMX), so no float32 tolerance is a property
    of the code. In float64 the rounding noise of a gradient is ~2^-53 * (terms ~1e4) * |g|max ~ 1e-12, and Adam's
    response to a gradient perturbation d is at most lr * d / eps (eps = 1e-8): ~1e-4 lr per step, while a data-order
    or averaging bug changes about every weight by ~lr (Adam's steps are lr-sized whatever the gradient). So every
    weight, the dead biases before instance norms included, must agree to a hundredth of a step."""
    steps, lr = 3, 4e-4
    env = {"FASTP2P_TEST_FP64": "1"}
    p = torchrun(tmp_path, *ARGS, "--out", str(tmp_path), "--name", "ddp", "--batch_size", "2", "--scale_lr",
                 "--max_steps", str(steps), env=env)
    _ok(p)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    for net in ("G", "D"):
        for k, v in r0[net].items():
            assert torch.equal(v, r1[net][k]), f"{net}.{k} differs between ranks"
    assert r0["calls"] == ["reporter", "checkpoint"] and r1["calls"] == []
    ddp_rows = [r for r in _rows(tmp_path / "ddp") if "eval" not in r]
    assert [r["step"] for r in ddp_rows] == list(range(1, steps + 1))  # one writer: no duplicated rows
    assert ddp_rows[0]["lr"] == pytest.approx(lr)
    assert p.stdout.count('"steps"') == 1  # the summary printed once, by rank 0

    one_dir = tmp_path / "one"
    one_dir.mkdir()
    p1 = single_process(one_dir, *ARGS, "--out", str(one_dir), "--name", "one", "--batch_size", "4", "--lr", str(lr),
                        "--max_steps", str(steps), env=env)
    _ok(p1)
    one = torch.load(one_dir / "rank0.pt")
    for a, b in zip(ddp_rows, _rows(one_dir / "one"), strict=True):
        for k in ("loss_D", "loss_G_GAN", "loss_G_L1"):
            # float64 losses: rounding ~1e-12 relative, plus the weights' ~1e-4 lr differences at steps 2 and 3
            assert a[k] == pytest.approx(b[k], rel=1e-6), (a["step"], k)
    for net in ("G", "D"):
        assert r0[net].keys() == one[net].keys()
        for k, v in r0[net].items():
            assert v.dtype == one[net][k].dtype
            if v.is_floating_point():
                assert v.dtype == torch.float64, f"{net}.{k}: the run did not train in float64"
                diff = (v - one[net][k]).abs().max().item()
                assert diff <= 0.01 * lr, (f"{net}.{k}", diff / lr)
            else:
                assert torch.equal(v, one[net][k]), f"{net}.{k}"


def test_dead_rank_fails_fast_with_a_clear_message(tmp_path):
    t0 = time.perf_counter()
    # --monitor-interval 5: torchrun looks at its workers every 5 s, so the surviving rank meets the dead peer in a
    # collective first and reports it itself (with torchrun's default 0.1 s, torchrun stops it even sooner).
    p = torchrun(tmp_path, *ARGS, "--out", str(tmp_path), "--name", "die", "--batch_size", "1", "--max_steps", "50",
                 monitor_s=5, env={"FASTP2P_TEST_DIE_AFTER": "1"}, timeout=90)
    elapsed = time.perf_counter() - t0
    assert p.returncode != 0
    assert elapsed < 60, elapsed
    assert "exitcode  : 3" in p.stderr, p.stderr[-4000:]  # torchrun names the rank that died and its exit code
    # Rank 0 normally meets the dead peer in its next collective and says so in one line. On a loaded machine
    # torchrun's monitor can see the exit first and stop rank 0 itself (a race): then
    # torchrun's report above is the message, and it must have closed rank 0 rather than left it waiting.
    assert ("rank 0: lost contact with the other ranks" in p.stderr
            or "closing signal" in p.stderr), p.stderr[-4000:]


def test_nproc_cli_end_to_end_then_resume_on_one_process(tmp_path):
    p = subprocess.run([sys.executable, "-m", "fastp2p", "train", "--nproc", "2", *ARGS, "--out", str(tmp_path),
                        "--name", "cli", "--max_steps", "2"], capture_output=True, text=True, timeout=120, cwd=REPO,
                       env=_env())
    _ok(p)
    run = tmp_path / "cli"
    summary = json.loads(p.stdout[p.stdout.index("{"):])
    assert summary["steps"] == 2
    assert (run / "checkpoints" / "latest.safetensors").is_file() and (run / "config.json").is_file()
    assert [r["step"] for r in _rows(run)] == [1, 2]
    # Resume with one process: 2 steps x 2 ranks = 4 images of epoch 0 seen, so the single process resumes at its
    # step 4 of the same epoch (distributed.resume_step), and runs one more step to --max_steps 5.
    cfg = override(preset("debug"), ngf=8, ndf=8, norm="instance", no_dropout=True, num_workers=0, log_every=1,
                   sample_every=100, save_every=100, out=str(tmp_path), name="cli", max_steps=5, resume=True)
    s = fit(cfg, progress=False)
    assert s["steps"] == 5
    assert [r["step"] for r in _rows(run)] == [1, 2, 5]

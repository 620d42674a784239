"""A checkpoint is one transaction: real training processes killed at every instant of a save (SIGKILL at each
write/rename/delete, at random times, SIGTERM to the whole process group) and a full disk leave the previous complete
checkpoint or the new one, never a mix; leftovers never block a fresh start or a resume; and ``--resume`` from what
is left equals the uninterrupted run bit for bit."""

import errno
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fastp2p import checkpoint, cli
from fastp2p.errors import UserError

REPO = Path(__file__).resolve().parents[1]
CKPT = Path("checkpoints") / "latest.safetensors"

# A tiny run that saves after every step (so most of its time is spent inside saves); in-process batches (no workers)
# unless a test asks for them. The loader's batches do not depend on --num_workers (fastp2p.data.loader).
ARGS = ["--preset", "debug", "--ngf", "4", "--ndf", "4", "--load_size", "136", "--crop_size", "128",
        "--num_workers", "0", "--log_every", "1", "--sample_every", "1000", "--save_every", "1",
        "--no_progress"]

# Runs fastp2p's CLI and SIGKILLs itself at the K-th event inside a checkpoint save: before/after each rename and
# delete, and in the middle of each safetensors write (the temp file cut to half its size, as a kill mid-write leaves
# it). K past the last event: the run ends normally.
WORKER = r"""
import os, signal, sys
from pathlib import Path
from fastp2p import checkpoint, cli

kill_at = int(os.environ["KILL_AT"])
state = {"n": 0, "saving": False}

def event(what):
    if state["saving"]:
        state["n"] += 1
        if state["n"] == kill_at:
            sys.stderr.write(f"killed at event {kill_at}: {what}\n")
            sys.stderr.flush()
            os.kill(os.getpid(), signal.SIGKILL)

def wrap(name, f, after=True):
    def g(*a, **k):
        event(f"before {name} {a[0]}")
        out = f(*a, **k)
        if after:
            event(f"after {name} {a[0]}")
        return out
    return g

save_file0, save0 = checkpoint.save_file, checkpoint.save

def save_file(tensors, tmp, metadata=None):
    save_file0(tensors, tmp, metadata=metadata)
    if state["saving"] and state["n"] + 1 == kill_at:
        with open(tmp, "r+b") as f:
            f.truncate(os.path.getsize(tmp) // 2)
    event(f"mid-write {tmp}")

def save(*a, **k):
    state["saving"] = True
    try:
        return save0(*a, **k)
    finally:
        state["saving"] = False

os.replace = wrap("replace", os.replace)
os.unlink = wrap("unlink", os.unlink, after=False)
checkpoint.save_file, checkpoint.save = save_file, save
sys.exit(cli.main(sys.argv[1:]))
"""

# state file: mid-write, rename (before, after); weights file (the commit): the same; sidecar rename (before, after)
EVENTS_FIRST_SAVE = 8
EVENTS_PER_SAVE = 9  # ... and the previous save's state file deleted
COMMIT = 6  # the event after the weights file's rename


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    env["OMP_NUM_THREADS"] = str(torch.get_num_threads())  # the same kernels and reduction order as in-process runs
    return env


def train(out: Path, *extra: str) -> int:
    return cli.main(["train", *ARGS, "--out", str(out.parent), "--name", out.name, *extra])


def weights_and_state(run: Path) -> dict[str, torch.Tensor]:
    meta, tensors = checkpoint.load(run / CKPT)
    _, state = checkpoint.load_state(run / CKPT, meta)
    out = dict(tensors)
    out.update({"state." + k: v for k, v in state.items()})
    return out


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """Uninterrupted runs of N steps (cached by N)."""
    root = tmp_path_factory.mktemp("straight")
    cache: dict[int, dict] = {}

    def get(n: int) -> dict:
        if n not in cache:
            assert train(root / f"s{n}", "--max_steps", str(n)) == 0
            cache[n] = weights_and_state(root / f"s{n}")
        return cache[n]

    return get


def check_recoverable(run: Path, steps: int, straight, caplog) -> int | None:
    """What a killed run left: the previous or the new checkpoint, whole; resuming (or starting afresh when no save
    was ever committed) runs to ``steps`` and ends bit for bit where the straight run does. Returns the step the
    checkpoint held (None: none)."""
    ckpt = run / CKPT
    held = None
    if ckpt.is_file():
        meta = checkpoint.read_meta(ckpt)
        held = meta["step"]
        smeta, _ = checkpoint.load_state(ckpt, meta)  # the state file it names exists and is this save's
        assert smeta["step"] == held
    junk = checkpoint.leftovers(ckpt)
    caplog.clear()
    code = train(run, "--max_steps", str(steps), *(["--resume"] if held is not None else []))
    assert code == 0
    if junk:
        warned = [r.getMessage() for r in caplog.records if "interrupted save" in r.getMessage()]
        assert len(warned) == 1 and all(p.name in warned[0] for p in junk), (warned, junk)
    assert checkpoint.leftovers(ckpt) == []
    assert_same(weights_and_state(run), straight(steps))
    rows = [json.loads(s) for s in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, steps + 1))  # rows past the checkpoint were redone, not doubled
    sidecar = json.loads((run / "checkpoints" / "latest.json").read_text())
    assert sidecar == checkpoint.read_meta(ckpt)
    return held


@pytest.mark.slow
@pytest.mark.parametrize("k", [*range(1, EVENTS_FIRST_SAVE + 1),
                               *range(EVENTS_FIRST_SAVE + 1, EVENTS_FIRST_SAVE + EVENTS_PER_SAVE + 1)])
def test_sigkill_at_every_instant_of_a_save(tmp_path, k, straight, caplog):
    run = tmp_path / "run"
    p = subprocess.run([sys.executable, "-c", WORKER, "train", *ARGS, "--out", str(tmp_path), "--name", "run",
                        "--max_steps", "3"], capture_output=True, text=True, timeout=180, cwd=tmp_path,
                       env={**_env(), "KILL_AT": str(k)})
    assert p.returncode == -signal.SIGKILL, (p.returncode, p.stderr[-3000:])
    first_save = k <= EVENTS_FIRST_SAVE
    held = check_recoverable(run, 3, straight, caplog)
    # Until the weights file's rename, the previous checkpoint; from then on, the new one.
    commit = COMMIT if first_save else EVENTS_FIRST_SAVE + COMMIT
    expected_step = (1 if first_save else 2) if k >= commit else (None if first_save else 1)
    assert held == expected_step, p.stderr[-500:]


@pytest.mark.slow
def test_sigkill_at_random_times(tmp_path, straight, caplog):
    seed = int(os.environ.get("FASTP2P_TEST_SEED", time.time_ns() % 10**6))
    print(f"kill delays drawn with FASTP2P_TEST_SEED={seed}")  # shown on failure: rerun with it to replay
    rng = random.Random(seed)
    delays = [rng.uniform(0.0, 1.5) for _ in range(3)]
    for i, delay in enumerate(delays):
        run = tmp_path / f"r{i}"
        p = subprocess.Popen([sys.executable, "-m", "fastp2p", "train", *ARGS, "--out", str(tmp_path), "--name",
                              run.name, "--max_steps", "100000"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             cwd=REPO, env=_env())
        deadline = time.time() + 120
        while time.time() < deadline and not (run / "metrics.jsonl").is_file():
            time.sleep(0.02)
        time.sleep(delay)
        p.kill()
        p.wait(timeout=60)
        held = checkpoint.read_meta(run / CKPT)["step"] if (run / CKPT).is_file() else 0
        print(f"run {i}: killed {delay:.3f} s after its first logged step, checkpoint at step {held}")
        check_recoverable(run, held + 1, straight, caplog)


@pytest.mark.slow
def test_sigterm_to_the_process_group_saves_and_exits_143(tmp_path, straight):
    """Workers ignore SIGTERM (the loader's worker_init_fn) and leave the stop to the main process."""
    run = tmp_path / "term"
    p = subprocess.Popen([sys.executable, "-m", "fastp2p", "train", *ARGS, "--num_workers", "2", "--save_every", "1000",
                          "--out", str(tmp_path), "--name", "term", "--max_steps", "100000"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO, env=_env(),
                         start_new_session=True)
    metrics = run / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 2):
        time.sleep(0.05)
    os.killpg(p.pid, signal.SIGTERM)  # what Slurm, Kubernetes and `timeout` do: the whole group
    stdout, stderr = p.communicate(timeout=120)
    assert p.returncode == 143, stderr[-3000:]
    assert "Traceback" not in stderr and "killed by signal" not in stderr, stderr[-3000:]
    summary = json.loads(stdout[stdout.index("{"):])
    assert summary["interrupted"] == "SIGTERM"
    step = checkpoint.read_meta(run / CKPT)["step"]
    assert step == summary["steps"] >= 2
    assert train(run, "--max_steps", str(step + 1), "--resume") == 0
    assert_same(weights_and_state(run), straight(step + 1))


def _fill(folder: Path, leave: int) -> Path:
    filler = folder / "filler"
    free = os.statvfs(folder).f_bavail * os.statvfs(folder).f_frsize
    with open(filler, "wb") as f:
        f.write(b"\0" * max(0, free - leave))
    return filler


def test_full_disk_leaves_the_previous_checkpoint_resumable(tmp_path, straight, capsys):
    """A real small filesystem (tmpfs) where the machine lets us mount one."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    p = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if p.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here ({p.stderr.strip()}); test_enospc_mid_write simulates it")
    try:
        run = mnt / "run"
        assert train(run, "--max_steps", "1") == 0
        before = weights_and_state(run)
        filler = _fill(mnt, leave=64 << 10)  # room for the metrics row, not for a checkpoint
        capsys.readouterr()
        assert train(run, "--max_steps", "2", "--resume") == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("fastp2p: error: ") and str(run / "checkpoints") in err[0], err
        assert "MB" in err[0] and "needs" in err[0]
        assert_same(weights_and_state(run), before)
        assert checkpoint.leftovers(run / CKPT) == []
        filler.unlink()
        assert train(run, "--max_steps", "2", "--resume") == 0
        assert_same(weights_and_state(run), straight(2))
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


@pytest.mark.parametrize("failing_write", [1, 2])  # 1: the state file, 2: the weights file (the commit)
def test_enospc_mid_write(tmp_path, straight, capsys, monkeypatch, failing_write):
    run = tmp_path / "run"
    assert train(run, "--max_steps", "1") == 0
    before = weights_and_state(run)
    calls, save_file0 = [], checkpoint.save_file

    def save_file(tensors, tmp, metadata=None):
        calls.append(tmp)
        if len(calls) == failing_write:
            with open(tmp, "wb") as f:
                f.write(b"\0" * 100)  # some bytes made it, then the device filled up
            raise OSError(errno.ENOSPC, "No space left on device")
        return save_file0(tensors, tmp, metadata=metadata)

    monkeypatch.setattr(checkpoint, "save_file", save_file)
    capsys.readouterr()
    assert train(run, "--max_steps", "2", "--resume") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("fastp2p: error: ") and "no space left" in err[0], err
    assert_same(weights_and_state(run), before)
    assert checkpoint.leftovers(run / CKPT) == []  # no temp file, no orphan state file
    monkeypatch.setattr(checkpoint, "save_file", save_file0)
    assert train(run, "--max_steps", "2", "--resume") == 0
    assert_same(weights_and_state(run), straight(2))


def test_mismatched_state_file_is_refused(tmp_path):
    """A state file of another save (e.g. copied by hand beside the weights) never resumes silently."""
    a, b = tmp_path / "a", tmp_path / "b"
    assert train(a, "--max_steps", "1") == 0
    assert train(b, "--max_steps", "2") == 0
    sa = checkpoint.state_path(a / CKPT, checkpoint.read_meta(a / CKPT))
    sb = checkpoint.state_path(b / CKPT, checkpoint.read_meta(b / CKPT))
    sa.write_bytes(sb.read_bytes())
    with pytest.raises(UserError, match="another save"):
        checkpoint.load_state(a / CKPT)


def test_legacy_state_file_name_still_resumes(tmp_path, straight):
    """Checkpoints written before the transaction (``latest.state.safetensors``, no train_state in the header)."""
    run = tmp_path / "old"
    assert train(run, "--max_steps", "1") == 0
    ckpt = run / CKPT
    meta, tensors = checkpoint.load(ckpt)
    sp = checkpoint.state_path(ckpt, meta)
    sp.rename(checkpoint.state_path(ckpt, {}))  # <stem>.state.safetensors
    del meta["train_state"]
    from safetensors.torch import save_file

    save_file(tensors, str(ckpt), metadata={"fastp2p": json.dumps(meta)})
    assert train(run, "--max_steps", "2", "--resume") == 0
    assert_same(weights_and_state(run), straight(2))
    assert not checkpoint.state_path(ckpt, {}).exists()  # replaced by the new save's state file


def test_leftovers_do_not_block_a_fresh_start(tmp_path, caplog):
    ck = tmp_path / "run" / "checkpoints"
    ck.mkdir(parents=True)
    junk = [ck / ".latest.safetensors.abc123.tmp", ck / "latest.state.0000003-0123456789ab.safetensors"]
    for j in junk:
        j.write_bytes(b"half")
    (tmp_path / "run" / "metrics.jsonl").write_text('{"step": 1}\n{"step": 2}\n{"ste')  # cut short by a kill
    assert train(tmp_path / "run", "--max_steps", "1") == 0
    assert not any(j.exists() for j in junk)
    assert any("interrupted save" in r.getMessage() for r in caplog.records)
    rows = [json.loads(s) for s in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1]
    assert load_file(str(ck / "latest.safetensors"))  # a complete checkpoint now


# -- damaged checkpoints and --resume mistakes: one line naming the file or the flag -------------------------------
def _one_line(capsys, *names: str) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("fastp2p: error: ") and "Traceback" not in err[0], err
    for name in names:
        assert name in err[0], (name, err[0])
    return err[0]


@pytest.mark.parametrize("header,why", [({"fastp2p": "{not json"}, "not valid JSON"),
                                        ({"fastp2p": json.dumps({"step": 3})}, "no config"),
                                        ({"fastp2p": "[1, 2]"}, "no config"),
                                        ({"other": "x"}, "without fastp2p metadata")])
def test_damaged_header_is_one_line(tmp_path, capsys, header, why):
    from safetensors.torch import save_file

    bad = tmp_path / "bad.safetensors"
    save_file({"G.x": torch.zeros(2)}, str(bad), metadata=header)
    before = bad.read_bytes()
    capsys.readouterr()
    assert cli.main(["info", str(bad)]) == 2
    assert why in _one_line(capsys, str(bad))
    img = tmp_path / "in.png"
    from PIL import Image

    Image.new("RGB", (8, 8)).save(img)
    assert cli.main(["translate", str(img), "--checkpoint", str(bad), "-o", str(tmp_path / "out")]) == 2
    _one_line(capsys, str(bad))
    assert bad.read_bytes() == before


def test_truncated_files_on_resume_are_one_line(tmp_path, capsys):
    run = tmp_path / "run"
    assert train(run, "--max_steps", "1") == 0
    sp = checkpoint.state_path(run / CKPT, checkpoint.read_meta(run / CKPT))
    data = sp.read_bytes()
    sp.write_bytes(data[: len(data) // 2])
    capsys.readouterr()
    assert train(run, "--max_steps", "2", "--resume") == 2
    _one_line(capsys, sp.name, "cannot --resume")
    sp.write_bytes(data)
    weights = (run / CKPT).read_bytes()
    (run / CKPT).write_bytes(weights[: len(weights) - 1000])  # a header that reads, tensors cut short
    assert train(run, "--max_steps", "2", "--resume") == 2
    _one_line(capsys, str(run / CKPT))


def test_resume_with_another_architecture_names_the_flag(tmp_path, capsys):
    run = tmp_path / "run"
    assert train(run, "--max_steps", "1") == 0
    before = (run / CKPT).read_bytes()
    capsys.readouterr()
    assert train(run, "--max_steps", "2", "--resume", "--ngf", "8", "--norm", "instance") == 2
    line = _one_line(capsys, "--resume", "--ngf 4 (this command: 8)", "--norm batch (this command: instance)")
    assert "size mismatch" not in line
    assert (run / CKPT).read_bytes() == before


def test_resume_with_nothing_left_to_train_rewrites_nothing(tmp_path, caplog):
    run = tmp_path / "run"
    assert train(run, "--max_steps", "2") == 0
    files = {p: p.read_bytes() for p in [run / CKPT, run / "summary.json", *run.glob("checkpoints/*")]}
    caplog.clear()
    assert train(run, "--max_steps", "2", "--resume") == 0
    assert train(run, "--max_steps", "1", "--resume") == 0
    assert any("nothing to train" in r.getMessage() for r in caplog.records)
    assert {p: p.read_bytes() for p in files} == files


def test_the_same_command_twice_starts_a_second_run(tmp_path, caplog):
    """Without --name (the Quickstart's command), an existing run folder gets a sibling instead of an error."""
    base = ["train", *ARGS, "--out", str(tmp_path), "--max_steps", "1"]
    assert cli.main(base) == 0 and cli.main(base) == 0
    assert (tmp_path / "debug" / CKPT).is_file() and (tmp_path / "debug-2" / CKPT).is_file()
    assert any("debug-2" in r.getMessage() for r in caplog.records)
    assert cli.main([*base, "--name", "debug"]) == 2  # an explicit --name is never changed: it needs --resume

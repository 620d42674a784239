"""The official repo's train.py / test.py options (fastp2p/cli/official.py), per-epoch snapshots, and the README's
"Coming from the official repo" table: both columns run for real on a tiny dataset."""

import json
import logging
import os
import re
import shlex
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fastp2p import checkpoint
from fastp2p.cli import official
from fastp2p.cli.main import build_parser, main
from fastp2p.config import Config, ModelConfig
from fastp2p.errors import UserError
from fastp2p.models import build_generator

README = Path(__file__).resolve().parents[1] / "README.md"
TINY = ["--netG", "unet_128", "--ngf", "4", "--ndf", "4", "--load_size", "143", "--crop_size", "128",
        "--num_workers", "0", "--no_progress"]


def write_pairs(folder: Path, n: int = 2, seed: int = 0) -> Path:
    """n aligned A|B JPEGs of 256x128 (two 128x128 halves)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (128, 256, 3), dtype=np.uint8)).save(folder / f"{i + 1}.jpg")
    return folder


@pytest.fixture(autouse=True)
def keep_cuda_env():
    """The code under test sets CUDA_VISIBLE_DEVICES (as the CLI does before torch starts CUDA): restore it."""
    old = os.environ.get("CUDA_VISIBLE_DEVICES")
    yield
    if old is None:
        os.environ.pop("CUDA_VISIBLE_DEVICES", None)
    else:
        os.environ["CUDA_VISIBLE_DEVICES"] = old


def ns(*argv):
    return build_parser().parse_args([str(a) for a in argv])


def run(argv, capsys, monkeypatch) -> tuple[int, str]:
    argv = [str(a) for a in argv]
    monkeypatch.setattr(sys, "argv", ["fastp2p", *argv])  # what --gpu_ids 0,1 hands to torchrun
    try:
        rc = main(argv)
    except SystemExit as e:  # argparse errors exit from inside parse_args
        rc = e.code
    return rc, capsys.readouterr().err


def one_line(rc, err, *needles):
    lines = [ln for ln in err.splitlines() if ln.startswith("fastp2p: error")]
    assert rc == 2 and len(lines) == 1 and "Traceback" not in err, (rc, err)
    for n in needles:
        assert n in lines[0], (n, lines[0])


def fake_cuda(monkeypatch, count: int) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: count > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)


# -- --gpu_ids --------------------------------------------------------------------------------------------------------
def test_gpu_ids_minus_one_is_the_cpu_and_leaves_no_official_values():
    args = ns("train", "--gpu_ids", "-1", "--display_id", "0")
    official.apply_train(args)
    assert args.device == "cpu"
    assert not [k for k in vars(args) if k.startswith(official.PREFIX)]


def test_gpu_ids_one_gpu_sets_visible_devices(monkeypatch):
    fake_cuda(monkeypatch, 1)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    args = ns("train", "--gpu_ids", "0")
    official.apply_train(args)
    assert args.device == "cuda" and args.nproc is None and os.environ["CUDA_VISIBLE_DEVICES"] == "0"
    # numbered as this process sees the GPUs: within an existing CUDA_VISIBLE_DEVICES
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    official.apply_train(args := ns("train", "--gpu_ids", "1"))
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "5"


def test_gpu_ids_several_take_the_torchrun_path(monkeypatch):
    fake_cuda(monkeypatch, 2)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setattr(sys, "argv", ["fastp2p", "train", "--gpu_ids", "0,1"])
    args = ns("train", "--gpu_ids", "0,1")
    official.apply_train(args)
    assert (args.device, args.nproc, args.argv) == ("cuda", 2, ["train", "--gpu_ids", "0,1"])
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "0,1"
    # each rank torchrun starts parses the same command line: no second launch, the GPUs are chosen already
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "6,7")
    official.apply_train(args := ns("train", "--gpu_ids", "0,1"))
    assert (args.device, args.nproc, os.environ["CUDA_VISIBLE_DEVICES"]) == ("cuda", None, "6,7")


def test_gpu_ids_without_cuda_is_one_line_and_keeps_the_environment(monkeypatch, capsys):
    fake_cuda(monkeypatch, 0)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    with pytest.raises(UserError, match="--gpu_ids 0: no CUDA device"):
        official.apply_train(ns("train", "--gpu_ids", "0"))
    assert "CUDA_VISIBLE_DEVICES" not in os.environ


@pytest.mark.parametrize("argv, needles", [
    (["--gpu_ids", "-1", "--device", "cuda"], ["--gpu_ids -1", "--device cuda"]),
    (["--gpu_ids", "0", "--device", "cpu"], ["--gpu_ids 0", "--device cpu"]),
    (["--gpu_ids", "0,1", "--nproc", "3"], ["--gpu_ids 0,1", "--nproc 3"]),
    (["--gpu_ids", "0", "--nproc", "2"], ["--gpu_ids 0", "--nproc 2"]),
    (["--gpu_ids", "x"], ["--gpu_ids x"]),
    (["--gpu_ids", "0,0"], ["--gpu_ids 0,0", "twice"]),
])
def test_gpu_ids_contradictions_are_one_line(argv, needles, tmp_path, capsys, monkeypatch):
    fake_cuda(monkeypatch, 2)
    one_line(*run(["train", "--out", tmp_path, *argv], capsys, monkeypatch), *needles)


# -- counts in images, refusals, warnings
def test_freqs_in_images_become_steps():
    args = ns("train", "--batch_size", "4", "--print_freq", "100", "--display_freq", "400", "--save_latest_freq", "3")
    official.apply_train(args)
    assert (args.log_every, args.sample_every, args.save_every) == (25, 100, 1)  # 3 images < 1 batch: every step
    args = ns("train", "--print_freq", "100")
    official.apply_train(args)
    assert args.log_every == 100  # batch size 1: images = steps
    with pytest.raises(UserError, match="--print_freq 100 and --log_every 7"):
        official.apply_train(ns("train", "--print_freq", "100", "--log_every", "7"))


@pytest.mark.parametrize("argv, needle", [
    (["--model", "cycle_gan"], "--model cycle_gan"),
    (["--dataset_mode", "unaligned"], "--dataset_mode unaligned"),
    (["--serial_batches"], "--serial_batches"),
    (["--max_dataset_size", "10"], "--max_dataset_size 10"),
    (["--init_type", "xavier"], "--init_type xavier"),
    (["--init_gain", "0.05"], "--init_gain 0.05"),
    (["--pool_size", "50"], "--pool_size 50"),
    (["--save_by_iter"], "--save_by_iter"),
    (["--load_iter", "3"], "--load_iter 3"),
    (["--epoch_count", "3"], "--epoch_count 3"),
    (["--continue_train", "--epoch", "5"], "--epoch 5"),
    (["--gan_mode", "wgangp"], "--gan_mode"),
])
def test_options_that_would_change_results_are_refused(argv, needle, tmp_path, capsys, monkeypatch):
    one_line(*run(["train", "--out", tmp_path, *TINY, "--max_steps", "1", *argv], capsys, monkeypatch), needle)
    assert not (tmp_path / "pix2pix").exists()  # refused before anything is written


def test_the_implemented_values_are_accepted():
    args = ns("train", "--model", "pix2pix", "--dataset_mode", "aligned", "--pool_size", "0", "--init_type", "normal",
              "--init_gain", "0.02", "--max_dataset_size", "inf", "--load_iter", "0", "--epoch_count", "1",
              "--dataroot", "d", "--continue_train", "--checkpoints_dir", "c", "--num_threads", "3", "--phase", "val")
    official.apply_train(args)
    assert (args.data, args.resume, args.out, args.num_workers, args.phase) == ("d", True, "c", 3, "val")


def test_options_without_effect_warn_once_in_one_line(caplog):
    with caplog.at_level(logging.WARNING, logger="fastp2p.official"):
        official.apply_train(ns("train", "--display_id", "0", "--display_port", "8097", "--no_html"))
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and "\n" not in lines[0]
    assert all(f in lines[0] for f in ("--display_id", "--display_port", "--no_html", "TensorBoard"))


# -- per-epoch snapshots, keep_last, epoch numbering, resume
def train(tmp_path, name, data, *extra, capsys, monkeypatch):
    rc, err = run(["train", "--data", data, "--out", tmp_path / "runs", "--name", name, *TINY, *extra], capsys,
                  monkeypatch)
    assert rc == 0, err
    return tmp_path / "runs" / name


@pytest.mark.slow
def test_snapshots_keep_last_and_info_epoch_agrees_with_metrics(tmp_path, capsys, monkeypatch):
    data = write_pairs(tmp_path / "d", n=2)  # 2 steps an epoch at batch 1
    ck = tmp_path / "runs" / "s" / "checkpoints"
    ck.mkdir(parents=True)
    (ck / "10.safetensors").write_bytes(b"not ours")  # never pruned: not a fastp2p snapshot
    run_dir = train(tmp_path, "s", data, "--max_steps", "6", "--save_epoch_freq", "1", "--keep_last", "2",
                    "--log_every", "2", "--save_every", "3", capsys=capsys, monkeypatch=monkeypatch)
    assert set(checkpoint.snapshots(ck)) == {2, 3}
    assert not (ck / "1.safetensors").exists() and not (ck / "1.json").exists()
    assert (ck / "10.safetensors").read_bytes() == b"not ours" and (ck / "latest.safetensors").is_file()
    for e, p in checkpoint.snapshots(ck).items():
        meta, tensors = checkpoint.load(p)
        assert (meta["epoch"], meta["step"], "train_state" in meta) == (e, 2 * e, False)
        assert any(k.startswith("D.") for k in tensors)
    _, last = checkpoint.load(ck / "latest.safetensors")
    _, snap = checkpoint.load(ck / "3.safetensors")
    assert all(torch.equal(last[k], snap[k]) for k in snap)  # step 6 ends epoch 3: the same weights
    assert checkpoint.leftovers(ck / "latest.safetensors") == []  # snapshots are not leftovers ...
    (ck / ".2.safetensors.x1.tmp").write_bytes(b"")
    assert checkpoint.leftovers(ck / "latest.safetensors") == [ck / ".2.safetensors.x1.tmp"]  # ... their temps are
    # `fastp2p info`'s epoch is the metrics row's at the same step (the final save at step 6, the third epoch's end)
    rows = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]
    row = next(r for r in rows if r["step"] == 6 and "eval" not in r)
    capsys.readouterr()
    assert main(["info", str(ck / "latest.safetensors")]) == 0
    info = json.loads(capsys.readouterr().out)
    assert (info["step"], info["epoch"]) == (6, row["epoch"]) and row["epoch"] == 3


@pytest.mark.slow
def test_resume_after_snapshots_is_exact(tmp_path, capsys, monkeypatch, caplog):
    data = write_pairs(tmp_path / "d", n=2)
    snap = ["--save_epoch_freq", "1", "--log_every", "1"]
    a = train(tmp_path, "a", data, "--max_steps", "4", *snap, capsys=capsys, monkeypatch=monkeypatch)
    b = train(tmp_path, "b", data, "--max_steps", "3", *snap, capsys=capsys, monkeypatch=monkeypatch)
    # the checkpoint is at step 3, in epoch 2: --epoch_count 5 disagrees (one warning), 2 agrees (none)
    with caplog.at_level(logging.WARNING, logger="fastp2p.official"):
        official.apply_train(ns("train", "--out", tmp_path / "runs", "--name", "b", "--continue_train",
                                "--epoch_count", "5"))
        assert [r.getMessage() for r in caplog.records if "in epoch 2" in r.getMessage()]
        caplog.clear()
        official.apply_train(ns("train", "--out", tmp_path / "runs", "--name", "b", "--continue_train",
                                "--epoch_count", "2"))
        assert not caplog.records
    train(tmp_path, "b", data, "--max_steps", "4", *snap, "--continue_train", "--epoch_count", "2", capsys=capsys,
          monkeypatch=monkeypatch)
    for f in ("latest.safetensors", "1.safetensors", "2.safetensors"):
        _, ta = checkpoint.load(a / "checkpoints" / f)
        _, tb = checkpoint.load(b / "checkpoints" / f)
        assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta), f
    _, sa = checkpoint.load_state(a / "checkpoints" / "latest.safetensors")
    _, sb = checkpoint.load_state(b / "checkpoints" / "latest.safetensors")
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


# -- --name / --epoch selection, test.py's options
@pytest.fixture
def run_folder(tmp_path):
    """runs/r with latest + snapshot 5 (fastp2p) and runs/ref with a reference-style 3_net_G.pth."""
    cfg = Config(model=ModelConfig(netG="unet_128", ngf=4))
    G = build_generator("unet_128", 3, 3, 4, "batch", True)
    ck = tmp_path / "runs" / "r" / "checkpoints"
    checkpoint.save(ck / "latest.safetensors", cfg=cfg, G=G, step=10, epoch=5)
    checkpoint.save_snapshot(ck, 5, cfg=cfg, G=G, step=10)
    (tmp_path / "runs" / "ref").mkdir()
    torch.save({"x": torch.zeros(1)}, tmp_path / "runs" / "ref" / "3_net_G.pth")
    return tmp_path / "runs"


def test_epoch_resolution(run_folder):
    assert checkpoint.run_checkpoint(run_folder, "r", "5") == run_folder / "r" / "checkpoints" / "5.safetensors"
    assert checkpoint.run_checkpoint(run_folder, "r") == run_folder / "r" / "checkpoints" / "latest.safetensors"
    assert checkpoint.run_checkpoint(run_folder, "ref", "3") == run_folder / "ref" / "3_net_G.pth"
    with pytest.raises(UserError) as e:
        checkpoint.run_checkpoint(run_folder, "r", "7")
    msg = str(e.value)
    assert "\n" not in msg and str(run_folder / "r" / "checkpoints" / "7.safetensors") in msg
    assert "available epochs: 5, latest" in msg
    with pytest.raises(UserError, match="holds no checkpoints"):
        checkpoint.run_checkpoint(run_folder, "nope", "latest")
    with pytest.raises(UserError, match="--epoch ../x"):
        checkpoint.run_checkpoint(run_folder, "r", "../x")


def test_selection_flags_on_translate_eval_export(run_folder, tmp_path, capsys, monkeypatch):
    root = ["--checkpoints_dir", run_folder]
    args = ns("export", "--name", "r", "--epoch", "5", *root, "-o", tmp_path / "G.onnx")
    official.apply_selection(args, "src", "CHECKPOINT")
    assert args.src == str(run_folder / "r" / "checkpoints" / "5.safetensors")
    args = ns("translate", "x.png", "-o", tmp_path / "o", "--name", "r", "--which_epoch", "latest", *root,
              "--dataset_mode", "single")
    official.apply_translate(args)
    assert args.checkpoint.endswith("latest.safetensors") and args.layout == "single"
    one_line(*run(["translate", "x.png", "-o", tmp_path / "o"], capsys, monkeypatch), "--checkpoint or --engine",
             "--name")
    one_line(*run(["export", "-o", tmp_path / "G.onnx"], capsys, monkeypatch), "CHECKPOINT", "--name")
    one_line(*run(["translate", "x.png", "-o", tmp_path / "o", "--checkpoint", "G.safetensors", "--name", "r"],
                  capsys, monkeypatch), "--name")
    one_line(*run(["eval", "--data", tmp_path, "--name", "r", "--epoch", "9", *root], capsys, monkeypatch),
             "--epoch 9", "available epochs: 5, latest")
    one_line(*run(["eval", "--name", "r", *root], capsys, monkeypatch), "--data", "--dataroot")
    one_line(*run(["translate", "x.png", "-o", tmp_path / "o", "--name", "r", *root, "--model", "cycle_gan"],
                  capsys, monkeypatch), "--model cycle_gan")


def test_test_py_options_map_to_eval(run_folder, tmp_path, monkeypatch):
    data = tmp_path / "facades"
    for split in ("val", "test"):
        (data / split).mkdir(parents=True)
    base = ["eval", "--dataroot", data, "--name", "r", "--checkpoints_dir", run_folder]
    args = ns(*base, "--epoch", "5")
    official.apply_test(args)  # test.py's defaults: phase test, 50 images, results/<name>/<phase>_<epoch>, paper
    assert (args.data, args.max_images, args.out, args.mode) == (str(data / "test"), 50,
                                                                 str(Path("results/r/test_5")), None)
    args = ns(*base, "--phase", "val", "--num_test", "7", "--results_dir", tmp_path / "res", "--eval")
    official.apply_test(args)
    assert (args.data, args.max_images, args.out, args.mode) == (str(data / "val"), 7, str(tmp_path / "res" / "r" /
                                                                                             "val_latest"), "eval")
    args = ns("eval", "--data", data, "--name", "r", "--checkpoints_dir", run_folder)
    official.apply_test(args)  # fastp2p's own --data: as given (its val/ split, else test/), no image limit
    assert (args.data, args.max_images, args.out) == (str(data), None, None)
    for extra, needle in ((["--aspect_ratio", "2"], "--aspect_ratio 2"), (["--phase", "train"], "--phase train"),
                          (["--num_test", "3", "--max_images", "4"], "--num_test 3"),
                          (["--results_dir", "r", "-o", "o"], "--results_dir"),
                          (["--eval", "--mode", "paper"], "--eval"),
                          (["--load_size", "286"], "--load_size 286"), (["--model", "test"], "--model test")):
        with pytest.raises(UserError, match=re.escape(needle)):
            official.apply_test(ns(*base, *extra))


# -- the README's table, both columns
def readme_rows() -> list[tuple[str, str]]:
    text = README.read_text()
    section = text.split("## Coming from the official repo", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| `([^`]+)` \| `([^`]+)` \|$", section, flags=re.M)
    assert len(rows) >= 6, rows
    return rows


def as_fastp2p(cmd: str) -> list[str]:
    """A table cell as fastp2p argv: python train.py -> fastp2p train, python test.py -> fastp2p eval."""
    words = shlex.split(cmd)
    if words[:2] == ["python", "train.py"]:
        return ["train", *words[2:]]
    if words[:2] == ["python", "test.py"]:
        return ["eval", *words[2:]]
    assert words[0] == "fastp2p", cmd
    return words[1:]


def tiny(argv: list[str]) -> list[str]:
    """Training commands made tiny: 5 steps (5 epochs of 1 pair: the snapshot of epoch 5), 1 more to continue."""
    if argv[0] != "train":
        return argv
    steps = "6" if {"--resume", "--continue_train"} & set(argv) else "5" if "facades_pix2pix" in argv else "1"
    return [*argv, *TINY, "--max_steps", steps]


def gpus_needed(argv: list[str]) -> int:
    if "--device" in argv and argv[argv.index("--device") + 1] == "cuda" or "--gpu_ids" in argv:
        ids = argv[argv.index("--gpu_ids") + 1] if "--gpu_ids" in argv else "0"
        n = int(argv[argv.index("--nproc") + 1]) if "--nproc" in argv else len([i for i in ids.split(",")
                                                                                 if int(i) >= 0])
        return n
    return 0


@pytest.mark.slow
def test_readme_official_table_both_columns_run(tmp_path, capsys, monkeypatch):
    rows = readme_rows()
    have = torch.cuda.device_count() if torch.cuda.is_available() else 0
    results = {}
    for column in (0, 1):
        cwd = tmp_path / f"col{column}"
        for split in ("train", "val", "test"):
            write_pairs(cwd / "datasets" / "facades" / split, n=1 if split == "train" else 2,
                        seed={"train": 0, "val": 1, "test": 2}[split])
        monkeypatch.chdir(cwd)
        for row in rows:
            argv = tiny(as_fastp2p(row[column]))
            rc, err = run(argv, capsys, monkeypatch)
            if gpus_needed(argv) > have:  # this machine cannot run it: one line naming what is missing
                one_line(rc, err)
                assert re.search(r"cuda|CUDA|GPU|--nproc", err), err
            else:
                assert rc == 0, (row[column], err)
        run_dir = cwd / "runs" / "facades_pix2pix"
        assert (run_dir / "checkpoints" / "5.safetensors").is_file()
        for out in ("test_latest", "test_5"):
            assert (cwd / "results" / "facades_pix2pix" / out / "index.html").is_file()
        cfg = json.loads((run_dir / "config.json").read_text())
        cfg["data"].pop("data")  # ./datasets/facades vs datasets/facades
        scores = {out: {k: v for k, v in json.loads((cwd / "results" / "facades_pix2pix" / out /
                                                     "metrics.json").read_text()).items()
                        if k in ("images", "L1", "PSNR", "SSIM")}
                  for out in ("test_latest", "test_5")}
        results[column] = (cfg, scores)
    # the official command lines mean what the native ones do: the same run config and the same test scores
    assert results[0] == results[1]

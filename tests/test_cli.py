"""The command line end to end, in subprocesses, as a user runs it."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from fastp2p.models import init_weights
from fastp2p.models.reference import RefUnetGenerator


def run(*args, check=True, cwd=None):
    p = subprocess.run([sys.executable, "-m", "fastp2p", *args], capture_output=True, text=True, timeout=300, cwd=cwd)
    if check and p.returncode != 0:
        raise AssertionError(f"exit {p.returncode}\nstdout:\n{p.stdout}\nstderr:\n{p.stderr}")
    return p


def one_line_error(p, *needles):
    assert p.returncode != 0
    lines = [ln for ln in p.stderr.strip().splitlines() if ln.startswith("fastp2p: error") or "error:" in ln]
    assert lines, p.stderr
    assert "Traceback" not in p.stderr, p.stderr
    for n in needles:
        assert n in p.stderr, (n, p.stderr)


def write_pairs(folder, n=3, size=64):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (size, 2 * size, 3), dtype=np.uint8)).save(folder / f"p{i}.png")
    return folder


@pytest.mark.slow
def test_train_then_translate_round_trip(tmp_path):
    out = tmp_path / "runs"
    run("train", "--preset", "debug", "--netG", "unet_128", "--ngf", "4", "--ndf", "4", "--max_steps", "3",
        "--out", str(out), "--name", "rt", "--load_size", "136", "--crop_size", "128", "--no_progress")
    ckpt = out / "rt" / "checkpoints" / "latest.safetensors"
    assert ckpt.is_file() and (out / "rt" / "metrics.jsonl").is_file()
    info = json.loads(run("info", str(ckpt)).stdout)
    assert info["step"] == 3 and info["config"]["model"]["netG"] == "unet_128"
    pairs = write_pairs(tmp_path / "in", n=3, size=64)
    res = tmp_path / "res"
    run("translate", "--checkpoint", str(ckpt), str(pairs), "-o", str(res), "--batch_size", "2", "--mode", "eval")
    outs = sorted(p.name for p in res.iterdir())
    assert outs == ["p0.png", "p1.png", "p2.png"]
    assert Image.open(res / "p0.png").size == (128, 128)


def test_reference_pth_translate_and_convert_round_trip(tmp_path):
    ref = init_weights(RefUnetGenerator(3, 3, 7, 8, "batch", use_dropout=True))
    sd = {"module." + k: v for k, v in ref.state_dict().items()}
    pth = tmp_path / "latest_net_G.pth"
    torch.save(sd, pth)
    conv = tmp_path / "G.safetensors"
    run("convert", str(pth), "-o", str(conv), "--netG", "unet_128")
    back = tmp_path / "back.pth"
    run("convert", str(conv), "-o", str(back), "--to", "reference")
    sd2 = torch.load(back, weights_only=True)
    assert sd2.keys() == ref.state_dict().keys()
    assert all(torch.equal(sd2[k], v) for k, v in ref.state_dict().items())
    # translating with the .pth and with the converted file gives the same pixels (eval mode: deterministic)
    pairs = write_pairs(tmp_path / "in", n=2, size=128)
    a, b = tmp_path / "a", tmp_path / "b"
    run("translate", "--checkpoint", str(pth), "--netG", "unet_128", str(pairs), "-o", str(a), "--mode", "eval",
        "--crop_size", "128")
    run("translate", "--checkpoint", str(conv), str(pairs), "-o", str(b), "--mode", "eval", "--crop_size", "128")
    for name in ("p0.png", "p1.png"):
        assert np.array_equal(np.asarray(Image.open(a / name)), np.asarray(Image.open(b / name)))
    # and matches the reference net run by hand on the source half (AtoB: left half), eval mode
    img = Image.open(pairs / "p0.png").convert("RGB").crop((0, 0, 128, 128)).resize((128, 128), Image.BICUBIC)
    x = torch.from_numpy(np.array(img)).permute(2, 0, 1)[None].float() / 127.5 - 1
    with torch.no_grad():
        y = ref.eval()(x)
    expect = ((y[0].permute(1, 2, 0) + 1) * 127.5).clamp(0, 255).to(torch.uint8).numpy()
    got = np.asarray(Image.open(a / "p0.png"))
    assert np.abs(got.astype(int) - expect.astype(int)).max() <= 1


def test_architecture_mismatch_is_one_clear_line(tmp_path):
    ref = init_weights(RefUnetGenerator(3, 3, 7, 8, "batch"))
    pth = tmp_path / "latest_net_G.pth"
    torch.save(ref.state_dict(), pth)
    pairs = write_pairs(tmp_path / "in", n=1)
    p = run("translate", "--checkpoint", str(pth), str(pairs), "-o", str(tmp_path / "o"), check=False)
    one_line_error(p, "latest_net_G.pth", "--netG unet_128")
    p = run("translate", "--checkpoint", str(pth), "--netG", "unet_128", "--norm", "instance", str(pairs), "-o",
            str(tmp_path / "o"), check=False)
    one_line_error(p, "latest_net_G.pth", "--norm")


def test_user_mistakes_exit_nonzero_with_one_line(tmp_path):
    one_line_error(run("train", "--data", str(tmp_path / "nope"), "--out", str(tmp_path), check=False), "--data",
                   "nope")
    one_line_error(run("train", "--norm", "group", check=False), "--norm")
    one_line_error(run("train", "--preset", "huge", "--out", str(tmp_path), check=False), "--preset")
    one_line_error(run("translate", "--checkpoint", str(tmp_path / "missing.safetensors"), str(tmp_path), "-o",
                       str(tmp_path / "o"), check=False), "missing.safetensors")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a checkpoint")
    one_line_error(run("info", str(bad), check=False), "bad.safetensors")


def test_translate_with_onnx_engine_matches_checkpoint(tmp_path):
    pytest.importorskip("onnxruntime")
    ref = init_weights(RefUnetGenerator(3, 3, 7, 8, "batch", use_dropout=True))
    pth = tmp_path / "latest_net_G.pth"
    torch.save(ref.state_dict(), pth)
    ckpt = tmp_path / "G.safetensors"
    run("convert", str(pth), "-o", str(ckpt), "--netG", "unet_128")
    onnx_path = tmp_path / "G.onnx"
    run("export", str(ckpt), "-o", str(onnx_path), "--mode", "eval", "--crop_size", "128")
    pairs = write_pairs(tmp_path / "in", n=2, size=128)
    a, b = tmp_path / "a", tmp_path / "b"
    run("translate", "--checkpoint", str(ckpt), str(pairs), "-o", str(a), "--mode", "eval", "--crop_size", "128")
    run("translate", "--engine", str(onnx_path), str(pairs), "-o", str(b), "--crop_size", "128")
    for name in ("p0.png", "p1.png"):
        diff = np.abs(np.asarray(Image.open(a / name)).astype(int) - np.asarray(Image.open(b / name)).astype(int))
        assert diff.max() <= 1
    p = run("translate", "--engine", str(onnx_path), "--mode", "paper", str(pairs), "-o", str(b), check=False)
    one_line_error(p, "eval")


@pytest.mark.slow
def test_ctrl_c_saves_a_checkpoint_and_resume_continues(tmp_path):
    import signal
    import time

    out = tmp_path / "runs"
    args = [sys.executable, "-m", "fastp2p", "train", "--preset", "debug", "--ngf", "4", "--ndf", "4", "--out",
            str(out), "--name", "int", "--load_size", "136", "--crop_size", "128", "--log_every", "1",
            "--no_progress"]
    p = subprocess.Popen([*args, "--max_steps", "100000"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = out / "int" / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 3):
        time.sleep(0.2)
    p.send_signal(signal.SIGINT)
    stdout, stderr = p.communicate(timeout=120)
    assert p.returncode == 130, stderr
    assert "Traceback" not in stderr and "--resume" in stderr
    step = json.loads((out / "int" / "checkpoints" / "latest.json").read_text())["step"]
    assert step >= 3
    p2 = subprocess.run([*args, "--max_steps", str(step + 2), "--resume"], capture_output=True, text=True,
                        timeout=300)
    assert p2.returncode == 0, p2.stderr
    assert json.loads((out / "int" / "checkpoints" / "latest.json").read_text())["step"] == step + 2


def test_translate_kernels_switch_gives_the_same_images(tmp_path):
    """translate --kernels triton (interpreted on CPU) == --kernels torch, in both inference modes."""
    pytest.importorskip("triton")
    from fastp2p.translate import translate_paths

    ref = init_weights(RefUnetGenerator(3, 3, 7, 4, "batch", use_dropout=True))
    pth = tmp_path / "latest_net_G.pth"
    torch.save(ref.state_dict(), pth)
    pairs = write_pairs(tmp_path / "in", n=2, size=128)
    from fastp2p.config import ModelConfig

    for mode in ("eval", "paper"):
        outs = {}
        for k in ("torch", "triton"):
            outs[k] = tmp_path / f"{mode}-{k}"
            translate_paths([str(pairs)], str(pth), outs[k], mode=mode, dropout=False, crop_size=128,
                            model=ModelConfig(netG="unet_128"), kernels=k)
        for name in ("p0.png", "p1.png"):
            a = np.asarray(Image.open(outs["torch"] / name)).astype(int)
            b = np.asarray(Image.open(outs["triton"] / name)).astype(int)
            assert np.abs(a - b).max() <= 1

"""Bad inputs, every subcommand: one line ``fastp2p: error: <culprit>: <problem>`` on stderr, exit 2, no traceback, and
no input file touched (issue 13, the input side).

Each case runs ``fastp2p.cli.main`` in-process on a shared folder of hostile inputs (a PNG claiming 30000 x 30000, ONNX
files with corrupt metadata, a text file named like a checkpoint, ...); only the closed-stdout case needs a subprocess.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fastp2p.checkpoint import save
from fastp2p.cli import main
from fastp2p.config import Config, DataConfig, ModelConfig
from fastp2p.errors import DataError, UserError
from fastp2p.models import build_generator


def png_claiming(w: int, h: int) -> bytes:
    """A valid PNG header claiming w x h RGB pixels, with (almost) no pixel data: a decompression bomb's header."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\x00" * 16)) + chunk(b"IEND", b""))


def tiny_onnx(path: Path, props: dict[str, str]) -> Path:
    """An Identity graph carrying ``props`` as metadata: enough for every metadata check (no export needed)."""
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper

    shape = ["N", 3, 128, 128]
    graph = helper.make_graph([helper.make_node("Identity", ["input"], ["output"])], "g",
                              [helper.make_tensor_value_info("input", TensorProto.FLOAT, shape)],
                              [helper.make_tensor_value_info("output", TensorProto.FLOAT, shape)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    for k, v in props.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = k, v
    onnx.save(model, str(path))
    return path


def good_meta() -> dict[str, str]:
    from fastp2p.engines.onnx import FORMAT

    meta = {"format": FORMAT, "mode": "paper", "dropout": "off", "precision": "fp32",
            "preprocessing": {"crop_size": 128, "direction": "AtoB"},
            "arch": {"netG": "unet_128", "num_downs": 7, "ngf": 4, "norm": "batch", "use_dropout": True,
                     "input_nc": 3, "output_nc": 3},
            "input": {"name": "input", "shape": ["N", 3, 128, 128]}, "dynamic_hw": False, "size_multiple": 128,
            "opset": 18}
    return {f"fastp2p.{k}": json.dumps(v) if isinstance(v, (dict, bool, int)) else v for k, v in meta.items()}


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> Path:
    """The hostile inputs (never written to by any case: see ``tree_hash``)."""
    e = tmp_path_factory.mktemp("bad_inputs")
    torch.manual_seed(0)
    cfg = Config(ModelConfig(netG="unet_128", ngf=4), DataConfig(crop_size=128, load_size=128))
    save(e / "G.safetensors", cfg=cfg, G=build_generator("unet_128", ngf=4))
    rng = np.random.default_rng(0)
    (e / "good").mkdir()
    for i in range(2):
        Image.fromarray(rng.integers(0, 255, (32, 64, 3), dtype=np.uint8)).save(e / "good" / f"p{i}.png")
    (e / "bomb").mkdir()
    (e / "bomb" / "big.png").write_bytes(png_claiming(30000, 30000))  # 900 M pixels: PIL's DecompressionBombError
    (e / "warn").mkdir()
    (e / "warn" / "wide.png").write_bytes(png_claiming(20000, 5000))  # 100 M: PIL only warns (and decodes)
    for side, size in (("A", (32, 32)), ("B", (48, 24))):  # a two-folder pair of different sizes
        (e / "twof" / side).mkdir(parents=True)
        Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(e / "twof" / side / "x.png")
    (e / "empty").mkdir()
    (e / "folder.safetensors").mkdir()
    (e / "notes.txt").write_text("not a model, not an image")
    (e / "clip.mp4").write_text("not a video")
    (e / "fake.onnx").write_text("not onnx")
    torch.save([1, 2, 3], e / "list.pth")
    (e / "text.pth").write_text("not a torch file")
    meta = good_meta()
    tiny_onnx(e / "G.onnx", meta)
    tiny_onnx(e / "badjson.onnx", {**meta, "fastp2p.arch": "{not json"})
    tiny_onnx(e / "noarch.onnx", {k: v for k, v in meta.items() if k != "fastp2p.arch"})
    tiny_onnx(e / "nocrop.onnx", {**meta, "fastp2p.preprocessing": "{}"})
    return e


def tree_hash(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def run_main(argv: list[str], capsys) -> tuple[int, str]:
    try:
        rc = main([str(a) for a in argv])
    except SystemExit as e:  # argparse errors exit from inside parse_args
        rc = e.code
    return rc, capsys.readouterr().err


def assert_one_line(rc, err: str, needles) -> None:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert rc == 2, (rc, err)
    assert "Traceback" not in err, err
    assert len(lines) == 1 and lines[0].startswith("fastp2p: error: "), err
    for n in needles:
        assert n in lines[0], (n, lines[0])


TRAIN = ["train", "--preset", "debug", "--ngf", "4", "--ndf", "4", "--max_steps", "1", "--no_progress",
         "--num_workers", "0"]


def _broken_dali(monkeypatch) -> None:
    from fastp2p.data import backends

    monkeypatch.setattr(backends, "dali_available", lambda: True)
    monkeypatch.setattr(backends, "dali_load_error",
                        lambda: "ImportError: libcudart.so.13: cannot open shared object file: No such file")


# (id, argv with {e} = the inputs folder and {o} = a fresh output folder, needles in the error line[, setup])
CASES = [
    # hostile / huge images, wherever images are opened
    ("translate/bomb png", ["translate", "--checkpoint", "{e}/G.safetensors", "{e}/bomb", "-o", "{o}"],
     ["big.png", "900,000,000 pixels", "--max_pixels"]),
    ("translate/bomb warning zone", ["translate", "--checkpoint", "{e}/G.safetensors", "{e}/warn", "-o", "{o}"],
     ["wide.png", "--max_pixels"]),
    ("translate/--max_pixels", ["translate", "--checkpoint", "{e}/G.safetensors", "{e}/good", "-o", "{o}",
                                "--max_pixels", "100"], ["p0.png", "64x32", "--max_pixels 100"]),
    ("translate/--max_pixels 0", ["translate", "--checkpoint", "{e}/G.safetensors", "{e}/good", "-o", "{o}",
                                  "--max_pixels", "0"], ["--max_pixels"]),
    ("eval/bomb png", ["eval", "--checkpoint", "{e}/G.safetensors", "--data", "{e}/bomb", "-o", "{o}"],
     ["big.png", "--max_pixels"]),
    ("eval/bomb warning zone", ["eval", "--checkpoint", "{e}/G.safetensors", "--data", "{e}/warn", "-o", "{o}"],
     ["wide.png", "--max_pixels"]),
    ("train/bomb png", [*TRAIN, "--data", "{e}/bomb", "--out", "{o}"], ["big.png", "--max_pixels"]),
    ("train/bomb warning zone", [*TRAIN, "--data", "{e}/warn", "--out", "{o}"], ["wide.png", "--max_pixels"]),
    ("pipe/--size huge", ["pipe", "--size", "100000x100000", "--checkpoint", "{e}/G.safetensors"],
     ["--size 100000x100000", "--max_pixels"]),
    ("pipe/--size 0x5", ["pipe", "--size", "0x5", "--checkpoint", "{e}/G.safetensors"], ["--size"]),
    ("pipe/--size abc", ["pipe", "--size", "abc", "--checkpoint", "{e}/G.safetensors"], ["--size", "WIDTHxHEIGHT"]),
    ("pipe/--max_latency_ms -1", ["pipe", "--size", "8x8", "--checkpoint", "{e}/G.safetensors",
                                  "--max_latency_ms", "-1"], ["--max_latency_ms"]),
    ("translate/--crop_size huge", ["translate", "--checkpoint", "{e}/G.safetensors", "{e}/good", "-o", "{o}",
                                    "--crop_size", "131072"], ["--crop_size 131072", "--max_pixels"]),
    ("export/--crop_size huge", ["export", "{e}/G.safetensors", "-o", "{o}/G.onnx", "--crop_size", "131072"],
     ["--crop_size 131072"]),
    ("train/--load_size huge", [*TRAIN, "--load_size", "200000", "--out", "{o}"], ["--load_size 200000"]),
    ("train/--ngf huge", [*TRAIN[:3], "--ngf", "100000", *TRAIN[5:], "--out", "{o}"], ["--ngf 100000", "GiB"]),
    # engines: corrupt or incomplete metadata
    ("translate/onnx corrupt JSON", ["translate", "--engine", "{e}/badjson.onnx", "{e}/good", "-o", "{o}"],
     ["badjson.onnx", "fastp2p.arch", "not JSON"]),
    ("translate/onnx without arch", ["translate", "--engine", "{e}/noarch.onnx", "{e}/good", "-o", "{o}"],
     ["noarch.onnx", "fastp2p.arch"]),
    ("eval/onnx without crop_size", ["eval", "--engine", "{e}/nocrop.onnx", "--data", "{e}/good", "-o", "{o}"],
     ["nocrop.onnx", "crop_size"]),
    ("build-engine/onnx corrupt JSON", ["build-engine", "{e}/badjson.onnx", "-o", "{o}/G.plan"], ["badjson.onnx"]),
    ("build-engine/ort, onnx without arch", ["build-engine", "{e}/noarch.onnx", "-o", "{o}/G.ort.onnx",
                                             "--backend", "onnxruntime"], ["noarch.onnx"]),
    ("pipe/onnx corrupt JSON", ["pipe", "--size", "8x8", "--engine", "{e}/badjson.onnx"], ["badjson.onnx"]),
    ("translate/not onnx", ["translate", "--engine", "{e}/fake.onnx", "{e}/good", "-o", "{o}"], ["fake.onnx"]),
    ("build-engine/flags an .onnx ignores", ["build-engine", "{e}/G.onnx", "-o", "{o}/G.ort.onnx", "--backend",
                                             "onnxruntime", "--mode", "eval"], ["--mode eval", "G.onnx"]),
    ("build-engine/--workspace -5", ["build-engine", "{e}/G.onnx", "-o", "{o}/G.plan", "--workspace", "-5"],
     ["--workspace"]),
    ("build-engine/source is a folder", ["build-engine", "{e}/empty", "-o", "{o}/G.plan"], ["empty", "folder"]),
    ("build-engine/--timing_cache folder", ["build-engine", "{e}/G.onnx", "-o", "{o}/G.plan", "--timing_cache",
                                            "{e}/empty"], ["--timing_cache"]),
    ("export/--opset 999", ["export", "{e}/G.safetensors", "-o", "{o}/G.onnx", "--opset", "999"], ["--opset 999"]),
    ("export/--crop_size 100", ["export", "{e}/G.safetensors", "-o", "{o}/G.onnx", "--crop_size", "100"],
     ["--crop_size 100", "unet_128", "a multiple of 128"]),
    # train flags, reported before anything is built
    ("train/--lr -1", [*TRAIN, "--lr", "-1"], ["--lr"]),
    ("train/--lr 0", [*TRAIN, "--lr", "0"], ["--lr"]),
    ("train/--lr nan", [*TRAIN, "--lr", "nan"], ["--lr"]),
    ("train/--beta1 1", [*TRAIN, "--beta1", "1"], ["--beta1", "[0, 1)"]),
    ("train/--beta1 -0.1", [*TRAIN, "--beta1", "-0.1"], ["--beta1"]),
    ("train/--lambda_L1 -3", [*TRAIN, "--lambda_L1", "-3"], ["--lambda_L1"]),
    ("train/--num_workers -1", [*TRAIN, "--num_workers", "-1"], ["--num_workers"]),
    ("train/--n_epochs -1", [*TRAIN, "--n_epochs", "-1"], ["--n_epochs"]),
    ("train/--n_epochs_decay -1", [*TRAIN, "--n_epochs_decay", "-1"], ["--n_epochs_decay"]),
    ("train/no epochs", [*TRAIN, "--n_epochs", "0", "--n_epochs_decay", "0"], ["--n_epochs 0 --n_epochs_decay 0"]),
    ("train/cosine without epochs", [*TRAIN, "--lr_policy", "cosine", "--n_epochs", "0", "--n_epochs_decay", "3"],
     ["--n_epochs 0", "cosine"]),
    ("train/--dist_timeout 0", [*TRAIN, "--dist_timeout", "0"], ["--dist_timeout"]),
    ("train/--crop_size unet_128", [*TRAIN, "--crop_size", "200", "--load_size", "220"],
     ["--crop_size 200", "unet_128", "a multiple of 128", "128 or 256"]),
    ("train/--crop_size unet_256", [*TRAIN, "--netG", "unet_256", "--crop_size", "128", "--load_size", "143"],
     ["--crop_size 128", "unet_256", "a multiple of 256"]),
    ("train/--n_layers_D without n_layers", [*TRAIN, "--n_layers_D", "5"], ["--n_layers_D 5", "--netD n_layers"]),
    ("train/--n_layers_D too deep", [*TRAIN, "--netD", "n_layers", "--n_layers_D", "7"], ["--n_layers_D 7"]),
    ("train/--loader dali unloadable", [*TRAIN, "--loader", "dali", "--out", "{o}"],
     ["--loader dali", "libcudart.so.13", "--loader torch"], _broken_dali),
    ("train/--data a file", [*TRAIN, "--data", "{e}/notes.txt"], ["notes.txt"]),
    ("train/--data two folders of different sizes", [*TRAIN, "--data", "{e}/twof", "--out", "{o}"],
     ["x.png", "differs"]),
    # eval
    ("eval/two folders of different sizes", ["eval", "--checkpoint", "{e}/G.safetensors", "--data", "{e}/twof",
                                            "-o", "{o}"], ["twof/A/x.png", "32x32", "48x24"]),
    ("eval/--crop_size 100", ["eval", "--checkpoint", "{e}/G.safetensors", "--data", "{e}/good", "-o", "{o}",
                              "--crop_size", "100"], ["--crop_size 100", "a multiple of 128"]),
    ("eval/--checkpoint a text file", ["eval", "--checkpoint", "{e}/notes.txt", "--data", "{e}/good", "-o", "{o}"],
     ["--checkpoint", "notes.txt"]),
    ("eval/empty folder", ["eval", "--checkpoint", "{e}/G.safetensors", "--data", "{e}/empty", "-o", "{o}"],
     ["empty"]),
    # checkpoints given where they do not belong, or flags they contradict
    ("translate/--checkpoint a text file", ["translate", "--checkpoint", "{e}/notes.txt", "{e}/good", "-o", "{o}"],
     ["--checkpoint", "notes.txt"]),
    ("translate/--checkpoint a folder", ["translate", "--checkpoint", "{e}/folder.safetensors", "{e}/good", "-o",
                                         "{o}"], ["--checkpoint", "folder.safetensors", "folder"]),
    ("translate/.pth not a state dict", ["translate", "--checkpoint", "{e}/list.pth", "{e}/good", "-o", "{o}"],
     ["list.pth"]),
    ("convert/.pth not a torch file", ["convert", "{e}/text.pth", "-o", "{o}/x.safetensors"],
     ["text.pth", "not a torch .pth file"]),
    ("translate/--netG contradicts the checkpoint", ["translate", "--checkpoint", "{e}/G.safetensors", "{e}/good",
                                                     "-o", "{o}", "--netG", "unet_256"], ["--netG unet_256"]),
    ("translate/--crop_size 100", ["translate", "--checkpoint", "{e}/G.safetensors", "{e}/good", "-o", "{o}",
                                   "--crop_size", "100"], ["--crop_size 100", "use --crop_size 128"]),
    ("translate/text file as image", ["translate", "--checkpoint", "{e}/G.safetensors", "{e}/notes.txt", "-o",
                                      "{o}"], ["notes.txt"]),
    ("translate/empty folder", ["translate", "--checkpoint", "{e}/G.safetensors", "{e}/empty", "-o", "{o}"],
     ["empty"]),
    ("translate/missing input", ["translate", "--checkpoint", "{e}/G.safetensors", "{e}/nope.png", "-o", "{o}"],
     ["nope.png"]),
    ("translate/--batch_size 0", ["translate", "--checkpoint", "{e}/G.safetensors", "{e}/good", "-o", "{o}",
                                  "--batch_size", "0"], ["--batch_size"]),
    ("translate/video among images", ["translate", "--checkpoint", "{e}/G.safetensors", "{e}/clip.mp4", "{e}/good",
                                      "-o", "{o}"], ["clip.mp4", "only INPUT"]),
    ("translate/video with --crop_size", ["translate", "--checkpoint", "{e}/G.safetensors", "{e}/clip.mp4", "-o",
                                          "{o}/out.mp4", "--crop_size", "128"], ["--crop_size", "video"]),
    ("pipe/--checkpoint a text file", ["pipe", "--size", "8x8", "--checkpoint", "{e}/notes.txt"], ["--checkpoint"]),
    ("convert/already fastp2p", ["convert", "{e}/G.safetensors", "-o", "{o}/x.safetensors"], ["already a fastp2p"]),
    ("convert/--netG contradicts", ["convert", "{e}/G.safetensors", "-o", "{o}/x.pth", "--to", "reference",
                                    "--netG", "unet_256"], ["--netG unet_256"]),
    ("convert/text file", ["convert", "{e}/notes.txt", "-o", "{o}/x.safetensors"], ["notes.txt"]),
    ("info/not an onnx file", ["info", "{e}/fake.onnx"], ["fake.onnx", "not a readable ONNX"]),
    ("info/a folder", ["info", "{e}/folder.safetensors"], ["folder.safetensors", "folder"]),
    ("info/a text file", ["info", "{e}/notes.txt"], ["notes.txt"]),
    ("bench/--large-batch 0", ["bench", "train", "--large-batch", "0"], ["--large-batch"]),
    ("translate/--seed overflow", ["translate", "--checkpoint", "{e}/G.safetensors", "{e}/good", "-o", "{o}",
                                   "--seed", str(2**64)], ["--seed"]),
    ("eval/--seed overflow", ["eval", "--checkpoint", "{e}/G.safetensors", "--data", "{e}/good", "-o", "{o}",
                              "--seed", str(-(2**63) - 1)], ["--seed"]),
    ("train/--seed overflow", [*TRAIN, "--seed", str(2**64)], ["--seed"]),
    ("train/--nproc more than cores", [*TRAIN, "--nproc", "100000"], ["--nproc 100000"]),
    ("fastp2p/unknown command", ["nope"], ["nope"]),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line(case, env, tmp_path, capsys, monkeypatch):
    _, argv, needles, *setup = case
    for s in setup:
        s(monkeypatch)
    argv = [a.replace("{e}", str(env)).replace("{o}", str(tmp_path / "out")) for a in argv]
    if "train" in argv[:1] and "--out" not in argv:
        argv += ["--out", str(tmp_path / "runs")]
    before = tree_hash(env)
    rc, err = run_main(argv, capsys)
    assert_one_line(rc, err, needles)
    assert tree_hash(env) == before, "an input file changed"


def test_video_frame_size_over_max_pixels(env, tmp_path, capsys):
    av = pytest.importorskip("av")
    clip = tmp_path / "tiny.mp4"
    out = av.open(str(clip), "w")
    stream = out.add_stream("mpeg4", rate=5)
    stream.width = stream.height = 32
    stream.pix_fmt = "yuv420p"
    for i in range(2):
        out.mux(stream.encode(av.VideoFrame.from_ndarray(np.full((32, 32, 3), 40 * i, np.uint8), format="rgb24")))
    out.mux(stream.encode(None))
    out.close()
    rc, err = run_main(["translate", "--checkpoint", env / "G.safetensors", clip, "-o", tmp_path / "o.mp4",
                        "--max_pixels", "100"], capsys)
    assert_one_line(rc, err, ["tiny.mp4", "32x32", "--max_pixels 100"])
    assert not (tmp_path / "o.mp4").exists()


def test_library_open_image_refuses_bombs_without_the_cli(env):
    """Outside the command (no warnings filter) the same limit holds: a DataError, not PIL's error or a decode."""
    from fastp2p.images import open_image

    with pytest.raises(DataError, match="big.png.*--max_pixels"):  # PIL raises DecompressionBombError here
        with open_image(env / "bomb" / "big.png"):
            pass
    with pytest.warns(Image.DecompressionBombWarning), pytest.raises(DataError, match="wide.png.*--max_pixels"):
        with open_image(env / "warn" / "wide.png"):  # PIL only warns here; the limit still refuses it
            pass
    with open_image(env / "good" / "p0.png", max_pixels=64 * 32) as im:  # the limit is inclusive
        assert im.size == (64, 32)


def test_training_dataset_skips_a_bomb_with_skip_bad(env, tmp_path):
    from fastp2p.data import build_dataset

    data = tmp_path / "mixed"
    data.mkdir()
    (data / "big.png").write_bytes((env / "bomb" / "big.png").read_bytes())
    Image.open(env / "good" / "p0.png").save(data / "ok.png")
    cfg = DataConfig(data=str(data), load_size=64, crop_size=32, skip_bad=True)
    ds = build_dataset(cfg)
    assert len(ds) == 1 and ds.bad_files[0][0].endswith("big.png") and "--max_pixels" in ds.bad_files[0][1]
    (data / "big.png").unlink()
    with pytest.raises(DataError, match="ok.png: 64x32 is 2,048 pixels, more than --max_pixels 100"):
        build_dataset(DataConfig(data=str(data), load_size=64, crop_size=32, max_pixels=100))


@pytest.mark.parametrize("sidecar, needle", [
    (b"{not json", "unreadable sidecar"),
    (b"\xff\xfe\x00binary", "unreadable sidecar"),
    (b"[1, 2]", "not a fastp2p TensorRT sidecar"),
    (None, "mode"),  # the right format, nothing else
])
def test_plan_sidecar_problems_name_the_file(tmp_path, sidecar, needle):
    from fastp2p.engines import tensorrt as trt

    plan = tmp_path / "G.plan"
    plan.write_bytes(b"engine bytes")
    if sidecar is None:
        sidecar = json.dumps({"format": trt.PLAN_FORMAT}).encode()
    trt.sidecar_path(plan).write_bytes(sidecar)
    with pytest.raises(UserError, match="G.plan.json") as e:
        trt.read_plan_meta(plan)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_unet_size_rule_matches_the_network():
    """``size_problem`` says exactly which sizes the U-Net takes: every size it accepts runs, every other fails."""
    from fastp2p.models.unet import size_problem

    G = build_generator("unet_128", ngf=1).train()
    for s in (64, 128, 160, 192, 256):
        try:
            G(torch.zeros(1, 3, s, s))
            ran = True
        except (RuntimeError, ValueError):
            ran = False
        assert ran == (size_problem(s, 7) is None), s


def test_closed_stdout_exits_quietly(env):
    """``fastp2p info CKPT | head -1``: the reader is gone before anything is written. Exit 141, no traceback."""
    r, w = os.pipe()
    os.close(r)  # closed before the child writes: its first write gets EPIPE, deterministically
    try:
        p = subprocess.run([sys.executable, "-m", "fastp2p", "info", str(env / "G.safetensors")], stdout=w,
                           stderr=subprocess.PIPE, text=True, timeout=120)
    finally:
        os.close(w)
    assert p.returncode == 141, p.stderr
    assert p.stderr.strip() == "", p.stderr


def test_preprocess_none_with_sizes_the_unet_cannot_take(tmp_path, capsys):
    """--preprocess none keeps each image's size, which only the data tells: checked on the first pair in fit."""
    data = tmp_path / "pairs"
    data.mkdir()
    Image.fromarray(np.zeros((100, 200, 3), dtype=np.uint8)).save(data / "p.png")  # A|B halves of 100 x 100
    code = main(["train", "--preset", "debug", "--data", str(data), "--preprocess", "none", "--num_workers", "0",
                 "--max_steps", "1", "--out", str(tmp_path / "runs"), "--no_progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "Traceback" not in err[0], err
    assert "p.png" in err[0] and "100x100" in err[0] and "--preprocess none" in err[0] and "multiples of 128" in err[0]

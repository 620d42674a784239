"""Output paths of every subcommand (``fastp2p.outputs``): never an input, never a foreign file without --overwrite,
and a wrong or unwritable path is one ``fastp2p: error:`` line with nothing written. In process (``cli.main``), on a
tiny unet_128 and 32 x 64 images."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import tempfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from fastp2p import outputs
from fastp2p.checkpoint import save
from fastp2p.cli import main
from fastp2p.config import Config, DataConfig, ModelConfig
from fastp2p.errors import UserError
from fastp2p.models import build_generator, init_weights
from fastp2p.models.reference import RefUnetGenerator

HAVE_AV = importlib.util.find_spec("av") is not None
HAVE_ONNX = importlib.util.find_spec("onnx") is not None and importlib.util.find_spec("onnxruntime") is not None
needs_av = pytest.mark.skipif(not HAVE_AV, reason="PyAV not installed (pip install 'fastp2p[video]')")
needs_onnx = pytest.mark.skipif(not HAVE_ONNX, reason="onnx / onnxruntime not installed (pip install 'fastp2p[onnx]')")


def _unwritable_root() -> Path:
    """A folder even root cannot write in (sysfs refuses new files); the cases that need one skip without it."""
    for cand in (Path("/sys"), Path("/proc")):
        if cand.is_dir():
            try:
                fd, probe = tempfile.mkstemp(dir=cand)
            except OSError:
                return cand
            os.close(fd)
            os.unlink(probe)
    return Path()


UNWRITABLE = _unwritable_root()
needs_unwritable = pytest.mark.skipif(UNWRITABLE == Path(), reason="no folder here refuses writes to this user")


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> SimpleNamespace:
    root = tmp_path_factory.mktemp("outputs")
    torch.manual_seed(0)
    cfg = Config(ModelConfig(netG="unet_128", ngf=4), DataConfig(crop_size=128, load_size=128))
    ckpt = save(root / "G.safetensors", cfg=cfg, G=build_generator("unet_128", ngf=4))
    pth = root / "latest_net_G.pth"
    torch.save(init_weights(RefUnetGenerator(3, 3, 7, 4, "batch", use_dropout=True)).state_dict(), pth)
    pairs = root / "pairs"
    pairs.mkdir()
    rng = np.random.default_rng(0)
    for i in range(2):
        Image.fromarray(rng.integers(0, 255, (32, 64, 3), dtype=np.uint8)).save(pairs / f"p{i}.png")
    e = SimpleNamespace(root=root, ckpt=ckpt, pth=pth, pairs=pairs, onnx=None, video=None)
    if HAVE_ONNX:
        from fastp2p.engines.onnx import export_onnx

        e.onnx = export_onnx(ckpt, root / "G.onnx", mode="eval")
    if HAVE_AV:
        import av

        from fastp2p.video import video_codec

        e.video = root / "clip.mp4"
        with av.open(str(e.video), "w") as c:
            s = c.add_stream(video_codec(), rate=10)
            s.width, s.height, s.pix_fmt = 48, 32, "yuv420p"
            for i in range(4):
                frame = np.full((32, 48, 3), 40 * i, np.uint8)
                c.mux(s.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
            c.mux(s.encode(None))
    return e


def _snapshot(*roots: Path) -> dict[str, str]:
    snap = {}
    for root in roots:
        for p in sorted(root.rglob("*")):
            snap[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "folder"
    return snap


def _fails(capsys, argv: list[str], *needles: str) -> str:
    rc = main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert rc != 0, err
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fastp2p: error: "), err
    for n in needles:
        assert str(n) in lines[0], (n, lines[0])
    return lines[0]


def _ok(capsys, argv: list[str]) -> str:
    rc = main([str(a) for a in argv])
    out = capsys.readouterr()
    assert rc == 0, out.err
    return out.out


def _foreign_png(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((8, 8, 3), 7, np.uint8)).save(path)
    return path


def _file(path: Path, data: bytes = b"a user's file\n") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


# ---------------------------------------------------------------------------------------------------------------------
# bad cases: (argv, words the one error line must hold), built from the fixtures and a fresh tmp folder
# ---------------------------------------------------------------------------------------------------------------------
def _tr(e, *args):
    return ["translate", "--checkpoint", e.ckpt, "--mode", "eval", *args]


def _ev(e, *args):
    return ["eval", "--checkpoint", e.ckpt, "--data", e.pairs, "--mode", "eval", *args]


def _trt(e, *args):
    return ["build-engine", e.ckpt, "--backend", "tensorrt", *args]


CASES = {
    # translate (images)
    "translate/-o is the input folder": lambda e, t: (_tr(e, e.pairs, "-o", e.pairs), ["-o", "input folder"]),
    "translate/output is an input file": lambda e, t: (_tr(e, e.pairs / "p0.png", "-o", e.pairs),
                                                       ["-o", "p0.png", "input"]),
    "translate/foreign file at an output": lambda e, t: (_tr(e, e.pairs, "-o", _foreign_png(t / "o" / "p1.png").parent),
                                                         ["p1.png", "--overwrite"]),
    "translate/folder at an output": lambda e, t: (_tr(e, e.pairs, "-o", _dir(t / "o" / "p0.png").parent),
                                                   ["p0.png", "is a folder"]),
    "translate/-o is a file": lambda e, t: (_tr(e, e.pairs, "-o", _file(t / "notes.txt")), ["-o", "notes.txt", "file"]),
    "translate/parent is a file": lambda e, t: (_tr(e, e.pairs, "-o", _file(t / "notes.txt") / "o"),
                                                ["-o", "notes.txt", "is a file"]),
    "translate/unwritable": lambda e, t: (_tr(e, e.pairs, "-o", UNWRITABLE / "fastp2p-out"), ["-o", str(UNWRITABLE)]),
    "translate/one stem from two folders": lambda e, t: (
        _tr(e, _foreign_png(t / "a" / "x.png"), _foreign_png(t / "b" / "x.png"), "-o", t / "o"),
        ["a/x.png", "b/x.png"]),
    # eval
    "eval/-o is the data folder": lambda e, t: (_ev(e, "-o", e.pairs), ["-o", "input folder"]),
    "eval/foreign report file": lambda e, t: (_ev(e, "-o", _file(t / "r" / "metrics.csv").parent),
                                              ["metrics.csv", "--overwrite"]),
    "eval/foreign gallery image": lambda e, t: (_ev(e, "-o", _foreign_png(t / "r" / "images" / "p0_output.png")
                                                    .parent.parent), ["p0_output.png", "--overwrite"]),
    "eval/images is a file": lambda e, t: (_ev(e, "-o", _file(t / "r" / "images").parent), ["-o", "images", "file"]),
    "eval/-o is a file": lambda e, t: (_ev(e, "-o", _file(t / "notes.txt")), ["-o", "notes.txt", "file"]),
    "eval/parent is a file": lambda e, t: (_ev(e, "-o", _file(t / "notes.txt") / "r"), ["-o", "notes.txt"]),
    "eval/unwritable": lambda e, t: (_ev(e, "-o", UNWRITABLE / "fastp2p-eval"), ["-o", str(UNWRITABLE)]),
    # export
    "export/foreign file": lambda e, t: (["export", e.ckpt, "-o", _file(t / "G.onnx")], ["G.onnx", "--overwrite"]),
    "export/-o is a folder": lambda e, t: (["export", e.ckpt, "-o", _dir(t / "G.onnx")], ["G.onnx", "is a folder"]),
    "export/parent is a file": lambda e, t: (["export", e.ckpt, "-o", _file(t / "notes.txt") / "G.onnx"],
                                             ["-o", "notes.txt"]),
    "export/unwritable": lambda e, t: (["export", e.ckpt, "-o", UNWRITABLE / "G.onnx"], ["-o", str(UNWRITABLE)]),
    # convert --to fastp2p
    "convert/foreign safetensors": lambda e, t: (
        ["convert", e.pth, "--netG", "unet_128", "-o", _file(t / "G.safetensors")], ["G.safetensors", "--overwrite"]),
    "convert/a trained checkpoint": lambda e, t: (
        ["convert", e.pth, "--netG", "unet_128", "-o", _copy(e.ckpt, t / "G.safetensors")],
        ["G.safetensors", "--overwrite"]),
    "convert/foreign json beside": lambda e, t: (
        ["convert", e.pth, "--netG", "unet_128", "-o", _file(t / "G.json").with_suffix(".safetensors")],
        ["G.json", "--overwrite"]),
    "convert/-o is a folder": lambda e, t: (["convert", e.pth, "--netG", "unet_128", "-o", _dir(t / "G.safetensors")],
                                            ["G.safetensors", "is a folder"]),
    "convert/parent is a file": lambda e, t: (
        ["convert", e.pth, "--netG", "unet_128", "-o", _file(t / "notes.txt") / "G.safetensors"], ["notes.txt"]),
    "convert/unwritable": lambda e, t: (["convert", e.pth, "--netG", "unet_128", "-o", UNWRITABLE / "G.safetensors"],
                                        ["-o", str(UNWRITABLE)]),
    # convert --to reference
    "convert-ref/-o is the input": lambda e, t: (["convert", e.ckpt, "--to", "reference", "-o", e.ckpt],
                                                 ["-o", "input"]),
    "convert-ref/foreign pth": lambda e, t: (["convert", e.ckpt, "--to", "reference", "-o", _copy(e.pth, t / "G.pth")],
                                             ["G.pth", "--overwrite"]),
    "convert-ref/-o is a folder": lambda e, t: (["convert", e.ckpt, "--to", "reference", "-o", _dir(t / "G.pth")],
                                                ["G.pth", "is a folder"]),
    "convert-ref/parent is a file": lambda e, t: (
        ["convert", e.ckpt, "--to", "reference", "-o", _file(t / "notes.txt") / "G.pth"], ["notes.txt"]),
    "convert-ref/unwritable": lambda e, t: (["convert", e.ckpt, "--to", "reference", "-o", UNWRITABLE / "G.pth"],
                                            ["-o", str(UNWRITABLE)]),
    # build-engine: every check runs before the ONNX export, without TensorRT
    "build-engine/foreign plan": lambda e, t: (_trt(e, "-o", _file(t / "G.plan")), ["G.plan", "--overwrite"]),
    "build-engine/foreign plan sidecar": lambda e, t: (_trt(e, "-o", _file(t / "G.plan.json").with_suffix("")),
                                                       ["G.plan.json", "--overwrite"]),
    "build-engine/foreign --onnx": lambda e, t: (_trt(e, "-o", t / "G.plan", "--onnx", _file(t / "mine.onnx")),
                                                 ["--onnx", "mine.onnx", "--overwrite"]),
    "build-engine/-o is a folder": lambda e, t: (_trt(e, "-o", _dir(t / "G.plan")), ["G.plan", "is a folder"]),
    "build-engine/parent is a file": lambda e, t: (_trt(e, "-o", _file(t / "notes.txt") / "G.plan"), ["notes.txt"]),
    "build-engine/unwritable": lambda e, t: (_trt(e, "-o", UNWRITABLE / "G.plan"), ["-o", str(UNWRITABLE)]),
    "build-engine/foreign ort model": lambda e, t: (
        ["build-engine", e.onnx, "--backend", "onnxruntime", "-o", _file(t / "G.ort.onnx")],
        ["G.ort.onnx", "--overwrite"]),
    # video (translate of one video file)
    "video/-o is the input": lambda e, t: (_tr(e, e.video, "-o", e.video), ["-o", "clip.mp4", "input"]),
    "video/foreign file": lambda e, t: (_tr(e, e.video, "-o", _file(t / "out.mp4")), ["out.mp4", "--overwrite"]),
    "video/foreign file in the -o folder": lambda e, t: (_tr(e, e.video, "-o", _file(t / "o" / "clip.mp4").parent),
                                                         ["clip.mp4", "--overwrite"]),
    "video/-o is a file": lambda e, t: (_tr(e, e.video, "-o", _file(t / "notes.txt")), ["-o", "notes.txt", "file"]),
    "video/parent is a file": lambda e, t: (_tr(e, e.video, "-o", _file(t / "notes.txt") / "out.mp4"),
                                            ["notes.txt"]),
    "video/unwritable": lambda e, t: (_tr(e, e.video, "-o", UNWRITABLE / "out.mp4"), ["-o", str(UNWRITABLE)]),
    # train --out (checked in the CLI before training starts)
    "train/--out is a file": lambda e, t: (_train(t, "--out", _file(t / "notes.txt")), ["--out", "notes.txt", "file"]),
    "train/parent is a file": lambda e, t: (_train(t, "--out", _file(t / "notes.txt") / "runs"),
                                            ["--out", "notes.txt"]),
    "train/run folder is a file": lambda e, t: (_train(t, "--out", _file(t / "runs" / "r").parent, "--name", "r"),
                                                ["--name", "r", "file"]),
    "train/unwritable": lambda e, t: (_train(t, "--out", UNWRITABLE / "runs"), ["--out", str(UNWRITABLE)]),
}


def _dir(path: Path) -> Path:
    path.mkdir(parents=True)
    return path


def _copy(src: Path, dst: Path) -> Path:
    dst.write_bytes(src.read_bytes())
    return dst


def _train(t, *args):
    return ["train", "--preset", "debug", "--netG", "unet_128", "--ngf", "4", "--ndf", "4", "--max_steps", "1",
            "--no_progress", *args]


def _marks(name: str):
    marks = []
    if name.startswith("video/"):
        marks.append(needs_av)
    if name.endswith("unwritable"):
        marks.append(needs_unwritable)
    if name.startswith("export/") or "ort model" in name:
        marks.append(needs_onnx)
    return marks


@pytest.mark.parametrize("name", [pytest.param(n, id=n, marks=_marks(n)) for n in CASES])
def test_bad_output_is_one_line_and_writes_nothing(name, env, tmp_path, capsys):
    argv, needles = CASES[name](env, tmp_path)
    before = _snapshot(env.root, tmp_path)
    _fails(capsys, argv, *needles)
    assert _snapshot(env.root, tmp_path) == before  # inputs, the user's files: same bytes; nothing new


# ---------------------------------------------------------------------------------------------------------------------
# positive cases: a rerun replaces its own outputs; a foreign file needs --overwrite
# ---------------------------------------------------------------------------------------------------------------------
def test_translate_rerun_and_overwrite(env, tmp_path, capsys):
    out = tmp_path / "o"
    args = _tr(env, env.pairs, "-o", out)
    _ok(capsys, args)
    assert outputs.png_marked(out / "p0.png", "translate")
    _ok(capsys, args)  # its own earlier outputs: no --overwrite needed
    foreign = _foreign_png(out / "p1.png")
    _fails(capsys, args, "p1.png", "--overwrite")
    _ok(capsys, [*args, "--overwrite"])
    assert outputs.png_marked(foreign, "translate") and Image.open(foreign).size == (128, 128)
    keep = _file(out / "notes.txt")  # not an output path: left alone either way
    _ok(capsys, [*args, "--overwrite"])
    assert keep.read_bytes() == b"a user's file\n"


def test_translate_beside_its_input(env, tmp_path, capsys):
    src = tmp_path / "photos" / "pic.jpg"
    src.parent.mkdir()
    Image.fromarray(np.full((16, 16, 3), 9, np.uint8)).save(src)
    data = src.read_bytes()
    # an input file given by name, whose output lands beside it under another name: fine
    _ok(capsys, _tr(env, src, "-o", src.parent))
    assert (src.parent / "pic.png").is_file() and src.read_bytes() == data
    # the folder as the input: refused (pic.png and pic.jpg share a stem; and it is the input folder)
    _fails(capsys, _tr(env, src.parent, "-o", src.parent), "pic.png", "pic.jpg")


def test_eval_rerun_and_overwrite(env, tmp_path, capsys):
    out = tmp_path / "r"
    args = _ev(env, "-o", out)
    _ok(capsys, args)
    assert json.loads((out / "metrics.json").read_text())["images"] == 2
    assert outputs.png_marked(out / "images" / "p0_output.png", "eval")
    (out / "metrics.json").unlink()  # an interrupted run: the marked gallery still says the folder is eval's
    _ok(capsys, args)
    _ok(capsys, args)
    other = tmp_path / "r2"
    _file(other / "index.html")
    _fails(capsys, _ev(env, "-o", other), "index.html", "--overwrite")
    _ok(capsys, [*_ev(env, "-o", other), "--overwrite"])
    assert "fastp2p eval" in (other / "index.html").read_text()


def _rerun_then_foreign(capsys, args, foreign: Path, name: str) -> None:
    """The command runs twice over its own outputs; a foreign file at ``foreign`` then needs --overwrite."""
    _ok(capsys, args)
    _ok(capsys, args)
    _file(foreign)
    _fails(capsys, args, name, "--overwrite")
    _ok(capsys, [*args, "--overwrite"])


@needs_onnx
def test_export_and_build_engine_rerun_and_overwrite(env, tmp_path, capsys):
    out = tmp_path / "G.onnx"
    args = ["export", env.ckpt, "-o", out, "--mode", "eval"]
    _rerun_then_foreign(capsys, args, out, "G.onnx")
    ort = tmp_path / "G.ort.onnx"
    args = ["build-engine", out, "--backend", "onnxruntime", "-o", ort]
    _rerun_then_foreign(capsys, args, Path(str(ort) + ".json"), "G.ort.onnx.json")


def test_plan_outputs_without_tensorrt(tmp_path):
    from fastp2p.engines.tensorrt import PLAN_FORMAT, check_plan_output, sidecar_path

    plan = _file(tmp_path / "G.plan", b"engine bytes")
    cache = tmp_path / "timing.cache"
    with pytest.raises(UserError, match="--overwrite"):
        check_plan_output(plan, timing_cache=cache)
    _file(sidecar_path(plan), json.dumps({"format": PLAN_FORMAT}).encode())  # what build_engine writes beside it
    assert check_plan_output(plan, timing_cache=cache) == plan
    _file(sidecar_path(plan), b"{}")  # a foreign sidecar: neither it nor the plan is an earlier build's
    with pytest.raises(UserError, match="G.plan: .*--overwrite"):
        check_plan_output(plan, timing_cache=cache)
    plan.unlink()
    with pytest.raises(UserError, match="G.plan.json: .*--overwrite"):
        check_plan_output(plan, timing_cache=cache)
    plan.write_bytes(b"engine bytes")
    assert check_plan_output(plan, timing_cache=cache, overwrite=True) == plan
    with pytest.raises(UserError, match="--timing_cache"):
        check_plan_output(plan, timing_cache=_dir(tmp_path / "cache"), overwrite=True)
    with pytest.raises(UserError, match="input"):
        check_plan_output(plan, inputs=[plan], overwrite=True, timing_cache=cache)


def test_convert_rerun_and_overwrite(env, tmp_path, capsys):
    st = tmp_path / "G.safetensors"
    args = ["convert", env.pth, "--netG", "unet_128", "-o", st]
    _rerun_then_foreign(capsys, args, st, "G.safetensors")
    back = tmp_path / "back.pth"
    args = ["convert", st, "--to", "reference", "-o", back]
    _ok(capsys, args)
    assert outputs.zip_marked(back, "convert")
    ref = torch.load(env.pth, weights_only=True)
    sd = torch.load(back, weights_only=True)  # the comment changes nothing torch reads
    assert sd.keys() == ref.keys() and all(torch.equal(sd[k], v) for k, v in ref.items())
    _ok(capsys, args)
    _copy(env.pth, back)
    _fails(capsys, args, "back.pth", "--overwrite")
    _ok(capsys, [*args, "--overwrite"])


@needs_av
def test_video_rerun_and_overwrite(env, tmp_path, capsys):
    from fastp2p.video import is_our_video

    out = tmp_path / "out.mkv"
    args = _tr(env, env.video, "-o", out)
    _ok(capsys, args)
    assert is_our_video(out)
    _ok(capsys, args)
    _file(out)
    _fails(capsys, args, "out.mkv", "--overwrite")
    _ok(capsys, [*args, "--overwrite"])
    assert is_our_video(out)


# ---------------------------------------------------------------------------------------------------------------------
# the readers on foreign bytes, and the write-time guard
# ---------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("data", [b"", b"\x00" * 64, b"\xff" * 64, b"hello world, not a model\n" * 100,
                                  b"\x89PNG\r\n\x1a\n" + b"\xff" * 40])
def test_readers_say_not_ours_for_foreign_bytes(tmp_path, data):
    p = _file(tmp_path / "f", data)
    from fastp2p.engines.onnx import is_our_onnx

    assert not is_our_onnx(p)
    assert outputs.read_png_text(p) == {}
    assert not outputs.zip_marked(p, "convert") and outputs.json_object(p) is None


def test_writing_turns_os_errors_into_one_line(tmp_path):
    with pytest.raises(UserError, match=r"^-o .*x\.png: cannot write: No space left") as e:
        with outputs.writing(tmp_path / "x.png", "-o"):
            raise OSError(28, "No space left on device")
    assert "\n" not in str(e.value)
    with pytest.raises(UserError, match="inline_container"):
        with outputs.writing(tmp_path / "x.pth", "-o"):
            raise RuntimeError("[enforce fail at inline_container.cc:123] . unexpected pos 0 vs 64")
    with pytest.raises(RuntimeError, match="a bug"):
        with outputs.writing(tmp_path / "x.pth", "-o"):
            raise RuntimeError("a bug")

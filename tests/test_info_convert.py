"""`fastp2p info` on every file fastp2p writes (checkpoints, .onnx, .ort.onnx, .plan), `convert` keeping direction and
preprocessing across fastp2p -> reference -> fastp2p, and eval refusing folders of images that are not A|B pairs."""

import json
import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fastp2p import checkpoint, outputs
from fastp2p.cli.main import main
from fastp2p.config import Config, DataConfig, ModelConfig
from fastp2p.errors import DataError
from fastp2p.models import build_generator

# A BtoA run with every preprocessing field away from its default, so a field that is dropped shows.
DATA = DataConfig(direction="BtoA", preprocess="scale_width_and_crop", load_size=160, crop_size=128)


def run_main(argv, capsys) -> tuple[int, str, str]:
    try:
        rc = main([str(a) for a in argv])
    except SystemExit as e:  # argparse errors exit from inside parse_args
        rc = e.code
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def one_line(rc, err: str, *needles) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert rc == 2, (rc, err)
    assert len(lines) == 1 and lines[0].startswith("fastp2p: error: "), err
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


def cli(*args) -> subprocess.CompletedProcess:
    """As a user runs it: its own process, so stderr holds every line it prints (warnings included)."""
    return subprocess.run([sys.executable, "-m", "fastp2p", *map(str, args)], capture_output=True, text=True,
                          timeout=300)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    G = build_generator("unet_128", 3, 3, 4, "batch", True)
    for m in G.modules():  # running statistics away from their init, so the round trip must carry them
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
    path = tmp_path_factory.mktemp("ckpt") / "G.safetensors"
    cfg = Config(ModelConfig(netG="unet_128", ngf=4), DATA)
    return checkpoint.save(path, cfg=cfg, G=G, step=7)


def _tensors(path) -> dict:
    return {k: v for k, v in checkpoint.load(path)[1].items() if k.startswith("G.")}


def _data(path) -> dict:
    d = checkpoint.read_meta(path)["config"]["data"]
    return {k: d[k] for k in ("direction", "preprocess", "load_size", "crop_size")}


WANT = {"direction": "BtoA", "preprocess": "scale_width_and_crop", "load_size": 160, "crop_size": 128}


# ---------------------------------------------------------------------------------------------------------------------
# convert
# ---------------------------------------------------------------------------------------------------------------------
def test_round_trip_keeps_direction_preprocessing_and_weights(ckpt, tmp_path, capsys, caplog):
    pth = tmp_path / "ref" / "latest_net_G.pth"
    rc, out, err = run_main(["convert", ckpt, "--to", "reference", "-o", pth], capsys)
    assert rc == 0, err
    side = tmp_path / "ref" / "latest_net_G.fastp2p.json"
    assert side.is_file() and str(side) in out
    sd = torch.load(pth, weights_only=True)  # still the reference's plain state dict
    assert all(isinstance(v, torch.Tensor) for v in sd.values()) and outputs.zip_marked(pth, "convert")
    rec = json.loads(side.read_text())
    assert rec["pth_sha256"] == checkpoint.file_hash(pth) and rec["preprocessing"]["direction"] == "BtoA"
    back = tmp_path / "back.safetensors"
    with caplog.at_level(logging.WARNING):
        rc, out, err = run_main(["convert", pth, "-o", back], capsys)  # no --netG: the sidecar says unet_128
    assert rc == 0, err
    assert "assuming AtoB" not in caplog.text and "BtoA" in out
    assert _data(back) == WANT
    meta = checkpoint.read_meta(back)
    assert meta["preprocessing"]["direction"] == "BtoA" and meta["source_sidecar"] == side.name
    assert meta["config"]["model"]["netG"] == "unet_128" and meta["config"]["model"]["ngf"] == 4
    a, b = _tensors(ckpt), _tensors(back)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # and again: both outputs are convert's own, so a rerun replaces them without --overwrite
    rc, _, err = run_main(["convert", ckpt, "--to", "reference", "-o", pth], capsys)
    assert rc == 0, err


def test_flags_without_sidecar_and_the_default_warning(ckpt, tmp_path, capsys, caplog):
    pth = tmp_path / "latest_net_G.pth"
    assert run_main(["convert", ckpt, "--to", "reference", "-o", pth], capsys)[0] == 0
    checkpoint.reference_sidecar_path(pth).unlink()  # a bare .pth, as the reference's own training writes
    flagged = tmp_path / "flags.safetensors"
    with caplog.at_level(logging.WARNING):
        rc, _, err = run_main(["convert", pth, "-o", flagged, "--netG", "unet_128", "--direction", "BtoA",
                               "--load_size", "160", "--crop_size", "128", "--preprocess", "scale_width_and_crop"],
                              capsys)
    assert rc == 0, err
    assert "assuming AtoB" not in caplog.text
    assert _data(flagged) == WANT
    a, b = _tensors(ckpt), _tensors(flagged)
    assert all(torch.equal(a[k], b[k]) for k in a)
    caplog.clear()
    plain = tmp_path / "plain.safetensors"
    with caplog.at_level(logging.WARNING):
        rc, _, err = run_main(["convert", pth, "-o", plain, "--netG", "unet_128"], capsys)
    assert rc == 0, err
    warned = [r.getMessage() for r in caplog.records if "assuming AtoB" in r.getMessage()]
    assert len(warned) == 1 and "--direction BtoA" in warned[0] and "\n" not in warned[0]
    d = DataConfig()
    assert _data(plain) == {"direction": "AtoB", "preprocess": d.preprocess, "load_size": d.load_size,
                            "crop_size": d.crop_size}


def test_flag_contradicting_the_sidecar_wins_and_is_logged(ckpt, tmp_path, capsys, caplog):
    pth = tmp_path / "latest_net_G.pth"
    assert run_main(["convert", ckpt, "--to", "reference", "-o", pth], capsys)[0] == 0
    out = tmp_path / "G.safetensors"
    with caplog.at_level(logging.WARNING):
        rc, _, err = run_main(["convert", pth, "-o", out, "--direction", "AtoB", "--crop_size", "256",
                               "--load_size", "286"], capsys)
    assert rc == 0, err
    msgs = [r.getMessage() for r in caplog.records]
    assert any("--direction AtoB" in m and "direction=BtoA" in m and "flag wins" in m for m in msgs), msgs
    assert any("--crop_size 256" in m and "crop_size=128" in m for m in msgs), msgs
    assert _data(out) == {**WANT, "direction": "AtoB", "crop_size": 256, "load_size": 286}  # preprocess: sidecar


def test_stale_sidecar_is_ignored_with_a_warning(ckpt, tmp_path, capsys, caplog):
    pth = tmp_path / "latest_net_G.pth"
    assert run_main(["convert", ckpt, "--to", "reference", "-o", pth], capsys)[0] == 0
    sd = torch.load(pth, weights_only=True)
    torch.save(sd, pth)  # the reference's training wrote a new .pth since (same weights, other bytes)
    out = tmp_path / "G.safetensors"
    with caplog.at_level(logging.WARNING):
        rc, _, err = run_main(["convert", pth, "-o", out, "--netG", "unet_128"], capsys)
    assert rc == 0, err
    assert "sha256 differs" in caplog.text and "assuming AtoB" in caplog.text
    assert _data(out)["direction"] == "AtoB"


def test_sidecar_follows_the_never_overwrite_rules(ckpt, tmp_path, capsys):
    pth = tmp_path / "latest_net_G.pth"
    side = checkpoint.reference_sidecar_path(pth)
    side.write_text('{"mine": true}\n')  # the user's own file of that name
    rc, _, err = run_main(["convert", ckpt, "--to", "reference", "-o", pth], capsys)
    one_line(rc, err, "latest_net_G.fastp2p.json", "--overwrite")
    assert not pth.exists() and json.loads(side.read_text()) == {"mine": True}  # nothing written
    rc, _, err = run_main(["convert", ckpt, "--to", "reference", "-o", pth, "--overwrite"], capsys)
    assert rc == 0, err
    assert json.loads(side.read_text())["format"] == checkpoint.REFERENCE_SIDECAR_FORMAT
    rc, _, err = run_main(["convert", ckpt, "--to", "reference", "-o", side], capsys)
    one_line(rc, err, "-o", "fastp2p.json")


@pytest.mark.parametrize("argv, needles", [
    (["--to", "reference", "--direction", "BtoA"], ["--direction", "--to fastp2p"]),
    (["--crop_size", "100"], ["--crop_size 100", "128"]),
    (["--crop_size", "256", "--load_size", "128"], ["--crop_size 256", "--load_size 128"]),
], ids=["preprocessing flag with --to reference", "crop_size the U-Net cannot take", "crop larger than load"])
def test_bad_convert_flags_are_one_line(ckpt, tmp_path, capsys, argv, needles):
    pth = tmp_path / "latest_net_G.pth"
    assert run_main(["convert", ckpt, "--to", "reference", "-o", pth], capsys)[0] == 0
    src = ckpt if "reference" in argv else pth
    out = tmp_path / ("x.pth" if "reference" in argv else "x.safetensors")
    rc, _, err = run_main(["convert", src, "-o", out, *argv], capsys)
    one_line(rc, err, *needles)
    assert not out.exists()


def test_damaged_sidecar_is_one_line(ckpt, tmp_path, capsys):
    pth = tmp_path / "latest_net_G.pth"
    assert run_main(["convert", ckpt, "--to", "reference", "-o", pth], capsys)[0] == 0
    checkpoint.reference_sidecar_path(pth).write_text("{cut")
    rc, _, err = run_main(["convert", pth, "-o", tmp_path / "G.safetensors"], capsys)
    one_line(rc, err, "latest_net_G.fastp2p.json", "remove")


def test_convert_and_info_help_give_every_flag_a_line():
    p = cli("convert", "--help")
    assert p.returncode == 0
    text = " ".join(p.stdout.split())
    for flag in ("CHECKPOINT the file to convert", "-o OUT, --out OUT output file", "--to {fastp2p,reference} the",
                 "--direction {AtoB,BtoA}", "--load_size LOAD_SIZE", "--crop_size CROP_SIZE", "--preprocess"):
        assert flag in text, flag
    for default in ("(default fastp2p)", "else AtoB)", "else 286)", "else 256)", "else resize_and_crop)"):
        assert default in text, default
    p = cli("info", "--help")
    assert p.returncode == 0 and "FILE the file to describe" in " ".join(p.stdout.split())


# ---------------------------------------------------------------------------------------------------------------------
# info
# ---------------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def onnx_file(ckpt, tmp_path_factory) -> Path:
    pytest.importorskip("onnx")
    from fastp2p.engines.onnx import export_onnx

    return export_onnx(ckpt, tmp_path_factory.mktemp("onnx") / "G.onnx", mode="eval", exporter="torchscript")


def test_info_on_an_onnx_export(onnx_file, capsys):
    rc, out, err = run_main(["info", onnx_file], capsys)
    assert rc == 0, err
    info = json.loads(out)
    assert info["format"] == "fastp2p-onnx-1" and info["mode"] == "eval" and info["precision"] == "fp32"
    assert info["preprocessing"]["direction"] == "BtoA" and info["preprocessing"]["crop_size"] == 128
    assert info["arch"]["netG"] == "unet_128" and info["dynamic_hw"] is False and info["opset"] == 18
    (inp,) = info["inputs"]  # the graph's own input (the weights are initializers, not inputs)
    assert inp["name"] == "input" and inp["dtype"] == "float" and inp["shape"][1:] == [3, 128, 128]
    assert isinstance(inp["shape"][0], str)  # the dynamic batch: a named dimension
    assert info["outputs"][0]["name"] == "output" and info["outputs"][0]["shape"][1:] == [3, 128, 128]
    assert info["file_size"] == onnx_file.stat().st_size and "metadata_problem" not in info


def test_info_on_an_onnxruntime_build(onnx_file, tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    out_path = tmp_path / "G.ort.onnx"
    rc, _, err = run_main(["build-engine", onnx_file, "-o", out_path, "--backend", "onnxruntime"], capsys)
    assert rc == 0, err
    rc, out, err = run_main(["info", out_path], capsys)
    assert rc == 0, err
    info = json.loads(out)
    assert info["mode"] == "eval" and info["preprocessing"]["direction"] == "BtoA"
    assert info["onnxruntime_sidecar"]["format"] == "fastp2p-ort-1"
    assert info["onnxruntime_sidecar"]["file"] == str(out_path) + ".json"


def test_info_on_foreign_and_damaged_onnx(onnx_file, tmp_path, capsys):
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT16, [1, "C", 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT16, [1, "C", 8])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="someone")
    foreign = tmp_path / "other.onnx"
    onnx.save(model, str(foreign))
    rc, out, err = run_main(["info", foreign], capsys)
    assert rc == 0, err
    info = json.loads(out)
    assert "no fastp2p metadata" in info["note"] and "mode" not in info
    assert info["inputs"] == [{"name": "x", "shape": [1, "C", 8], "dtype": "float16"}]
    assert info["opset"] == 17 and info["opset_import"] == {"ai.onnx": 17} and info["producer"].startswith("someone")
    cut = tmp_path / "cut.onnx"
    cut.write_bytes(onnx_file.read_bytes()[: onnx_file.stat().st_size // 2])
    for bad in (cut, tmp_path / "empty.onnx", tmp_path / "text.onnx"):
        if bad.name == "empty.onnx":
            bad.write_bytes(b"")
        elif bad.name == "text.onnx":
            bad.write_text("not an onnx file at all")
        rc, _, err = run_main(["info", bad], capsys)
        one_line(rc, err, bad.name, "not a readable ONNX file")


def test_info_on_a_plan_reads_its_sidecar(tmp_path, capsys):
    from fastp2p.engines.tensorrt import PLAN_FORMAT, sidecar_path

    plan = tmp_path / "G.plan"
    plan.write_bytes(b"\x00serialized engine bytes")
    rc, _, err = run_main(["info", plan], capsys)
    one_line(rc, err, str(sidecar_path(plan)), "build-engine")
    side = {"format": PLAN_FORMAT, "tensorrt_version": "10.9", "precision": "fp16", "mode": "paper",
            "preprocessing": {"direction": "BtoA", "crop_size": 128}, "profile": {"input": {"opt": [8, 3, 128, 128]}}}
    sidecar_path(plan).write_text(json.dumps(side))
    rc, out, err = run_main(["info", plan], capsys)
    assert rc == 0, err
    info = json.loads(out)
    assert {k: info[k] for k in side} == side
    assert "not parsed" in info["note"] and info["file_size"] == plan.stat().st_size
    sidecar_path(plan).write_text("{cut")
    rc, _, err = run_main(["info", plan], capsys)
    one_line(rc, err, "G.plan.json", "unreadable")
    sidecar_path(plan).write_text('{"format": "else"}')
    rc, _, err = run_main(["info", plan], capsys)
    one_line(rc, err, "G.plan.json", "not a fastp2p TensorRT sidecar")
    rc, _, err = run_main(["info", tmp_path / "none.plan"], capsys)
    one_line(rc, err, "none.plan", "not found")


def test_info_on_a_converted_pth_shows_its_sidecar(ckpt, tmp_path, capsys):
    pth = tmp_path / "latest_net_G.pth"
    assert run_main(["convert", ckpt, "--to", "reference", "-o", pth], capsys)[0] == 0
    rc, out, err = run_main(["info", pth], capsys)
    assert rc == 0, err
    info = json.loads(out)
    assert info["generator"] == "unet_128" and info["fastp2p_sidecar"]["preprocessing"]["direction"] == "BtoA"


def test_info_errors_in_a_real_process_are_one_line_exit_2(tmp_path):
    bad = tmp_path / "G.onnx"
    bad.write_bytes(b"\x08\x07")  # protobuf takes it for a model with no graph
    p = cli("info", bad)
    assert p.returncode == 2 and p.stderr.count("\n") == 1 and "G.onnx" in p.stderr and "Traceback" not in p.stderr


# ---------------------------------------------------------------------------------------------------------------------
# eval on folders of images that are not pairs
# ---------------------------------------------------------------------------------------------------------------------
def _images(folder: Path, sizes: dict[str, tuple[int, int]]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for name, (w, h) in sizes.items():
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(folder / name)
    return folder


def test_eval_refuses_a_folder_of_plain_images(ckpt, tmp_path):
    photos = _images(tmp_path / "photos", {"a.png": (64, 64), "b.png": (64, 64)})
    p = cli("eval", "--checkpoint", ckpt, "--data", photos, "-o", tmp_path / "ev")
    assert p.returncode == 2 and p.stderr.count("\n") == 1 and "Traceback" not in p.stderr, p.stderr
    for needle in ("a.png", "64x64", "width = 2 x height", "A/ and B/"):
        assert needle in p.stderr, (needle, p.stderr)
    assert not (tmp_path / "ev").exists()


def test_mixed_folder_skips_the_non_pairs_with_one_warning(tmp_path, caplog):
    from fastp2p.scoring import folder_pairs

    mixed = _images(tmp_path / "mixed", {"p0.png": (64, 32), "photo.png": (48, 48), "p1.png": (64, 32),
                                         "wide.png": (96, 32)})
    with caplog.at_level(logging.WARNING, logger="fastp2p.eval"):
        _, pairs = folder_pairs(mixed)
    assert [p.name for p in pairs] == ["p0", "p1"]
    warned = [r.getMessage() for r in caplog.records]
    assert len(warned) == 1 and "skipping 2" in warned[0] and "photo.png" in warned[0] and "48x48" in warned[0]
    src, tgt = pairs[0].load("AtoB", 32, 3, 3)  # the kept pairs still split in half
    ab = np.asarray(Image.open(mixed / "p0.png").convert("RGB"))
    assert np.array_equal(src, ab[:, :32]) and np.array_equal(tgt, ab[:, 32:])
    _, pairs = folder_pairs(mixed, max_images=1)
    assert [p.name for p in pairs] == ["p0"]


def test_train_eval_split_of_non_pairs_refuses_too(tmp_path):
    """``--eval_every`` reads its split through the same ``folder_pairs``: the same refusal."""
    from fastp2p.config import TrainConfig
    from fastp2p.scoring import TrainEval

    photos = _images(tmp_path / "val", {"x.png": (40, 40)})
    cfg = Config(train=TrainConfig(eval_every=1, eval_data=str(photos)))
    with pytest.raises(DataError, match=r"x\.png: 40x40 is not an aligned A\|B pair"):
        TrainEval.from_config(cfg)

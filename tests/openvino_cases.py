"""OpenVINO backend: parity with ONNX Runtime and torch, meta, the compiled-model cache, the CLI's --backend.

Run by tests/test_openvino.py in a process of its own (see there); `python -m pytest tests/openvino_cases.py` runs it
directly."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import trained_like
from PIL import Image
from torch import nn

from fastp2p.checkpoint import save
from fastp2p.config import Config, DataConfig, ModelConfig
from fastp2p.errors import UserError
from fastp2p.inference import with_mode
from fastp2p.models import build_generator

pytest.importorskip("onnx", reason="exporting needs onnx (pip install 'fastp2p[onnx]')")
pytest.importorskip("onnxruntime", reason="the comparison needs onnxruntime (pip install 'fastp2p[onnx]')")
pytest.importorskip("openvino", reason="openvino is not installed (pip install 'fastp2p[openvino]')")

from fastp2p.engines import openvino as engine_ov  # noqa: E402
from fastp2p.engines.onnx import export_onnx, read_onnx_meta  # noqa: E402
from fastp2p.engines.onnxruntime import cpu_threads  # noqa: E402
from fastp2p.engines.runtime import OpenVINOGenerator, open_runtime  # noqa: E402

# The bound of tests/test_engines.py (FP32_TOL, derived there): two float32 summation orders of the same U-Net differ
# by ~8e-6 of the output scale, 4 sigma 3e-5; OpenVINO's CPU plugin (oneDNN, f32 hint) is one more such order.
FP32_TOL = 1e-4


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    """Every compile caches into the test's own folder, never the user's ~/.cache; ``--backend auto`` follows its rule,
    not the shared suite's FASTP2P_BACKEND=onnxruntime (tests/test_openvino.py)."""
    monkeypatch.setenv("FASTP2P_OPENVINO_CACHE", str(tmp_path / "ov-cache"))
    monkeypatch.delenv("FASTP2P_BACKEND", raising=False)


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("openvino")


@pytest.fixture(scope="module")
def G() -> nn.Module:
    torch.manual_seed(3)
    g = build_generator("unet_128", 3, 3, 4, "batch", True)
    # non-trivial running statistics, so the folded eval-mode convs are really tested
    return trained_like(g, 0, affine=False)


@pytest.fixture(scope="module")
def onnx_path(work, G) -> Path:
    cfg = Config(ModelConfig(netG="unet_128", ngf=4), DataConfig(crop_size=128, load_size=143))
    ckpt = save(work / "G.safetensors", cfg=cfg, G=G)
    return export_onnx(ckpt, work / "G.onnx", mode="eval")


def _x(n: int, seed: int) -> torch.Tensor:
    return torch.rand(n, 3, 128, 128, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_parity_with_onnxruntime_and_torch_batch_1_and_3(onnx_path, G):
    ov_rt, ort_rt = open_runtime(onnx_path, backend="openvino"), open_runtime(onnx_path)
    ref = with_mode(G, "eval", dropout=False)
    for n in (1, 3):
        x = _x(n, seed=n)
        with torch.inference_mode():
            y_ref = ref(x)
        y_ov, y_ort = ov_rt(x), ort_rt(x)
        assert y_ov.dtype == torch.float32 and y_ov.shape == (n, 3, 128, 128)
        assert (y_ov - y_ort).abs().max().item() <= FP32_TOL, n
        assert (y_ov - y_ref).abs().max().item() <= FP32_TOL, n
        assert n == 1 or not torch.equal(y_ov[0], y_ov[1])  # a batch, not one image repeated


def test_meta_equals_onnxruntime_except_backend(onnx_path):
    ov_meta = open_runtime(onnx_path, backend="openvino").meta
    ort_meta = open_runtime(onnx_path, backend="onnxruntime").meta
    assert ov_meta["backend"] == "openvino" and ort_meta["backend"] == "onnxruntime"
    ov = ov_meta.pop("openvino")
    assert ov == {"precision": "fp32", "hint": "latency", "streams": 1, "threads": cpu_threads(), "requests": 1,
                  "from_cache": ov["from_cache"]}
    assert {**ov_meta, "backend": None} == {**ort_meta, "backend": None}


def test_cache_dir_gets_files_on_first_compile(onnx_path, tmp_path, monkeypatch):
    monkeypatch.delenv("FASTP2P_OPENVINO_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert engine_ov.default_cache_dir() == tmp_path / "xdg" / "fastp2p" / "openvino"
    rt = open_runtime(onnx_path, backend="openvino")
    files = [p for p in rt.impl.cache_dir.rglob("*") if p.is_file()]
    assert rt.impl.cache_dir == tmp_path / "xdg" / "fastp2p" / "openvino" and files
    again = open_runtime(onnx_path, backend="openvino")  # read back from the cache: still the same outputs
    x = _x(1, seed=7)
    assert torch.equal(rt(x), again(x))


def test_throughput_hint_splits_a_batch_and_agrees(onnx_path):
    lat = OpenVINOGenerator(onnx_path)
    thr = OpenVINOGenerator(onnx_path, hint="throughput")
    x = _x(3, seed=11)
    assert (lat(x) - thr(x)).abs().max().item() <= FP32_TOL


def test_bf16_hint_or_one_line_error(onnx_path):
    import openvino as ov

    if not engine_ov.cpu_has_bf16(ov.Core()):
        with pytest.raises(UserError, match="bf16"):
            OpenVINOGenerator(onnx_path, precision="bf16")
        return
    rt, ref = OpenVINOGenerator(onnx_path, precision="bf16"), OpenVINOGenerator(onnx_path)
    assert rt.meta["precision"] == "bf16" and ref.meta["precision"] == "fp32"
    x = _x(2, seed=5)
    # bf16 keeps 8 significant bits: each of the ~16 layers rounds to 2^-9 relative, as a random walk
    # sqrt(16) 2^-9 = 8e-3 of the output scale (|y| < 1); 4 sigma 3e-2, and a bf16 run is not the fp32 run.
    err = (rt(x) - ref(x)).abs().max().item()
    assert 0 < err <= 4 * 4 * 2 ** -9


def test_errors_are_one_line_and_as_onnxruntime(work, onnx_path):
    bad = work / "bad.onnx"
    bad.write_bytes(b"not a model")
    msgs = []
    for backend in ("onnxruntime", "openvino"):
        with pytest.raises(UserError) as e:
            open_runtime(bad, backend=backend)
        msgs.append(str(e.value))
    assert msgs[0] == msgs[1] and "\n" not in msgs[0]
    plan = work / "G.plan"
    plan.write_bytes(b"x")
    with pytest.raises(UserError, match="--backend openvino: only for an .onnx"):
        open_runtime(plan, backend="openvino")
    with pytest.raises(UserError, match="--device cpu"):
        open_runtime(onnx_path, backend="openvino", device="cuda")


def _fastp2p(*args, env_cache: Path):
    import os

    env = {**os.environ, "FASTP2P_OPENVINO_CACHE": str(env_cache)}
    return subprocess.run([sys.executable, "-m", "fastp2p", *map(str, args)], capture_output=True, text=True,
                          timeout=300, env=env)


@pytest.mark.slow
def test_cli_translate_backend_openvino_matches_onnxruntime(work, onnx_path, tmp_path):
    rng = np.random.default_rng(0)
    ins = []
    for i in range(2):
        p = tmp_path / f"in{i}.png"
        Image.fromarray(rng.integers(0, 256, (128, 128, 3), dtype=np.uint8)).save(p)
        ins.append(p)
    outs = {}
    for backend in ("onnxruntime", "openvino"):
        r = _fastp2p("translate", *ins, "--engine", onnx_path, "--backend", backend, "-o", tmp_path / backend,
                     "--no_progress", env_cache=tmp_path / "ov-cache")
        assert r.returncode == 0, r.stderr
        outs[backend] = {p.name: np.asarray(Image.open(p), dtype=np.int16) for p in (tmp_path / backend).glob("*.png")}
    assert sorted(outs["openvino"]) == sorted(outs["onnxruntime"]) == ["in0.png", "in1.png"]
    for name, a in outs["openvino"].items():
        # outputs within FP32_TOL of each other round to uint8 levels at most 1 apart
        assert np.abs(a - outs["onnxruntime"][name]).max() <= 1, name
    r = _fastp2p("translate", ins[0], "--checkpoint", work / "G.safetensors", "--backend", "openvino", "-o",
                 tmp_path / "ck", env_cache=tmp_path / "ov-cache")
    assert r.returncode == 2 and "--backend" in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


# ---------------------------------------------------------------------------------------------------------------------
# build-engine --backend openvino: the IR, its cache, the commands that take it, the automatic choice
# ---------------------------------------------------------------------------------------------------------------------
def _main(*args) -> int:
    from fastp2p.cli.main import main

    return main([str(a) for a in args])


def _one_error(capsys, *needles) -> str:
    err = capsys.readouterr().err
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("fastp2p: error: ") and "Traceback" not in err, err
    for n in needles:
        assert n in err, (n, err)
    return err


@pytest.fixture(scope="module")
def ir_from_ckpt(work, onnx_path) -> Path:
    """build-engine from the checkpoint (exported first), into a cache folder of the module's own."""
    out = work / "ck" / "G.xml"
    with pytest.MonkeyPatch.context() as mp:  # module scope: the autouse cache fixture is per test
        mp.setenv("FASTP2P_OPENVINO_CACHE", str(work / "build-cache"))
        assert _main("build-engine", work / "G.safetensors", "-o", out, "--backend", "openvino", "--mode",
                     "eval") == 0
    return out


def test_build_engine_from_a_checkpoint_writes_an_ir_that_matches_onnxruntime(ir_from_ckpt, work, monkeypatch):
    monkeypatch.setenv("FASTP2P_OPENVINO_CACHE", str(work / "build-cache"))
    xml = ir_from_ckpt
    src = xml.with_suffix(".onnx")  # the intermediate export, beside -o by default
    assert xml.is_file() and engine_ov.bin_path(xml).is_file() and src.is_file()
    # fp32 weights (no fp16 compression, OpenVINO's save_model default, which would cost ~1e-3 on the outputs):
    # unet_128 ngf 4 has 164k parameters, 4 bytes each
    n_params = sum(p.numel() for p in build_generator("unet_128", 3, 3, 4, "batch", True).parameters())
    assert engine_ov.bin_path(xml).stat().st_size >= 4 * n_params * 0.95
    meta = engine_ov.read_ir_meta(xml)
    onnx_meta = read_onnx_meta(src)
    assert meta["mode"] == "eval" and meta["onnx"] == "G.onnx" and meta["openvino_precision"] == "fp32"
    assert {k: meta[k] for k in ("arch", "preprocessing", "checkpoint_sha256", "input", "output")} == \
        {k: onnx_meta[k] for k in ("arch", "preprocessing", "checkpoint_sha256", "input", "output")}
    ov_rt, ort_rt = open_runtime(xml), open_runtime(src, backend="onnxruntime")
    assert ov_rt.backend == "openvino" and ov_rt.meta["source"] == str(xml)
    for n in (1, 3):
        x = _x(n, seed=20 + n)
        # the same fp32 graph, another summation order: within FP32_TOL (derived above) of ONNX Runtime
        assert (ov_rt(x) - ort_rt(x)).abs().max().item() <= FP32_TOL, n


def test_build_engine_warms_the_cache_and_a_second_open_loads_from_it(ir_from_ckpt, work, monkeypatch):
    cache = work / "build-cache"
    monkeypatch.setenv("FASTP2P_OPENVINO_CACHE", str(cache))
    blobs = {p: p.stat().st_mtime_ns for p in cache.iterdir() if p.is_file()}
    assert blobs, "build-engine left no compiled model in the cache"
    rt = open_runtime(ir_from_ckpt)
    assert rt.meta["openvino"]["from_cache"] is True  # OpenVINO's LOADED_FROM_CACHE
    assert {p: p.stat().st_mtime_ns for p in cache.iterdir() if p.is_file()} == blobs  # read, not rewritten
    monkeypatch.setenv("FASTP2P_OPENVINO_CACHE", str(work / "cold-cache"))
    assert open_runtime(ir_from_ckpt).meta["openvino"]["from_cache"] is False


def test_build_engine_from_an_onnx_records_the_hint_and_refuses_to_overwrite(onnx_path, work, capsys):
    out = work / "from_onnx" / "G.xml"
    assert _main("build-engine", onnx_path, "-o", out, "--backend", "openvino", "--ov_hint", "throughput") == 0
    assert "wrote" in capsys.readouterr().out
    rt = open_runtime(out)
    assert engine_ov.read_ir_meta(out)["openvino_hint"] == "throughput" and rt.impl.hint == "throughput"
    x = _x(4, seed=3)
    assert (rt(x) - open_runtime(onnx_path, backend="onnxruntime")(x)).abs().max().item() <= FP32_TOL
    assert _main("build-engine", onnx_path, "-o", out, "--backend", "openvino") == 0  # an earlier build: replaced
    assert engine_ov.read_ir_meta(out)["openvino_hint"] == "latency"
    user = work / "from_onnx" / "user.xml"
    user.write_text("<notes>mine</notes>")
    assert _main("build-engine", onnx_path, "-o", user, "--backend", "openvino") == 2
    _one_error(capsys, "user.xml", "--overwrite")
    assert user.read_text() == "<notes>mine</notes>" and not engine_ov.bin_path(user).exists()
    lone = work / "from_onnx" / "lone.bin"
    lone.write_bytes(b"someone's weights")
    assert _main("build-engine", onnx_path, "-o", lone.with_suffix(".xml"), "--backend", "openvino") == 2
    _one_error(capsys, "lone.bin")
    assert _main("build-engine", onnx_path, "-o", user, "--backend", "openvino", "--overwrite") == 0
    assert engine_ov.is_our_ir(user)


def test_build_engine_openvino_refusals_are_one_line(onnx_path, work, capsys, monkeypatch):
    out = work / "refused" / "G.xml"
    for args, needles in (((onnx_path, "-o", work / "G.plan"), ["*.xml"]),
                          ((onnx_path, "-o", out, "--precision", "fp16"), ["--precision fp16", "fp32 or bf16"]),
                          ((onnx_path, "-o", out, "--tf32"), ["--tf32", "TensorRT"]),
                          ((onnx_path, "-o", work / "x.plan", "--backend", "tensorrt", "--ov_hint", "latency"),
                           ["--ov_hint"])):
        backend = [] if "--backend" in args else ["--backend", "openvino"]
        assert _main("build-engine", *args, *backend) == 2
        _one_error(capsys, *needles)
    monkeypatch.setattr(engine_ov, "cpu_has_bf16", lambda core=None: False)
    assert _main("build-engine", work / "G.safetensors", "-o", out, "--backend", "openvino", "--precision",
                 "bf16") == 2
    _one_error(capsys, "bf16", "no bfloat16")
    assert not out.parent.exists() or not any(out.parent.iterdir())  # refused before the export


def test_build_engine_bf16_where_the_cpu_has_it(onnx_path, work):
    import openvino as ov

    if not engine_ov.cpu_has_bf16(ov.Core()):
        pytest.skip("this CPU has no bfloat16 (the refusal is tested above)")
    out = work / "bf16" / "G.xml"
    assert _main("build-engine", onnx_path, "-o", out, "--backend", "openvino", "--precision", "bf16") == 0
    rt = open_runtime(out)  # the IR's recorded precision is the default of its runs
    assert rt.meta["precision"] == "bf16" and rt.impl.precision == "bf16"
    x = _x(2, seed=9)
    # as test_bf16_hint_or_one_line_error: 8 significant bits per layer, 4 sigma 3e-2
    assert 0 < (rt(x) - open_runtime(out, ov_precision="fp32")(x)).abs().max().item() <= 4 * 4 * 2 ** -9


def test_translate_eval_pipe_info_take_the_ir(ir_from_ckpt, work, tmp_path, capsys, monkeypatch):
    import json

    rng = np.random.default_rng(1)
    pairs = tmp_path / "pairs"
    pairs.mkdir()
    for i in range(2):  # aligned A|B pairs, 128 px
        Image.fromarray(rng.integers(0, 256, (128, 256, 3), dtype=np.uint8)).save(pairs / f"p{i}.png")
    src = ir_from_ckpt.with_suffix(".onnx")
    outs = {}
    for name, engine, extra in (("ir", ir_from_ckpt, ["--ov_hint", "throughput", "--threads", "1"]),
                                ("ort", src, ["--backend", "onnxruntime"])):
        assert _main("translate", pairs, "--engine", engine, "-o", tmp_path / name, "--no_progress", *extra) == 0
        outs[name] = {p.name: np.asarray(Image.open(p), dtype=np.int16) for p in (tmp_path / name).glob("*.png")}
    assert sorted(outs["ir"]) == ["p0.png", "p1.png"]
    for k, a in outs["ir"].items():
        assert np.abs(a - outs["ort"][k]).max() <= 1, k  # within FP32_TOL: uint8 levels at most 1 apart
    scores = {}
    for name, engine, extra in (("ir", ir_from_ckpt, ["--streams", "2"]), ("ort", src, ["--backend", "onnxruntime"])):
        assert _main("eval", "--engine", engine, "--data", pairs, "-o", tmp_path / f"eval_{name}", "--no_progress",
                     *extra) == 0
        scores[name] = json.loads((tmp_path / f"eval_{name}" / "metrics.json").read_text())
    assert scores["ir"]["backend"] == "openvino" and scores["ort"]["backend"] == "onnxruntime"
    # 8-bit outputs at most 1 level apart: L1 (on [0, 1]) within 1/255
    assert abs(scores["ir"]["L1"] - scores["ort"]["L1"]) <= 1 / 255
    capsys.readouterr()
    assert _main("info", ir_from_ckpt) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["format"] == engine_ov.IR_FORMAT and info["mode"] == "eval" and info["weights_size"] > 0
    from fastp2p.translator import Translator

    tr = Translator(ir_from_ckpt, ov_hint="throughput", streams=2)
    frames = rng.integers(0, 256, (3, 128, 128, 3), dtype=np.uint8)
    assert tr.runtime.meta["openvino"]["streams"] == 2 and tr(frames).shape == (3, 128, 128, 3)


def test_auto_picks_openvino_and_says_so(onnx_path, work, tmp_path, caplog, monkeypatch):
    import logging

    from fastp2p.engines.runtime import BACKEND_ENV

    monkeypatch.delenv(BACKEND_ENV, raising=False)  # tests/conftest.py may pin the shared suite to onnxruntime
    img = tmp_path / "in.png"
    Image.fromarray(np.random.default_rng(2).integers(0, 256, (128, 128, 3), dtype=np.uint8)).save(img)
    with caplog.at_level(logging.INFO, logger="fastp2p.engines"):
        assert _main("translate", img, "--engine", onnx_path, "-o", tmp_path / "o", "--no_progress") == 0
    said = [r.getMessage() for r in caplog.records if "(auto:" in r.getMessage()]
    assert len(said) == 1 and said[0].startswith("backend openvino (auto: fp32 file") and \
        said[0].endswith("-- pass --backend onnxruntime to override"), said
    caplog.clear()
    monkeypatch.setenv(BACKEND_ENV, "onnxruntime")
    with caplog.at_level(logging.INFO, logger="fastp2p.engines"):
        rt = open_runtime(onnx_path, backend="auto")
    assert rt.backend == "onnxruntime" and "$FASTP2P_BACKEND=onnxruntime" in caplog.text


def test_build_engine_from_an_int8_qdq_onnx_runs_int8_kernels(onnx_path, work, tmp_path):
    pytest.importorskip("onnxruntime.quantization", reason="INT8 export needs onnxruntime.quantization")
    from fastp2p.engines.quantize import calibration_batches, quantize_onnx

    calib = tmp_path / "calib"
    calib.mkdir()
    rng = np.random.default_rng(4)
    for i in range(4):
        Image.fromarray(rng.integers(0, 256, (128, 128, 3), dtype=np.uint8)).save(calib / f"c{i}.png")
    q = quantize_onnx(onnx_path, work / "G.int8.onnx", calibration_batches(calib, read_onnx_meta(onnx_path), 4))
    out = work / "int8" / "G.xml"
    assert _main("build-engine", q, "-o", out, "--backend", "openvino") == 0
    meta = engine_ov.read_ir_meta(out)
    assert meta["precision"] == "int8" and meta["openvino_precision"] == "fp32" and "quantization" in meta
    ir, direct = open_runtime(out), open_runtime(q, backend="openvino")
    assert ir.meta["precision"] == "int8"
    x = _x(2, seed=6)
    assert (ir(x) - direct(x)).abs().max().item() <= FP32_TOL  # the same OpenVINO model, read from the IR
    # the quantized convolutions run on int8 inputs (u8/i8), not dequantized to fp32
    precisions = {op.get_rt_info()["runtimePrecision"].astype(str) for op in ir.impl.compiled.get_runtime_model()
                  .get_ops() if op.get_rt_info()["layerType"].astype(str) == "Convolution"}
    assert precisions and precisions <= {"u8", "i8"}, precisions

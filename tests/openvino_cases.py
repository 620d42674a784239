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
from fastp2p.engines.onnx import export_onnx  # noqa: E402
from fastp2p.engines.runtime import OpenVINOGenerator, open_runtime  # noqa: E402

# The bound of tests/test_engines.py (FP32_TOL, derived there): two float32 summation orders of the same U-Net differ
# by ~8e-6 of the output scale, 4 sigma 3e-5; OpenVINO's CPU plugin (oneDNN, f32 hint) is one more such order.
FP32_TOL = 1e-4


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    """Every compile caches into the test's own folder, never the user's ~/.cache."""
    monkeypatch.setenv("FASTP2P_OPENVINO_CACHE", str(tmp_path / "ov-cache"))


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("openvino")


@pytest.fixture(scope="module")
def G() -> nn.Module:
    torch.manual_seed(3)
    g = build_generator("unet_128", 3, 3, 4, "batch", True)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # non-trivial running statistics, so the folded eval-mode convs are really tested
        for m in g.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=gen) * 0.3)
                m.running_var.copy_(torch.rand(m.num_features, generator=gen) * 1.5 + 0.25)
    return g


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

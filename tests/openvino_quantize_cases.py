"""INT8 QDQ exports on OpenVINO: outputs close to the fp32 export's and to ONNX Runtime's int8, every convolution
really computed in int8, paper mode too.

Run by tests/test_quantize.py in a process of its own (why: tests/test_openvino.py); `python -m pytest
tests/openvino_quantize_cases.py` runs it directly."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from fastp2p.checkpoint import save
from fastp2p.config import Config, DataConfig, ModelConfig
from fastp2p.models import build_generator

pytest.importorskip("onnx", reason="exporting needs onnx (pip install 'fastp2p[onnx]')")
pytest.importorskip("onnxruntime.quantization", reason="INT8 export needs onnxruntime (pip install 'fastp2p[onnx]')")
pytest.importorskip("openvino", reason="openvino is not installed (pip install 'fastp2p[openvino]')")

from fastp2p.engines import quantize as Q  # noqa: E402
from fastp2p.engines.onnx import export_onnx, read_onnx_meta  # noqa: E402
from fastp2p.engines.runtime import open_runtime  # noqa: E402
from test_quantize import MIN_PSNR, SIZE, _psnr, _smooth_image, _weights_like_trained  # noqa: E402


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    """Every compile caches into the test's own folder, never the user's ~/.cache."""
    monkeypatch.setenv("FASTP2P_OPENVINO_CACHE", str(tmp_path / "ov-cache"))


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("ov-int8")
    rng = np.random.default_rng(0)
    (d / "calib").mkdir()
    for i in range(4):
        _smooth_image(rng, SIZE, 2 * SIZE).save(d / "calib" / f"{i}.jpg", quality=90)
    torch.manual_seed(2)
    G = _weights_like_trained(build_generator("unet_128", 3, 3, 8, "batch", True, init=False))
    cfg = Config(ModelConfig(netG="unet_128", ngf=8), DataConfig(crop_size=SIZE, load_size=SIZE, direction="BtoA"))
    save(d / "G.safetensors", cfg=cfg, G=G)
    return d


def _pair(work: Path, mode: str) -> tuple[Path, Path]:
    fp32 = export_onnx(work / "G.safetensors", work / f"{mode}.fp32.onnx", mode=mode, overwrite=True)
    calib = Q.calibration_batches(work / "calib", read_onnx_meta(fp32), None)
    return fp32, Q.quantize_onnx(fp32, work / f"{mode}.int8.onnx", calib, overwrite=True)


def _x(work: Path, meta) -> torch.Tensor:
    return torch.from_numpy(np.concatenate(list(Q.calibration_batches(work / "calib", meta, None))))


@pytest.mark.parametrize("mode", ["eval", "paper"])
def test_openvino_runs_int8_close_to_fp32_and_to_onnxruntime(work, mode):
    fp32, int8 = _pair(work, mode)
    ov = open_runtime(int8, backend="openvino")
    assert ov.meta["precision"] == "int8" and ov.backend == "openvino"
    x = _x(work, ov.meta)
    y = ov(x)
    assert y.dtype == torch.float32 and y.shape == (4, 3, SIZE, SIZE)
    y_ref = open_runtime(fp32)(x)
    assert y_ref.std().item() > 0.05  # the outputs vary, so PSNR measures something
    assert MIN_PSNR <= _psnr(y, y_ref) < 100
    # the same QDQ arithmetic in another library (requantization rounding may differ by a step here and there)
    assert _psnr(y, open_runtime(int8)(x)) >= MIN_PSNR


def test_openvino_computes_every_convolution_in_int8(work):
    """The speed of the int8 file on OpenVINO comes from int8 convolutions: all of them, transposed ones included
    (asymmetric int8 activations left the ConvTranspose layers in fp32; see engines/quantize.py)."""
    import openvino as ov

    _, int8 = _pair(work, "eval")
    core = ov.Core()
    compiled = core.compile_model(core.read_model(str(int8)), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    precisions = {}
    for op in compiled.get_runtime_model().get_ordered_ops():
        info = op.get_rt_info()
        kind = info["layerType"].astype(str)
        if kind in ("Convolution", "Deconvolution"):
            precisions.setdefault(kind, []).append(info["runtimePrecision"].astype(str))
    assert len(precisions.get("Convolution", [])) == 7 and len(precisions.get("Deconvolution", [])) == 7, precisions
    assert all(p in ("i8", "u8") for ps in precisions.values() for p in ps), precisions

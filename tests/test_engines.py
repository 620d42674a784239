"""Export and engines: ONNX export in both modes, ONNX Runtime parity with torch, the runtime interface, the CLI, and
TensorRT (its pure-Python parts here; building and running where TensorRT and a GPU are present)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import trained_like
from torch import nn

from fastp2p import __version__
from fastp2p.checkpoint import file_hash, save
from fastp2p.config import Config, DataConfig, ModelConfig
from fastp2p.errors import UserError
from fastp2p.inference import with_mode
from fastp2p.models import build_generator, keys

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from fastp2p.engines import tensorrt as engine_trt  # noqa: E402
from fastp2p.engines.onnx import export_onnx, read_onnx_meta  # noqa: E402
from fastp2p.engines.onnxruntime import OrtGenerator, optimize_onnx  # noqa: E402
from fastp2p.engines.runtime import open_runtime  # noqa: E402

# ONNX Runtime (MLAS, kernels picked by the CPU's ISA) against torch (oneDNN), both float32 (eval mode: batch norm
# folded into the convs; paper mode: InstanceNormalization): the same sums in other orders. These kernels accumulate
# a sum of n products in blocks of <= 512 in vector registers, then add the blocks; as a random walk two such float32
# orders differ by ~sqrt(2) 2^-24 sqrt(512 + n / 512) = 2e-6 of a layer's scale (n <= 1024*16 at unet_256),
# sqrt(16 layers) x that = 8e-6 over the network, 4 sigma 3e-5, on outputs |y| < 1. (Measured on AVX-512 and SSE4.1
# kernels: 5e-7.)
FP32_TOL = 1e-4


def _trained_like(g: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial running statistics and affines, so eval and paper modes differ and folding is really tested."""
    return trained_like(g, seed)


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("engines")


@pytest.fixture(scope="module")
def G() -> nn.Module:
    torch.manual_seed(1)
    return _trained_like(build_generator("unet_128", ngf=8))


@pytest.fixture(scope="module")
def ckpt(work, G) -> Path:
    cfg = Config(ModelConfig(netG="unet_128", ngf=8), DataConfig(crop_size=128, load_size=143, direction="BtoA"))
    return save(work / "G.safetensors", cfg=cfg, G=G)


_EXPORTS: dict = {}


@pytest.fixture(scope="module")
def exported(work, ckpt):
    """exported(name, **kw) -> path; each distinct export is made once per module."""
    def get(name: str, **kw) -> Path:
        if name not in _EXPORTS:
            _EXPORTS[name] = export_onnx(ckpt, work / f"{name}.onnx", **kw)
        return _EXPORTS[name]

    yield get
    _EXPORTS.clear()


def _x(n: int, size: int = 128, seed: int | None = None) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    return torch.rand(n, 3, size, size, generator=gen) * 2 - 1


def _torch_ref(G, mode, x):
    with torch.inference_mode():
        return with_mode(G, mode, dropout=False)(x)


# ---------------------------------------------------------------------------------------------------------------------
# export
# ---------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["paper", "eval"])
def test_export_checker_opset_metadata_and_graph(exported, ckpt, mode):
    path = exported(f"{mode}_fp32", mode=mode)
    model = onnx.load(str(path))
    onnx.checker.check_model(model, full_check=True)
    assert model.opset_import[0].version >= 17
    assert not list(path.parent.glob(path.name + ".data"))  # self-contained
    ops = {n.op_type for n in model.graph.node}
    assert "BatchNormalization" not in ops and "Dropout" not in ops and "RandomUniformLike" not in ops
    assert ("InstanceNormalization" in ops) == (mode == "paper")  # eval: running statistics folded into the convs
    meta = read_onnx_meta(path)
    assert meta["mode"] == mode and meta["dropout"] == "off" and meta["precision"] == "fp32"
    assert meta["version"] == __version__
    assert meta["checkpoint_sha256"] == file_hash(ckpt) and meta["checkpoint"] == "G.safetensors"
    pre = meta["preprocessing"]
    assert pre["crop_size"] == 128 and pre["direction"] == "BtoA" and pre["input_nc"] == 3
    assert pre["normalize"] == {"mean": 0.5, "std": 0.5, "range": [-1, 1]}
    assert meta["arch"]["num_downs"] == 7 and meta["size_multiple"] == 128 and meta["dynamic_hw"] is False
    dims = model.graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_param and [d.dim_value for d in dims[1:]] == [3, 128, 128]  # dynamic batch, fixed H, W


@pytest.mark.parametrize("mode", ["paper", "eval"])
def test_onnxruntime_parity_fp32_batch_1_and_4(exported, G, mode):
    rt = OrtGenerator(exported(f"{mode}_fp32", mode=mode))
    for n in (1, 4):
        x = _x(n)  # fresh random inputs
        err = (rt(x) - _torch_ref(G, mode, x)).abs().max().item()
        assert err <= FP32_TOL, (mode, n, err)


def test_paper_mode_batched_equals_per_image(exported):
    rt = OrtGenerator(exported("paper_fp32", mode="paper"))
    x = _x(5)
    batched = rt(x)
    single = torch.cat([rt(x[i:i + 1]) for i in range(5)])
    # ONNX Runtime may sum in another order for another batch size (see test_runtime_frames_helper): FP32_TOL. Images
    # that leaked into each other's statistics would differ by ~0.1.
    assert (batched - single).abs().max().item() <= FP32_TOL


def test_eval_mode_is_not_paper_mode(exported, G):
    x = _x(2)
    ev = OrtGenerator(exported("eval_fp32", mode="eval"))(x)
    pa = OrtGenerator(exported("paper_fp32", mode="paper"))(x)
    assert (ev - pa).abs().max().item() > 1e-2


def test_dynamic_height_and_width(exported, G):
    path = exported("paper_dyn", mode="paper", dynamic=True)
    meta = read_onnx_meta(path)
    assert meta["dynamic_hw"] is True and meta["input"]["shape"] == ["N", 3, "H", "W"]
    rt = OrtGenerator(path)
    x = torch.rand(2, 3, 128, 256) * 2 - 1
    y = rt(x)
    assert y.shape == (2, 3, 128, 256)
    assert (y - _torch_ref(G, "paper", x)).abs().max().item() <= FP32_TOL


def test_fp16_export_runs_on_onnxruntime_cpu(exported, G):
    path = exported("paper_fp16", mode="paper", precision="fp16")
    model = onnx.load(str(path))
    onnx.checker.check_model(model, full_check=True)
    assert model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT  # float32 I/O, fp16 inside
    assert any(init.data_type == onnx.TensorProto.FLOAT16 for init in model.graph.initializer)
    assert read_onnx_meta(path)["precision"] == "fp16"
    x = _x(2)
    y = OrtGenerator(path)(x)
    assert torch.isfinite(y).all() and y.dtype == torch.float32
    # fp16 weights and activations (x86 ONNX Runtime computes the convs in float32 between fp16 casts): each layer's
    # inputs rounded to 11 bits, ~2 x 2^-11 / sqrt(3) = 5.6e-4 relative per layer as a random walk, sqrt(14) x that =
    # 2e-3 over the network, 4 sigma 8e-3, on outputs |y| < 1.
    assert (y - _torch_ref(G, "paper", x)).abs().max().item() < 2e-2


def test_bf16_export_passes_checker_at_opset_22(exported):
    path = exported("eval_bf16", mode="eval", precision="bf16")
    model = onnx.load(str(path))
    onnx.checker.check_model(model, full_check=True)
    assert model.opset_import[0].version >= 22
    assert any(init.data_type == onnx.TensorProto.BFLOAT16 for init in model.graph.initializer)
    with pytest.raises(UserError, match="bf16"):
        OrtGenerator(path)  # ONNX Runtime's CPU provider has no bfloat16 Conv: one clear error
    with pytest.raises(UserError, match="opset"):
        export_onnx(path.parent / "G.safetensors", path.parent / "x.onnx", precision="bf16", opset=18)


def test_paper_dropout_is_baked_in_and_random(exported, G):
    path = exported("paper_dropout", mode="paper", dropout=True)
    assert read_onnx_meta(path)["dropout"] == "on"
    assert "RandomUniformLike" in {n.op_type for n in onnx.load(str(path)).graph.node}
    rt = OrtGenerator(path)
    x = _x(1)
    a, b = rt(x), rt(x)
    assert (a - b).abs().max().item() > 1e-3  # a new mask every call
    assert a.abs().max().item() <= 1.0


def test_torchscript_exporter_fallback_gives_same_outputs(work, ckpt, G):
    path = export_onnx(ckpt, work / "ts.onnx", mode="eval", exporter="torchscript")
    onnx.checker.check_model(onnx.load(str(path)), full_check=True)
    x = _x(2)
    assert (OrtGenerator(path)(x) - _torch_ref(G, "eval", x)).abs().max().item() <= FP32_TOL


def test_reference_pth_export(work):
    torch.manual_seed(3)
    g = _trained_like(build_generator("unet_128", ngf=8, use_dropout=False))
    pth = work / "latest_net_G.pth"
    torch.save(keys.to_reference(g.state_dict(), 7), pth)
    path = export_onnx(pth, work / "ref.onnx", mode="eval", model=ModelConfig(netG="unet_128", no_dropout=True),
                       crop_size=128, exporter="torchscript")
    meta = read_onnx_meta(path)
    assert meta["checkpoint_sha256"] == file_hash(pth) and meta["arch"]["ngf"] == 8
    assert meta["preprocessing"]["crop_size"] == 128 and meta["preprocessing"]["direction"] == "AtoB"
    x = _x(1)
    assert (OrtGenerator(path)(x) - _torch_ref(g, "eval", x)).abs().max().item() <= FP32_TOL


def test_weights_over_the_protobuf_limit_go_to_one_external_file(work, ckpt, G, monkeypatch):
    from fastp2p.engines import onnx as engine_onnx

    monkeypatch.setattr(engine_onnx, "PROTOBUF_LIMIT", 1000)  # pretend the 2 GB limit is 1 KB
    path = export_onnx(ckpt, work / "big" / "G.onnx", mode="eval", exporter="torchscript")
    assert (path.parent / "G.onnx.data").is_file()
    assert path.stat().st_size < 100_000  # the graph only
    assert read_onnx_meta(path)["mode"] == "eval"
    x = _x(1)
    assert (OrtGenerator(path)(x) - _torch_ref(G, "eval", x)).abs().max().item() <= FP32_TOL


def test_export_user_errors(work, ckpt):
    with pytest.raises(UserError, match="checkpoint not found"):
        export_onnx(work / "missing.safetensors", work / "m.onnx")
    with pytest.raises(UserError, match=r"\*\.onnx"):
        export_onnx(ckpt, work / "m.plan")
    with pytest.raises(UserError, match="opset"):
        export_onnx(ckpt, work / "m.onnx", opset=13)
    with pytest.raises(UserError, match="multiple of 128"):
        export_onnx(ckpt, work / "m.onnx", crop_size=200)
    with pytest.raises(UserError, match="eval mode has no dropout"):
        export_onnx(ckpt, work / "m.onnx", mode="eval", dropout=True)


def test_unet_256_export_parity(work):
    """The real architecture once (unet_256, ngf 64, 54M parameters): export, checker, parity at batch 1."""
    torch.manual_seed(4)
    g = _trained_like(build_generator("unet_256"))
    cfg = Config(ModelConfig())
    ck = save(work / "G256.safetensors", cfg=cfg, G=g)
    path = export_onnx(ck, work / "G256.onnx", mode="eval")
    onnx.checker.check_model(str(path), full_check=True)
    x = _x(1, 256)
    assert (OrtGenerator(path)(x) - _torch_ref(g, "eval", x)).abs().max().item() <= FP32_TOL


# ---------------------------------------------------------------------------------------------------------------------
# ONNX Runtime optimized model, polygraphy
# ---------------------------------------------------------------------------------------------------------------------
def test_optimized_onnxruntime_model_keeps_metadata_and_parity(exported, work, G):
    src = exported("eval_fp32", mode="eval")
    out = optimize_onnx(src, work / "G.ort.onnx")
    side = json.loads(Path(str(out) + ".json").read_text())
    assert side["backend"] == "onnxruntime" and side["mode"] == "eval" and side["onnx_sha256"] == file_hash(src)
    assert read_onnx_meta(out)["checkpoint_sha256"] == read_onnx_meta(src)["checkpoint_sha256"]
    x = _x(3)
    assert (OrtGenerator(out)(x) - _torch_ref(G, "eval", x)).abs().max().item() <= FP32_TOL


def test_polygraphy_onnxrt_runner_validates_export(exported):
    if shutil.which("polygraphy") is None:
        pytest.skip("polygraphy is not installed (pip install 'fastp2p[onnx]')")
    path = exported("paper_fp32", mode="paper")
    p = subprocess.run(["polygraphy", "run", str(path), "--onnxrt", "--validate",
                        "--input-shapes", "input:[2,3,128,128]"], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "PASSED" in p.stdout + p.stderr


# ---------------------------------------------------------------------------------------------------------------------
# runtime interface
# ---------------------------------------------------------------------------------------------------------------------
def test_open_runtime_torch_and_onnxruntime_agree(exported, ckpt):
    x = _x(2)
    rt_torch = open_runtime(ckpt, mode="eval")
    rt_ort = open_runtime(exported("eval_fp32", mode="eval"))
    assert rt_torch.backend == "torch" and rt_ort.backend == "onnxruntime"
    for rt in (rt_torch, rt_ort):
        assert rt.meta["mode"] == "eval" and rt.meta["crop_size"] == 128 and rt.meta["direction"] == "BtoA"
        assert rt.meta["input_nc"] == 3 and rt.meta["checkpoint_sha256"] == file_hash(ckpt)
    assert (rt_torch(x) - rt_ort(x)).abs().max().item() <= FP32_TOL


def test_runtime_frames_helper(exported):
    rt = open_runtime(exported("eval_fp32", mode="eval"))
    frames = np.random.default_rng(0).integers(0, 256, (3, 128, 128, 3), dtype=np.uint8)
    out = rt.frames(frames)
    assert out.dtype == torch.uint8 and out.shape == (3, 128, 128, 3)
    single = rt.frames(frames[0])
    # Within one uint8 level, not equal: ONNX Runtime does not promise batch-invariant sums (MLAS's K blocking depends
    # on the GEMM's width, i.e. on the batch and on how many threads share it), and a float32 difference of ~1e-7 flips
    # a pixel that sits on a rounding boundary.
    assert single.shape == (1, 128, 128, 3) and (single[0].int() - out[0].int()).abs().max() <= 1
    resized = rt.frames(np.zeros((64, 96, 3), np.uint8), resize=True)
    assert resized.shape == (1, 128, 128, 3)


def test_runtime_refuses_mismatches(exported, work):
    path = exported("eval_fp32", mode="eval")
    with pytest.raises(UserError, match="eval mode"):
        open_runtime(path, mode="paper")
    rt = open_runtime(path)
    with pytest.raises(UserError, match="128x128 only"):
        rt(torch.zeros(1, 3, 256, 256))
    with pytest.raises(UserError, match="channels"):
        rt(torch.zeros(1, 1, 128, 128))
    with pytest.raises(UserError, match="unknown kind"):
        (work / "G.bin").write_bytes(b"x")
        open_runtime(work / "G.bin")


def test_torch_runtime_paper_mode_defaults_like_translate(ckpt):
    rt = open_runtime(ckpt)
    assert rt.meta["mode"] == "paper" and rt.meta["dropout"] is True
    x = _x(1)
    assert not torch.equal(rt(x), rt(x))  # the paper's dropout
    det = open_runtime(ckpt, dropout=False)
    torch.testing.assert_close(det(x), det(x))


# ---------------------------------------------------------------------------------------------------------------------
# TensorRT: the parts that need no TensorRT
# ---------------------------------------------------------------------------------------------------------------------
def test_profile_shapes_and_trtexec_command(exported):
    meta = read_onnx_meta(exported("paper_fp32", mode="paper"))
    shapes = engine_trt.profile_shapes(meta, (1, 8, 32))
    assert shapes == {"min": [1, 3, 128, 128], "opt": [8, 3, 128, 128], "max": [32, 3, 128, 128]}
    with pytest.raises(UserError, match="--dynamic"):
        engine_trt.profile_shapes(meta, (1, 8, 32), (128, 256, 512))
    dyn = engine_trt.profile_shapes(read_onnx_meta(exported("paper_dyn", mode="paper", dynamic=True)), (1, 2, 4),
                                    (128, 256, 512))
    assert dyn["max"] == [4, 3, 512, 512]
    cmd = engine_trt.trtexec_command("G.onnx", "G.plan", shapes, timing_cache="t.cache")
    for part in ("trtexec --onnx=G.onnx", "--saveEngine=G.plan", "--stronglyTyped", "--minShapes=input:1x3x128x128",
                 "--optShapes=input:8x3x128x128", "--maxShapes=input:32x3x128x128", "--builderOptimizationLevel=3",
                 "--memPoolSize=workspace:4096M", "--timingCacheFile=t.cache", "--noTF32"):
        assert part in cmd
    assert engine_trt.parse_triple("1,8,32", "--batch") == (1, 8, 32)
    assert engine_trt.parse_triple("4", "--batch") == (4, 4, 4)
    for bad in ("8,1,32", "a,b,c", "0,1,2", "1,2"):
        with pytest.raises(UserError, match="--batch"):
            engine_trt.parse_triple(bad, "--batch")


def test_plan_compatibility_check_refuses_other_tensorrt_or_gpu():
    meta = {"tensorrt_version": "10.13.0.35", "gpu": {"name": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0"},
            "onnx": "G.onnx"}
    here = {"name": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0"}
    engine_trt.check_compatible(meta, Path("G.plan"), "10.13.0.35", here)
    with pytest.raises(UserError, match="built with TensorRT 10.13.0.35, but this is TensorRT 11.4.0.106"):
        engine_trt.check_compatible(meta, Path("G.plan"), "11.4.0.106", here)
    with pytest.raises(UserError, match="rebuild it on this GPU"):
        engine_trt.check_compatible(meta, Path("G.plan"), "10.13.0.35",
                                    {"name": "NVIDIA L4", "compute_capability": "8.9"})


def test_plan_without_tensorrt_is_one_user_error(work, exported):
    plan = work / "paper_fp32.plan"
    plan.write_bytes(b"not an engine")
    exported("paper_fp32", mode="paper")  # the ONNX beside it gives the metadata of a trtexec-built plan
    assert engine_trt.read_plan_meta(plan)["mode"] == "paper"
    if engine_trt.tensorrt_available()[0]:
        pytest.skip("TensorRT is usable here")
    with pytest.raises(UserError):
        open_runtime(plan)


# ---------------------------------------------------------------------------------------------------------------------
# command line, as a user runs it
# ---------------------------------------------------------------------------------------------------------------------
def _fastp2p(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "fastp2p", *map(str, args)], capture_output=True, text=True,
                          timeout=300, cwd=cwd)


def test_cli_export_and_build_engine_onnxruntime(work, ckpt, G):
    out = work / "cli.onnx"
    p = _fastp2p("export", ckpt, "-o", out, "--mode", "eval")
    assert p.returncode == 0, p.stderr
    assert read_onnx_meta(out)["mode"] == "eval"
    p = _fastp2p("build-engine", out, "-o", work / "cli.ort.onnx", "--backend", "onnxruntime")
    assert p.returncode == 0, p.stderr
    assert (work / "cli.ort.onnx.json").is_file()
    x = _x(2)
    assert (OrtGenerator(work / "cli.ort.onnx")(x) - _torch_ref(G, "eval", x)).abs().max().item() <= FP32_TOL


def test_cli_build_engine_tensorrt_without_tensorrt(work, ckpt):
    if engine_trt.tensorrt_available()[0]:
        pytest.skip("TensorRT is usable here")
    plan = work / "cli_trt" / "G.plan"
    p = _fastp2p("build-engine", ckpt, "-o", plan, "--batch", "1,4,16")
    assert p.returncode != 0
    assert "Traceback" not in p.stderr
    errors = [ln for ln in p.stderr.strip().splitlines() if ln.strip()]
    assert len(errors) == 1 and errors[0].startswith("fastp2p: error: "), p.stderr
    assert "trtexec" in errors[0]
    assert "trtexec --onnx=" in p.stdout and "--maxShapes=input:16x3x128x128" in p.stdout
    onnx_path = plan.with_suffix(".onnx")
    assert onnx_path.is_file() and read_onnx_meta(onnx_path)["precision"] == "fp16"  # TensorRT's default


def test_cli_user_errors_are_one_line(work, ckpt):
    p = _fastp2p("export", work / "nope.safetensors", "-o", work / "x.onnx")
    assert p.returncode == 2 and p.stderr.strip().startswith("fastp2p: error: checkpoint not found")
    p = _fastp2p("build-engine", ckpt, "-o", work / "x.plan", "--backend", "onnxruntime")
    assert p.returncode == 2 and "*.onnx" in p.stderr and "Traceback" not in p.stderr


# ---------------------------------------------------------------------------------------------------------------------
# TensorRT proper (a machine with TensorRT >= 10 and a CUDA GPU)
# ---------------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def trt_ready():
    pytest.importorskip("tensorrt")
    if not torch.cuda.is_available():
        pytest.skip("TensorRT needs a CUDA GPU")


@pytest.mark.gpu
@pytest.mark.parametrize("precision,tol", [("fp32", 1e-3), ("fp16", 3e-2)])
def test_tensorrt_build_run_parity(trt_ready, work, ckpt, G, precision, tol):
    onnx_path = export_onnx(ckpt, work / f"trt_{precision}.onnx", mode="paper", precision=precision)
    plan = engine_trt.build_engine(onnx_path, work / f"trt_{precision}.plan", batch=(1, 2, 4),
                                   timing_cache=work / "timing.cache")
    side = json.loads(engine_trt.sidecar_path(plan).read_text())
    assert side["precision"] == precision and side["profile"]["input"]["max"] == [4, 3, 128, 128]
    assert side["gpu"]["name"] == torch.cuda.get_device_name()
    for cuda_graph in (False, True):
        rt = open_runtime(plan, cuda_graph=cuda_graph)
        for n in (1, 4):
            x = _x(n).cuda()
            y = rt(x)
            assert y.is_cuda
            assert (y.cpu() - _torch_ref(G, "paper", x.cpu())).abs().max().item() <= tol
    with pytest.raises(UserError, match="profile"):
        rt(_x(8).cuda())


@pytest.mark.gpu
def test_tensorrt_refuses_foreign_plan(trt_ready, work, ckpt):
    onnx_path = export_onnx(ckpt, work / "trt_foreign.onnx", mode="eval")
    plan = engine_trt.build_engine(onnx_path, work / "trt_foreign.plan", batch=(1, 1, 2),
                                   timing_cache=work / "timing.cache")
    side = engine_trt.sidecar_path(plan)
    meta = json.loads(side.read_text())
    meta["tensorrt_version"] = "9.0.0"
    side.write_text(json.dumps(meta))
    with pytest.raises(UserError, match="built with TensorRT 9.0.0"):
        open_runtime(plan)


# ---------------------------------------------------------------------------------------------------------------------
# backend choice and the OpenVINO IR's metadata: the parts that need no OpenVINO (it runs in tests/openvino_cases.py,
# in a process of its own; nothing here imports it)
# ---------------------------------------------------------------------------------------------------------------------
def _fake_ir(exported, path: Path, fmt: str | None = None) -> Path:
    """An .xml shaped like build_ir's (its <rt_info><fastp2p> section, from the export's metadata_props), plus a .bin:
    enough for the readers, which parse the XML with the standard library."""
    from xml.sax.saxutils import quoteattr

    from fastp2p.engines import openvino as engine_ov

    proto = onnx.load(str(exported("eval", mode="eval")), load_external_data=False)
    raw = {p.key.removeprefix("fastp2p."): p.value for p in proto.metadata_props}
    raw.update(format=fmt or engine_ov.IR_FORMAT, openvino_precision="fp32", openvino_hint="throughput")
    items = "".join(f"<{k} value={quoteattr(v)} />" for k, v in raw.items())
    path.write_text(f'<?xml version="1.0"?>\n<net name="G" version="11"><layers /><edges />'
                    f"<rt_info><fastp2p>{items}</fastp2p></rt_info></net>\n")
    path.with_suffix(".bin").write_bytes(b"\0" * 16)
    return path


def test_ir_metadata_is_read_without_openvino(exported, work):
    from fastp2p.engines import openvino as engine_ov

    ir = _fake_ir(exported, work / "fake_ir.xml")
    meta = engine_ov.read_ir_meta(ir)
    src = read_onnx_meta(exported("eval", mode="eval"))
    # the export's keys, decoded alike (JSON ones as JSON), plus what the build records
    assert {k: v for k, v in meta.items() if k not in ("format", "openvino_precision", "openvino_hint")} == \
        {k: v for k, v in src.items() if k != "format"}
    assert meta["format"] == engine_ov.IR_FORMAT and meta["openvino_hint"] == "throughput"
    assert engine_ov.is_our_ir(ir) and not engine_ov.is_our_ir(_fake_ir(exported, work / "other.xml", fmt="x"))
    info = engine_ov.describe_ir(ir)
    assert info["weights_size"] == 16 and info["mode"] == "eval" and "metadata_problem" not in info
    ir.with_suffix(".bin").unlink()
    with pytest.raises(UserError, match="fake_ir.bin are missing"):
        engine_ov.read_ir_meta(ir)
    assert "weights_problem" in engine_ov.describe_ir(ir)
    with pytest.raises(UserError, match="not an OpenVINO IR built by fastp2p"):
        engine_ov.read_ir_meta(work / "other.xml")
    (work / "junk.xml").write_text("<html><body>no</body></html>")
    with pytest.raises(UserError, match="not an OpenVINO IR"):
        engine_ov.describe_ir(work / "junk.xml")


def test_ir_outputs_replace_only_earlier_builds(exported, work):
    from fastp2p.engines import openvino as engine_ov

    d = work / "ir_out"
    d.mkdir()
    ours = _fake_ir(exported, d / "ours.xml")
    engine_ov.check_ir_output(ours, inputs=[exported("eval", mode="eval")])  # an earlier build: replaced
    (d / "user.xml").write_text("<net><layers /></net>")
    (d / "lone.bin").write_bytes(b"weights of someone else")
    for name, needle in (("user.xml", "user.xml: exists"), ("lone.xml", "lone.bin: exists")):
        with pytest.raises(UserError, match=needle):
            engine_ov.check_ir_output(d / name)
        engine_ov.check_ir_output(d / name, overwrite=True)
    with pytest.raises(UserError, match="name it \\*.xml"):
        engine_ov.check_ir_output(d / "G.ir")


def test_auto_backend_rule(exported, work, monkeypatch):
    from fastp2p.engines import openvino as engine_ov
    from fastp2p.engines.onnxruntime import optimize_onnx
    from fastp2p.engines.runtime import BACKEND_ENV, auto_backend

    src = exported("eval", mode="eval")
    monkeypatch.delenv(BACKEND_ENV, raising=False)
    monkeypatch.setattr(engine_ov, "openvino_installed", lambda: "2026.4.1")
    backend, why, meta = auto_backend(src)
    assert backend == "openvino" and why.startswith("fp32 file") and "openvino 2026.4 installed" in why
    assert meta == read_onnx_meta(src)  # handed on: the file is parsed once
    monkeypatch.setattr("fastp2p.engines.onnx.read_onnx_meta", lambda p: {**meta, "precision": "int8"})
    assert auto_backend(src)[:2] == ("openvino", "int8 QDQ file: OpenVINO runs it in int8; openvino 2026.4 installed")
    monkeypatch.undo()
    monkeypatch.delenv(BACKEND_ENV, raising=False)
    monkeypatch.setattr(engine_ov, "openvino_installed", lambda: None)
    assert auto_backend(src)[0] == "onnxruntime" and "not installed" in auto_backend(src)[1]
    assert auto_backend(src, options={"ov_hint": "throughput"})[:2] == ("openvino", "--ov_hint given")
    assert auto_backend(src, device="cuda")[0] == "onnxruntime"
    monkeypatch.setattr(engine_ov, "openvino_installed", lambda: "2026.4.1")
    opt = optimize_onnx(src, work / "auto.ort.onnx")
    assert auto_backend(opt)[0] == "onnxruntime"  # com.microsoft ops: ONNX Runtime's own graph
    monkeypatch.setenv(BACKEND_ENV, "onnxruntime")
    assert auto_backend(src)[:2] == ("onnxruntime", f"${BACKEND_ENV}=onnxruntime")
    monkeypatch.setenv(BACKEND_ENV, "tensorflow")
    with pytest.raises(UserError, match=f"\\${BACKEND_ENV}=tensorflow"):
        auto_backend(src)


def test_open_runtime_auto_says_which_in_one_line(exported, monkeypatch, caplog):
    import logging

    from fastp2p.engines import openvino as engine_ov
    from fastp2p.engines.runtime import BACKEND_ENV, OnnxRuntimeGenerator

    monkeypatch.delenv(BACKEND_ENV, raising=False)
    monkeypatch.setattr(engine_ov, "openvino_installed", lambda: None)
    with caplog.at_level(logging.INFO, logger="fastp2p.engines"):
        rt = open_runtime(exported("eval", mode="eval"), backend="auto")
    assert isinstance(rt, OnnxRuntimeGenerator)
    lines = [r.getMessage() for r in caplog.records if "auto:" in r.getMessage()]
    assert lines == ["backend onnxruntime (auto: openvino is not installed; pip install 'fastp2p[openvino]' for it) "
                     "-- pass --backend openvino to override"]
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="fastp2p.engines"):
        open_runtime(exported("eval", mode="eval"))  # None: ONNX Runtime, as before, and nothing said
    assert not caplog.records


def test_backend_options_are_refused_where_they_do_not_apply(exported, ckpt, work):
    from fastp2p.engines.runtime import BACKEND_CHOICES

    from fastp2p.cli.translate import BACKENDS, RUNTIME_OPTIONS

    assert BACKENDS == BACKEND_CHOICES  # the CLI's copy (it does not import torch to build the parser)
    src = exported("eval", mode="eval")
    for kw, needle in (({"backend": "onnxruntime", "ov_hint": "throughput"}, "--ov_hint: an OpenVINO option"),
                       ({"streams": 2}, "--streams: an OpenVINO option"),
                       ({"backend": "bogus"}, "choose one of auto, onnxruntime, openvino")):
        with pytest.raises(UserError, match=needle):
            open_runtime(src, **kw)
    with pytest.raises(UserError, match="--ov_precision: an OpenVINO option"):
        open_runtime(ckpt, ov_precision="bf16")
    open_runtime(ckpt, backend="auto")  # the CLI's default is fine for a checkpoint
    xml = work / "some.xml"
    xml.write_text("<net />")
    with pytest.raises(UserError, match="is an OpenVINO IR, which runs on OpenVINO"):
        open_runtime(xml, backend="onnxruntime")
    import inspect

    assert set(RUNTIME_OPTIONS) <= set(inspect.signature(open_runtime).parameters)


def test_cli_refuses_runtime_options_with_a_checkpoint(work, ckpt, capsys):
    from fastp2p.cli.main import main

    for extra in (["--threads", "2"], ["--ov_hint", "throughput"], ["--backend", "openvino"]):
        rc = main(["translate", str(work / "none.png"), "--checkpoint", str(ckpt), "-o", str(work / "o"), *extra])
        err = capsys.readouterr().err
        assert rc == 2 and extra[0] in err and "--checkpoint" in err and len(err.strip().splitlines()) == 1, err


def test_help_lists_the_openvino_backend_and_its_options(capsys):
    from fastp2p.cli.main import main

    for cmd, needles in (("build-engine", ["{tensorrt,openvino,onnxruntime}", "--ov_hint", "G.xml"]),
                         ("translate", ["{auto,onnxruntime,openvino}", "default auto", "--ov_precision", "--streams"]),
                         ("eval", ["{auto,onnxruntime,openvino}", "--threads"]), ("pipe", ["--ov_hint"])):
        with pytest.raises(SystemExit) as e:
            main([cmd, "--help"])
        out = " ".join(capsys.readouterr().out.split())
        assert e.value.code == 0 and all(n in out for n in needles), (cmd, out)

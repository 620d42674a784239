"""INT8 export (engines/quantize.py, ``fastp2p export --precision int8 --calib DIR``): the QDQ graph and its per-channel
weight scales, the metadata, calibration through the model's preprocessing, ONNX Runtime outputs close to the fp32
export's, the CLI's refusals, and what build-engine --backend tensorrt does with an int8 file without TensorRT.
OpenVINO runs the same files in tests/openvino_quantize_cases.py, in a process of its own (see tests/test_openvino.py).
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import trained_like
from PIL import Image
from torch import nn

from fastp2p.checkpoint import file_hash, save
from fastp2p.config import Config, DataConfig, ModelConfig
from fastp2p.errors import UserError
from fastp2p.models import build_generator

onnx = pytest.importorskip("onnx", reason="exporting needs onnx (pip install 'fastp2p[onnx]')")
pytest.importorskip("onnxruntime.quantization", reason="INT8 export needs onnxruntime (pip install 'fastp2p[onnx]')")

from fastp2p.engines import quantize as Q  # noqa: E402
from fastp2p.engines import tensorrt as engine_trt  # noqa: E402
from fastp2p.engines.onnx import describe_onnx, export_onnx, read_onnx_meta, update_onnx_meta  # noqa: E402
from fastp2p.engines.runtime import open_runtime  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SIZE = 128
# Bound on the PSNR of int8 outputs against the fp32 export's (uint8 images, peak 1). A symmetric int8 tensor of
# calibrated range R is rounded to steps of R/127: uniform noise of std R/(127 sqrt 12) = 0.23% of R. Over the ~14
# quantized layers of unet_128 that adds up as a random walk, sqrt(14) x 0.23% = 0.85% of a layer's range; allow 3x
# for tensors whose calibrated range is well above their typical values (min/max ranges are set by the extremes of
# the calibration set), which gives 2.6% of the output's range [-1, 1], i.e. 1.3% of the image's [0, 1]: 20 log10
# (1 / 0.013) = 38 dB. 30 dB leaves room for any x86 kernel (ONNX Runtime's and OpenVINO's int8 paths round
# differently); measured here (paper mode, outputs std 0.26): 40.6 dB on ONNX Runtime, 40.3 on OpenVINO (eval mode,
# whose outputs vary less: 54 dB). Upper bound: int8 must differ from fp32 at all (PSNR < 100: not a copy).
MIN_PSNR = 30.0


def _weights_like_trained(g: nn.Module, seed: int = 0) -> nn.Module:
    """Weights of unit gain (default init, not pix2pix's N(0, 0.02), whose untrained output is nearly constant) and
    non-trivial batch-norm statistics and affines, so the outputs vary and quantization error shows."""
    return trained_like(g, seed, mean_std=0.1, var_lo=0.1, var_span=0.5)


def _smooth_image(rng: np.random.Generator, h: int, w: int) -> Image.Image:
    """A photo-like image: smooth colour blobs plus a little noise (a JPEG of pure noise calibrates nothing real)."""
    coarse = rng.integers(0, 256, (h // 16 + 1, w // 16 + 1, 3), dtype=np.uint8)
    img = Image.fromarray(coarse).resize((w, h), Image.BICUBIC)
    arr = np.asarray(img).astype(np.int16) + rng.integers(-12, 13, (h, w, 3))
    return Image.fromarray(arr.clip(0, 255).astype(np.uint8))


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("quantize")


@pytest.fixture(scope="module")
def calib_dir(work) -> Path:
    """Six aligned A|B JPEG pairs (256 x 128: A left, B right) and nothing else."""
    d = work / "calib"
    d.mkdir()
    rng = np.random.default_rng(0)
    for i in range(6):
        _smooth_image(rng, SIZE, 2 * SIZE).save(d / f"{i}.jpg", quality=90)
    return d


@pytest.fixture(scope="module")
def ckpt(work) -> Path:
    torch.manual_seed(2)
    G = _weights_like_trained(build_generator("unet_128", 3, 3, 8, "batch", True, init=False))
    cfg = Config(ModelConfig(netG="unet_128", ngf=8), DataConfig(crop_size=SIZE, load_size=SIZE, direction="BtoA"))
    return save(work / "G.safetensors", cfg=cfg, G=G)


@pytest.fixture(scope="module")
def fp32(work, ckpt) -> Path:
    return export_onnx(ckpt, work / "G.fp32.onnx")  # paper mode, the default (its outputs vary the most here)


@pytest.fixture(scope="module")
def int8(work, fp32, calib_dir) -> Path:
    calib = Q.calibration_batches(calib_dir, read_onnx_meta(fp32), 4, batch_size=2)
    return Q.quantize_onnx(fp32, work / "G.int8.onnx", calib)


def _psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR of two generator outputs as the uint8 images `translate` writes (peak 1)."""
    from fastp2p import metrics as M
    from fastp2p.inference import to_uint8

    return float(np.mean(M.image_metrics(M.from_uint8(to_uint8(a)), M.from_uint8(to_uint8(b)))["PSNR"]))


def _inputs(calib_dir, meta) -> torch.Tensor:
    return torch.from_numpy(np.concatenate(list(Q.calibration_batches(calib_dir, meta, None))))


# ---------------------------------------------------------------------------------------------------------------------
# the file
# ---------------------------------------------------------------------------------------------------------------------
def test_qdq_graph_with_per_channel_symmetric_weights(fp32, int8):
    proto = onnx.load(str(int8))
    ops = [n.op_type for n in proto.graph.node]
    n_convs = sum(op in ("Conv", "ConvTranspose") for op in ops)
    assert n_convs == 14  # unet_128: 7 down, 7 up
    s = Q.qdq_summary(proto)
    assert s["quantize"] > 0 and s["dequantize"] > n_convs
    assert s["per_channel_weights"] == n_convs  # one weight scale per output channel, every (transposed) conv
    assert s["asymmetric"] == [] and s["quantized_bias"] == []  # what TensorRT needs: symmetric, float biases
    assert Q.tensorrt_problem(int8) is None
    inits = {t.name: t for t in proto.graph.initializer}
    for n in proto.graph.node:
        if n.op_type in ("Conv", "ConvTranspose"):
            w_dq = next(m for m in proto.graph.node if n.input[1] in m.output)
            assert w_dq.op_type == "DequantizeLinear"
            w, scale = inits[w_dq.input[0]], inits[w_dq.input[1]]
            assert w.data_type == onnx.TensorProto.INT8
            axis = next(a.i for a in w_dq.attribute if a.name == "axis")
            out_channels = w.dims[1] if n.op_type == "ConvTranspose" else w.dims[0]
            assert axis == (1 if n.op_type == "ConvTranspose" else 0) and list(scale.dims) == [out_channels]
    # graph input and output stay float32
    d = describe_onnx(int8)
    assert d["inputs"][0]["dtype"] == "float" and d["outputs"][0]["dtype"] == "float"
    assert int8.stat().st_size < 0.4 * fp32.stat().st_size  # int8 weights: about a quarter of the bytes


def test_metadata_records_precision_and_calibration(fp32, int8, calib_dir):
    meta = read_onnx_meta(int8)
    src = read_onnx_meta(fp32)
    assert meta["precision"] == "int8" and src["precision"] == "fp32"
    for k in ("mode", "preprocessing", "arch", "input", "output", "checkpoint_sha256", "size_multiple"):
        assert meta[k] == src[k], k
    qm = meta["quantization"]
    import onnxruntime

    assert qm["tool"] == Q.TOOL and qm["onnxruntime"] == onnxruntime.__version__
    assert qm["method"] == "minmax" and qm["per_channel"] is True and "symmetric" in qm["activations"]
    assert qm["calib"] == str(calib_dir) and qm["calib_images"] == 4 and qm["calib_direction"] == "BtoA"
    files = Q.calibration_batches(calib_dir, meta, 4).files
    assert files == ["0.jpg", "2.jpg", "3.jpg", "5.jpg"]  # 4 of 6, evenly spaced
    lines = "".join(f"{f}\t{file_hash(calib_dir / f)}\n" for f in files)
    assert qm["calib_files_sha256"] == hashlib.sha256(lines.encode()).hexdigest()
    assert qm["source_onnx_sha256"] == file_hash(fp32)
    assert describe_onnx(int8)["fastp2p"]["quantization"] == qm  # what `fastp2p info` prints


def test_update_onnx_meta_adds_and_removes_entries(work, int8):
    p = work / "G.int8.meta.onnx"
    proto = onnx.load(str(int8))
    entry = proto.metadata_props.add()
    entry.key, entry.value = "someone.else", "kept"
    onnx.save(proto, str(p))
    before = read_onnx_meta(p)
    after = update_onnx_meta(p, quality_gate={"psnr_vs_fp32": 41.5, "passed": True})
    assert after["quality_gate"] == {"psnr_vs_fp32": 41.5, "passed": True}
    assert read_onnx_meta(p) == {**before, "quality_gate": after["quality_gate"]}
    other = [e.key for e in onnx.load(str(p), load_external_data=False).metadata_props]
    assert "someone.else" in other  # entries that are not fastp2p's are kept
    update_onnx_meta(p, quality_gate=None)
    assert read_onnx_meta(p) == before
    with pytest.raises(ValueError, match="JSON key"):
        update_onnx_meta(p, not_a_json_key={"a": 1})


# ---------------------------------------------------------------------------------------------------------------------
# running it
# ---------------------------------------------------------------------------------------------------------------------
def test_onnxruntime_runs_it_close_to_fp32(fp32, int8, calib_dir):
    rt, ref = open_runtime(int8), open_runtime(fp32)
    assert rt.meta["precision"] == "int8" and rt.backend == "onnxruntime"
    x = _inputs(calib_dir, rt.meta)
    y, y_ref = rt(x), ref(x)
    assert y.dtype == torch.float32 and y.shape == (6, 3, SIZE, SIZE)
    assert y_ref.std().item() > 0.05  # the outputs vary, so PSNR measures something
    assert MIN_PSNR <= _psnr(y, y_ref) < 100


def test_openvino_cases_in_their_own_process():
    pytest.importorskip("openvino", reason="openvino is not installed (pip install 'fastp2p[openvino]')")
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                        "tests/openvino_quantize_cases.py"], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    assert " passed" in r.stdout and "failed" not in r.stdout, r.stdout[-2000:]


# ---------------------------------------------------------------------------------------------------------------------
# calibration images
# ---------------------------------------------------------------------------------------------------------------------
def _prep(img: Image.Image) -> np.ndarray:
    return np.array(img.convert("RGB").resize((SIZE, SIZE), Image.BICUBIC))


def test_calibration_reads_the_source_half_per_direction(calib_dir):
    img = Image.open(calib_dir / "0.jpg").convert("RGB")
    a, b = img.crop((0, 0, SIZE, SIZE)), img.crop((SIZE, 0, 2 * SIZE, SIZE))
    pre = {"crop_size": SIZE, "direction": "BtoA", "input_nc": 3}
    for direction, half in (("BtoA", b), ("AtoB", a)):
        batches = list(Q.calibration_batches(calib_dir, {**pre, "direction": direction}, 2, batch_size=2))
        assert len(batches) == 1 and batches[0].shape == (2, 3, SIZE, SIZE) and batches[0].dtype == np.float32
        want = torch.from_numpy(_prep(half)).permute(2, 0, 1).float() / 127.5 - 1
        assert np.array_equal(batches[0][0], want.numpy()), direction
        assert batches[0].min() >= -1 and batches[0].max() <= 1


def test_calibration_takes_plain_images_and_a_b_folders(tmp_path):
    rng = np.random.default_rng(1)
    plain = tmp_path / "plain"
    plain.mkdir()
    for i in range(3):
        _smooth_image(rng, 96, 160).save(plain / f"p{i}.png")  # not 2:1, so a whole source image
    pre = {"crop_size": SIZE, "direction": "BtoA"}
    calib = Q.calibration_batches(plain, pre, None)
    x = np.concatenate(list(calib))
    assert len(calib) == 3 and x.shape == (3, 3, SIZE, SIZE)
    want = torch.from_numpy(_prep(Image.open(plain / "p0.png"))).permute(2, 0, 1).float() / 127.5 - 1
    assert np.array_equal(x[0], want.numpy())
    ab = tmp_path / "ab"
    for side in ("A", "B"):
        (ab / side).mkdir(parents=True)
        for i in range(2):
            _smooth_image(rng, SIZE, SIZE).save(ab / side / f"{i}.png")
    for direction, side in (("AtoB", "A"), ("BtoA", "B")):
        calib = Q.calibration_batches(ab, {**pre, "direction": direction}, None)
        assert calib.files == [f"{side}/0.png", f"{side}/1.png"]
        want = torch.from_numpy(_prep(Image.open(ab / side / "0.png"))).permute(2, 0, 1).float() / 127.5 - 1
        assert np.array_equal(next(iter(calib))[0], want.numpy())


def test_files_sha256_changes_with_a_file(tmp_path, calib_dir):
    d = tmp_path / "c"
    d.mkdir()
    for p in sorted(calib_dir.iterdir())[:2]:
        (d / p.name).write_bytes(p.read_bytes())
    pre = {"crop_size": SIZE}
    h0 = Q.calibration_batches(d, pre, None).files_sha256
    assert Q.calibration_batches(d, pre, None).files_sha256 == h0
    _smooth_image(np.random.default_rng(9), SIZE, 2 * SIZE).save(d / "0.jpg")
    assert Q.calibration_batches(d, pre, None).files_sha256 != h0


@pytest.mark.parametrize("case", ["missing", "file", "empty", "no_images", "empty_a"])
def test_bad_calib_folder_is_one_user_error_naming_calib(tmp_path, case):
    d = tmp_path / "calib"
    if case == "file":
        d.write_text("x")
    elif case != "missing":
        d.mkdir()
    if case == "no_images":
        (d / "notes.txt").write_text("no images here")
    if case == "empty_a":
        (d / "A").mkdir()
        (d / "B").mkdir()
    with pytest.raises(UserError) as e:
        Q.calibration_sources(d, 4)
    msg = str(e.value)
    assert msg.startswith("--calib ") and str(d) in msg and "\n" not in msg, msg


def test_quantize_refuses_bad_inputs(work, fp32, ckpt):
    batch = np.zeros((1, 3, SIZE, SIZE), np.float32)
    with pytest.raises(UserError, match="--calib_method"):
        Q.quantize_onnx(fp32, work / "bad.onnx", [batch], method="kl")
    with pytest.raises(UserError, match=r"calibration batch of shape \(1, 3, 64, 64\)"):
        Q.quantize_onnx(fp32, work / "bad.onnx", [np.zeros((1, 3, 64, 64), np.float32)])
    with pytest.raises(UserError, match="no calibration images"):
        Q.quantize_onnx(fp32, work / "bad.onnx", [])
    fp16 = export_onnx(ckpt, work / "G.fp16.onnx", mode="eval", precision="fp16")
    with pytest.raises(UserError, match="starts from an fp32 export"):
        Q.quantize_onnx(fp16, work / "bad.onnx", [batch])
    assert not (work / "bad.onnx").exists()


def test_quantize_accepts_torch_batches_and_other_methods(work, fp32, calib_dir):
    meta = read_onnx_meta(fp32)
    batches = [torch.from_numpy(b) for b in Q.calibration_batches(calib_dir, meta, 2)]
    out = Q.quantize_onnx(fp32, work / "G.pct.onnx", batches, method="percentile", per_channel=False,
                          meta_extra={"note": "test"})
    qm = read_onnx_meta(out)["quantization"]
    assert qm["method"] == "percentile" and qm["per_channel"] is False and qm["calib_images"] == 2
    assert qm["note"] == "test" and "calib_files_sha256" not in qm  # plain batches carry no file list
    assert Q.qdq_summary(out)["per_channel_weights"] == 0


# ---------------------------------------------------------------------------------------------------------------------
# the command line
# ---------------------------------------------------------------------------------------------------------------------
def _fastp2p(*args):
    return subprocess.run([sys.executable, "-m", "fastp2p", *map(str, args)], capture_output=True, text=True,
                          timeout=300)


def _one_error_line(p) -> str:
    lines = [ln for ln in p.stderr.strip().splitlines() if ln.strip()]
    assert p.returncode == 2 and len(lines) == 1 and lines[0].startswith("fastp2p: error: "), p.stderr
    return lines[0]


def test_cli_export_int8_end_to_end(work, ckpt, calib_dir, fp32):
    out = work / "cli.int8.onnx"
    p = _fastp2p("export", ckpt, "-o", out, "--precision", "int8", "--calib", calib_dir, "--calib_images", 3,
                 "--calib_method", "minmax")
    assert p.returncode == 0, p.stderr
    assert "int8 QDQ, calibrated on 3 image(s)" in p.stdout
    meta = read_onnx_meta(out)
    assert meta["precision"] == "int8" and meta["mode"] == "paper" and meta["quantization"]["calib_images"] == 3
    x = _inputs(calib_dir, meta)
    assert MIN_PSNR <= _psnr(open_runtime(out)(x), open_runtime(fp32)(x)) < 100
    # an existing file of someone else's is not replaced without --overwrite; the earlier int8 export is ours
    foreign = work / "foreign.onnx"
    foreign.write_bytes(b"someone's file")
    p = _fastp2p("export", ckpt, "-o", foreign, "--precision", "int8", "--calib", calib_dir, "--calib_images", 1)
    assert "--overwrite" in _one_error_line(p) and foreign.read_bytes() == b"someone's file"
    p = _fastp2p("export", ckpt, "-o", out, "--precision", "int8", "--calib", calib_dir, "--calib_images", 1)
    assert p.returncode == 0, p.stderr
    assert read_onnx_meta(out)["quantization"]["calib_images"] == 1


def test_cli_calibration_flags_are_checked(work, ckpt, calib_dir, tmp_path):
    out = tmp_path / "x.onnx"
    line = _one_error_line(_fastp2p("export", ckpt, "-o", out, "--precision", "int8"))
    assert "--calib" in line
    line = _one_error_line(_fastp2p("export", ckpt, "-o", out, "--calib", calib_dir))
    assert "--calib" in line and "--precision int8" in line
    line = _one_error_line(_fastp2p("export", ckpt, "-o", out, "--calib_method", "entropy"))
    assert "--calib_method" in line
    line = _one_error_line(_fastp2p("export", ckpt, "-o", out, "--precision", "int8", "--calib", tmp_path / "no"))
    assert "--calib" in line and "no such folder" in line
    (tmp_path / "empty").mkdir()
    line = _one_error_line(_fastp2p("export", ckpt, "-o", out, "--precision", "int8", "--calib", tmp_path / "empty"))
    assert "--calib" in line and "no .png/.jpg/.jpeg" in line
    assert not out.exists()


def test_parser_defaults_agree_with_the_library():
    from fastp2p.cli.main import build_parser

    sub = next(a for a in build_parser()._actions if hasattr(a, "choices") and isinstance(a.choices, dict))
    export = sub.choices["export"]
    flags = {a.dest: a for a in export._actions}
    assert set(flags["calib_method"].choices) == set(Q.METHODS)
    assert f"default {Q.DEFAULT_CALIB_IMAGES}" in flags["calib_images"].help
    assert f"default {Q.DEFAULT_METHOD}" in flags["calib_method"].help
    assert "int8" in flags["precision"].choices
    assert "calib" not in {a.dest for a in sub.choices["build-engine"]._actions}  # build-engine never calibrates


# ---------------------------------------------------------------------------------------------------------------------
# TensorRT: what needs no TensorRT
# ---------------------------------------------------------------------------------------------------------------------
def test_build_engine_tensorrt_takes_an_int8_file_without_tensorrt(work, int8):
    if engine_trt.tensorrt_available()[0]:
        pytest.skip("TensorRT is usable here")
    plan = work / "trt" / "G.int8.plan"
    p = _fastp2p("build-engine", int8, "-o", plan, "--batch", "1,4,8")
    assert "trtexec" in _one_error_line(p)
    cmd = next(ln for ln in p.stdout.splitlines() if ln.startswith("trtexec "))
    assert f"--onnx={int8}" in cmd and "--stronglyTyped" in cmd and "--maxShapes=input:8x3x128x128" in cmd
    assert "--int8" not in cmd and "--fp16" not in cmd  # precision flags do not apply to strongly typed networks
    p = _fastp2p("build-engine", int8, "-o", plan, "--precision", "int8")
    assert "trtexec" in _one_error_line(p)  # --precision int8 agrees with the file


def test_build_engine_int8_refusals(work, ckpt, int8, fp32, calib_dir):
    line = _one_error_line(_fastp2p("build-engine", int8, "-o", work / "a.plan", "--precision", "fp16"))
    assert "--precision fp16" in line and "int8" in line
    line = _one_error_line(_fastp2p("build-engine", fp32, "-o", work / "a.plan", "--precision", "int8"))
    assert "--precision int8" in line and "--calib DIR" in line
    line = _one_error_line(_fastp2p("build-engine", ckpt, "-o", work / "a.plan", "--precision", "int8"))
    assert "does not calibrate" in line and "fastp2p export" in line
    # an asymmetric (uint8-activation) QDQ file, which TensorRT cannot quantize
    calib = Q.calibration_batches(calib_dir, read_onnx_meta(fp32), 2)
    asym = Q.quantize_onnx(fp32, work / "G.u8.onnx", calib, symmetric=False)
    assert Q.qdq_summary(asym)["asymmetric"]
    with pytest.raises(UserError, match="symmetric int8 only"):
        engine_trt.check_int8_onnx(asym)
    line = _one_error_line(_fastp2p("build-engine", asym, "-o", work / "a.plan"))
    assert "zero point" in line and "trtexec" not in line
    assert open_runtime(asym).meta["precision"] == "int8"  # ONNX Runtime still runs it


def test_tensorrt_check_refuses_int32_biases(work, fp32, calib_dir):
    """onnxruntime's own default quantizes biases to int32 behind a DequantizeLinear, which TensorRT's parser
    refuses ("only activation types allowed as input to this layer"); quantize_onnx keeps them float."""
    from onnxruntime import quantization as ortq

    class Reader(ortq.CalibrationDataReader):
        def __init__(self):
            self.it = iter(Q.calibration_batches(calib_dir, read_onnx_meta(fp32), 2))

        def get_next(self):
            x = next(self.it, None)
            return None if x is None else {"input": x}

    out = work / "G.ortdefault.onnx"
    ortq.quantize_static(str(fp32), str(out), Reader(), per_channel=True, activation_type=ortq.QuantType.QInt8,
                         extra_options={"ActivationSymmetric": True})
    s = Q.qdq_summary(out)
    assert s["quantized_bias"] and not s["asymmetric"]
    with pytest.raises(UserError, match="int32"):
        engine_trt.check_int8_onnx(out)


# ---------------------------------------------------------------------------------------------------------------------
# TensorRT proper (a machine with TensorRT >= 10 and a CUDA GPU)
# ---------------------------------------------------------------------------------------------------------------------
@pytest.mark.gpu
def test_tensorrt_int8_build_run_close_to_fp32(work, int8, fp32, calib_dir):
    pytest.importorskip("tensorrt")
    if not torch.cuda.is_available():
        pytest.skip("TensorRT needs a CUDA GPU")
    plan = engine_trt.build_engine(int8, work / "G.int8.plan", batch=(1, 2, 8), timing_cache=work / "timing.cache")
    side = json.loads(engine_trt.sidecar_path(plan).read_text())
    assert side["precision"] == "int8" and side["quantization"]["method"] == "minmax"
    x = _inputs(calib_dir, read_onnx_meta(int8))
    y = open_runtime(plan)(x.cuda()).cpu()
    assert MIN_PSNR <= _psnr(y, open_runtime(fp32)(x)) < 100


def test_cli_export_int8_quality_gate(work, ckpt, calib_dir, tmp_path, capsys):
    """The gate scores the int8 file against the fp32 checkpoint on --gate_data: below --min_psnr nothing lands at -o
    (exit 2, one line); above it, or with --force, the file carries the scores."""
    from fastp2p.cli.main import main

    base = ["export", str(ckpt), "--precision", "int8", "--calib", str(calib_dir), "--calib_images", "2",
            "--gate_data", str(calib_dir), "--gate_images", "3"]
    out = tmp_path / "g.int8.onnx"
    assert main([*base, "-o", str(out), "--min_psnr", "99"]) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert err[-1].startswith("fastp2p: error: INT8 export: PSNR") and "--min_psnr 99" in err[-1]
    assert "nothing written" in err[-1] and not out.exists() and not list(tmp_path.glob("fastp2p-int8-*"))
    assert any(ln.startswith("gate INT8 export: 3 image(s)") for ln in err)
    assert main([*base, "-o", str(out), "--min_psnr", str(MIN_PSNR)]) == 0
    q = read_onnx_meta(out)["quality_gate"]
    assert q["passed"] is True and q["images"] == 3 and MIN_PSNR <= q["psnr_ref"] < 100 and q["min_psnr"] == MIN_PSNR
    assert q["reference"] == str(ckpt) and q["candidate"] == str(out) and q["mode"] == "paper"
    forced = tmp_path / "f.int8.onnx"
    assert main([*base, "-o", str(forced), "--min_psnr", "99", "--force"]) == 0
    assert read_onnx_meta(forced)["quality_gate"]["passed"] is False
    capsys.readouterr()
    # the gate flags belong to int8; --no_gate skips it (nothing recorded)
    assert main(["export", str(ckpt), "-o", str(tmp_path / "x.onnx"), "--gate_data", str(calib_dir)]) == 2
    assert "--gate_data" in capsys.readouterr().err
    assert main([*base[:6], "-o", str(tmp_path / "n.int8.onnx"), "--no_gate"]) == 0
    assert "quality_gate" not in read_onnx_meta(tmp_path / "n.int8.onnx")

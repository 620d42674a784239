"""INT8 post-training quantization of an fp32 ONNX export: static, per-channel, QDQ, calibrated on real images.

    fastp2p export CKPT -o G.int8.onnx --precision int8 --calib DIR [--calib_images N] [--calib_method minmax]

``calibration_batches`` reads source images of a folder through the model's own preprocessing (the export's
direction and crop size, bicubic resize, [-1, 1]; ``fastp2p.scoring``'s loaders): an aligned A|B pair gives its
source half (the right one for BtoA), an ``A/`` + ``B/`` folder its ``A`` or ``B`` image, a plain image is a source
as it is (``translate --layout auto``). ``quantize_onnx`` calibrates activation ranges on them with
``onnxruntime.quantization.quantize_static`` and writes a QDQ graph: int8 weights with one scale per output channel
(Conv axis 0, ConvTranspose axis 1), int8 activations with one scale per tensor, QuantizeLinear/DequantizeLinear
pairs around every Conv, ConvTranspose, Concat and LeakyRelu; InstanceNormalization (paper mode) and Tanh stay
float. The graph's input and output stay float32. The file keeps the export's fastp2p metadata with ``precision``
"int8" and a ``quantization`` entry (tool and version, method, per-channel, activation scheme, the calibration
folder, image count and a sha256 over the calibration files' names and contents). ``update_onnx_meta`` adds the
quality gate's scores afterwards.

Choices, measured (2026-12-02; 2-core AMD EPYC Zen 4, AVX-512 VNNI, no AMX; other jobs on the same cores, load
average 3-6, so only ratios within one run mean anything; unet_256 ngf 64, eval mode, 256x256; ms per image, medians
of 5-7 interleaved calls; quality: PSNR of the uint8 outputs against the fp32 export's over the 100 facades val
sources, BtoA, the teacher trained by `fastp2p train` for 1600 steps, calibrated on 64 facades train images):

    variant (onnxruntime quantize_static, QDQ)          OpenVINO b1 ms      PSNR vs fp32, mean / worst image
    int8 symmetric activations, per-channel, minmax 64    43.5 (fp32 167)     44.2 / 43.2 dB   <- the default
      asymmetric uint8 activations (ORT's x86 default)    47.8, same run      45.3 / 43.0 dB   TensorRT refuses it
      asymmetric int8 activations                         138 (ConvTranspose left in fp32)
      per-tensor weights                                  43.5 vs 45.1 (*)    43.9 / 42.2 dB
      percentile calibration                              same graph          45.4 / 43.6 dB   2x calibration time
      minmax on 16 images / on 32                         same graph          45.3 / 43.4, 43.8 / 41.2 dB
    paper mode (InstanceNormalization stays float)        53.9 vs 166 (*)     42.9 dB (step-1000 teacher)
    (*) measured with uint8 activations

- **Symmetric signed int8 activations** (zero point 0), not ORT's CPU default of asymmetric uint8: the only scheme
  TensorRT's explicit quantization takes, so one file serves OpenVINO, ONNX Runtime and TensorRT; on OpenVINO as
  fast as uint8 with every Conv, ConvTranspose and Concat in int8, for ~1 dB. **Float biases** (``QuantizeBias``
  off): TensorRT refuses int32 ones; no slower on OpenVINO (60.5 vs 72.6 ms b1, same run).
- **Per-channel weights**: as fast as per-tensor on OpenVINO (within the noise: 45.1 vs 43.5 ms b1, 46.6 vs 41.0
  b8) and 0.3 dB better.
- **minmax** by default: within 1.2 dB of percentile (the best) at half the calibration time and without holding
  every activation in memory; 64 images (more images widen min/max ranges a little, but cover more content than the
  handful that scores best on val). Nothing needs excluding: the worst image is 43 dB, far above the issue's 35 dB.
- **onnxruntime.quantization, not NNCF**: ``quantize_static`` covers the whole chain (Conv, ConvTranspose, LeakyRelu,
  Concat; Relu folds into the Q/DQ; only Tanh and InstanceNormalization stay float), so OpenVINO has nothing left
  to run in int8 that NNCF could add; it comes with ``fastp2p[onnx]``; ``quant_pre_process`` changed nothing in our
  already-clean graphs (same nodes), so it is not run.
- Speed of the default, in one run at load ~4 (teacher weights):

      backend                       b1 ms   b8 ms   x eager b1 / b8
      eager torch fp32              283     240     1.0 / 1.0
      ONNX Runtime fp32             195     185     1.5 / 1.3
      OpenVINO fp32                 175     144     1.6 / 1.7
      ONNX Runtime int8 (this)      262     234     1.1 / 1.0
      OpenVINO int8 (this)           54.5    46.7   5.2 / 5.1

  (an earlier run at load ~3, uint8 activations: 56 vs 352 ms eager at b1, 6.3x; on a quiet machine the ratio
  is the issue's to measure with `fastp2p bench`). ONNX Runtime runs the file but gains nothing from it here
  (MLAS's int8 convolutions prefer uint8 activations and do not win on this CPU): the int8 file is OpenVINO's and
  TensorRT's.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from fastp2p import __version__, outputs
from fastp2p.checkpoint import file_hash
from fastp2p.errors import DataError, UserError, first_line

from .onnx import PROTOBUF_LIMIT, _set_meta, check_onnx_output, read_onnx_meta, require_onnx, save_onnx

log = logging.getLogger("fastp2p.engines")

METHODS = ("minmax", "entropy", "percentile")
_ORT_METHODS = {"minmax": "MinMax", "entropy": "Entropy", "percentile": "Percentile"}
DEFAULT_METHOD = "minmax"
DEFAULT_CALIB_IMAGES = 64
TOOL = "onnxruntime.quantization.quantize_static"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
CALIB_HINT = "give it a folder of source images (aligned A|B pairs, A/ and B/ sub-folders, or plain images)"


def require_quantization():
    try:
        from onnxruntime import quantization
    except ImportError:
        raise UserError("INT8 export needs onnxruntime (its quantization tools): pip install 'fastp2p[onnx]'") from None
    return quantization


# ---------------------------------------------------------------------------------------------------------------------
# calibration images
# ---------------------------------------------------------------------------------------------------------------------
@dataclass
class CalibrationSet:
    """Source images through the model's preprocessing: iterating yields float32 N,C,H,W batches in [-1, 1]
    (``batch_size`` images each, the last one smaller). ``info`` is what the int8 file's metadata records."""

    folder: Path
    files: list[str]  # relative to ``folder``, in the order read
    loaders: list[Callable[[], np.ndarray]] = field(repr=False)  # each -> uint8 H,W,C at size x size
    direction: str = "AtoB"
    size: int = 256
    batch_size: int = 1

    def __len__(self) -> int:
        return len(self.files)

    def __iter__(self) -> Iterator[np.ndarray]:
        from fastp2p.inference import to_model_input

        for i in range(0, len(self.loaders), self.batch_size):
            arr = np.stack([load() for load in self.loaders[i:i + self.batch_size]])
            yield to_model_input(torch.from_numpy(arr)).numpy()

    @property
    def files_sha256(self) -> str:
        """sha256 over one line per file: its name relative to the folder and the sha256 of its bytes."""
        h = hashlib.sha256()
        for rel in self.files:
            h.update(f"{rel}\t{file_hash(self.folder / rel)}\n".encode())
        return h.hexdigest()

    @property
    def info(self) -> dict:
        return {"calib": str(self.folder), "calib_images": len(self), "calib_files_sha256": self.files_sha256,
                "calib_direction": self.direction, "calib_size": self.size}


def _spread(items: list, n: int | None) -> list:
    """``n`` items evenly spaced over ``items`` (all of them when ``n`` is None or larger): a calibration set that
    covers a folder sorted by scene or date, and is the same on every run."""
    if n is None or n >= len(items):
        return list(items)
    idx = np.unique(np.linspace(0, len(items) - 1, n).round().astype(int))
    return [items[i] for i in idx]


def calibration_sources(data_dir: str | Path, n_images: int | None = DEFAULT_CALIB_IMAGES, *, flag: str = "--calib",
                        max_pixels: int | None = None, direction: str = "AtoB"):
    """(folder, [(relative file name, load(direction, size, nc) -> uint8 H,W,C)]) for the calibration images of
    ``data_dir``: a folder of images, or of ``A/`` + ``B/``, or a dataset root with ``val/`` (else ``test/``).
    At most ``n_images``, evenly spaced over the sorted files; the names are of the files the sources come from
    (``B/...`` for BtoA in an A/B folder). A missing, empty or image-less folder is one ``UserError`` naming
    ``flag``; headers are read here, so an unreadable image is a ``DataError`` naming it."""
    from fastp2p import scoring

    if n_images is not None and n_images < 1:
        raise UserError(f"{flag}_images {n_images}: give at least 1 calibration image")
    root = Path(data_dir).expanduser()
    if not root.exists():
        raise UserError(f"{flag} {root}: no such folder; {CALIB_HINT}")
    if not root.is_dir():
        raise UserError(f"{flag} {root}: not a folder; {CALIB_HINT}")
    try:
        folder = scoring.resolve_split(root, flag)
    except DataError:
        raise UserError(f"{flag} {root}: holds no .png/.jpg/.jpeg images (nor a val/ or test/ folder of them); "
                        f"{CALIB_HINT}") from None
    images = scoring._images_in(folder)
    if not images and (folder / "A").is_dir() and (folder / "B").is_dir():
        try:
            _, pairs = scoring.folder_pairs(folder, None, flag, max_pixels)
        except DataError as e:
            if "holds no" not in e.problem:
                raise
            raise UserError(f"{flag} {folder}: A/ holds no .png/.jpg/.jpeg images; {CALIB_HINT}") from None
        chosen = _spread(pairs, n_images)
        side = "B" if direction == "BtoA" else "A"
        names = {f.stem: f"{side}/{f.name}" for f in scoring._images_in(folder / side)}

        def pair_loader(p):
            return lambda direction, size, nc: p.load(direction, size, nc, nc)[0]

        return folder, [(names[Path(p.path).stem], pair_loader(p)) for p in chosen]
    if not images:
        raise UserError(f"{flag} {folder}: holds no .png/.jpg/.jpeg images; {CALIB_HINT}")
    out = []
    for p in _spread(images, n_images):
        w, h = scoring._probe(p, max_pixels)
        if scoring.is_aligned_pair(w, h):  # translate's --layout auto: the source half of an A|B pair
            load = scoring._aligned_loader(p, max_pixels)
            out.append((p.name, lambda direction, size, nc, load=load: load(direction, size, nc, nc)[0]))
        else:  # a plain image is a source as it is
            out.append((p.name, lambda direction, size, nc, p=p: scoring._prep(
                scoring.load_rgb(p, max_pixels), size, nc)))
    return folder, out


def calibration_batches(data_dir: str | Path, meta_or_preprocessing: dict,
                        n_images: int | None = DEFAULT_CALIB_IMAGES, *, batch_size: int = 1, flag: str = "--calib",
                        max_pixels: int | None = None) -> CalibrationSet:
    """The calibration images of ``data_dir`` (see ``calibration_sources``) as the model sees them: direction,
    crop size and channels from ``meta_or_preprocessing`` (an export's fastp2p metadata, ``read_onnx_meta``, or a
    checkpoint's ``preprocessing`` dict)."""
    pre = meta_or_preprocessing.get("preprocessing", meta_or_preprocessing)
    arch = meta_or_preprocessing.get("arch", {})
    direction = pre.get("direction", "AtoB")
    size = int(pre["crop_size"])
    nc = int(arch.get("input_nc", pre.get("input_nc", 3)))
    folder, sources = calibration_sources(data_dir, n_images, flag=flag, max_pixels=max_pixels, direction=direction)
    loaders = [lambda load=load: load(direction, size, nc) for _, load in sources]
    return CalibrationSet(folder, [rel for rel, _ in sources], loaders, direction, size, batch_size)


# ---------------------------------------------------------------------------------------------------------------------
# quantization
# ---------------------------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _quiet_quantizer():
    """``quantize_static`` warns on the root logger ("consider pre-processing": it changes nothing in our graphs, see
    the module doc) and the histogram calibrators print progress on stdout; both are kept for ``-v`` only."""
    if log.isEnabledFor(logging.DEBUG):
        yield
        return
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        logging.disable(previous)


class _Reader:
    """``onnxruntime.quantization.CalibrationDataReader`` over float32 N,C,H,W batches; counts the images and checks
    every batch against the export's input (a wrong shape would otherwise fail deep inside ONNX Runtime)."""

    def __init__(self, batches: Iterable, input_name: str, shape: list, where: Path):
        self.it = iter(batches)
        self.input_name, self.shape, self.where = input_name, shape, where
        self.images = 0

    def get_next(self):
        x = next(self.it, None)
        if x is None:
            return None
        x = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
        x = np.ascontiguousarray(x, dtype=np.float32)
        C, H, W = self.shape[1:]
        if x.ndim != 4 or x.shape[1] != C or any(isinstance(d, int) and d != s for d, s in zip((H, W), x.shape[2:],
                                                                                               strict=True)):
            raise UserError(f"calibration batch of shape {x.shape}: {self.where} takes N,{C},{H},{W} float32")
        self.images += x.shape[0]
        return {self.input_name: x}

    def __iter__(self):  # CalibrationDataReader's protocol also allows iteration
        while (item := self.get_next()) is not None:
            yield item


def quantize_onnx(fp32_onnx: str | Path, out: str | Path, calib: Iterable, *, method: str = DEFAULT_METHOD,
                  per_channel: bool = True, overwrite: bool = False, meta_extra: dict | None = None,
                  symmetric: bool = True, exclude_op_types: Iterable[str] = ()) -> Path:
    """Quantize the fp32 export ``fp32_onnx`` to int8 QDQ at ``out`` and return ``out``.

    ``calib``: float32 N,C,H,W batches in [-1, 1] (numpy or torch), e.g. a ``calibration_batches`` set, whose
    ``info`` is recorded. ``method``: activation ranges from min/max, entropy (KL) or a percentile of histograms
    (the latter two keep every calibration tensor in memory: 54 MB per 256x256 image for unet_256).
    ``symmetric``: signed int8 activations with zero point 0 (TensorRT needs it; see the module doc); False gives
    asymmetric uint8 activations (ONNX Runtime's recommendation for its own x86 kernels; TensorRT refuses them).
    ``exclude_op_types``: ONNX op types left in float. ``meta_extra`` entries are added to the metadata's
    ``quantization`` entry (and win over the ones computed here). An existing ``out`` is replaced only
    if fastp2p wrote it, or with ``overwrite``; never ``fp32_onnx``."""
    q = require_quantization()
    onnx = require_onnx()
    import onnxruntime as ort

    src, out = Path(fp32_onnx), Path(out)
    meta = read_onnx_meta(src)
    if meta.get("precision", "fp32") != "fp32":
        raise UserError(f"{src}: a {meta['precision']} export; INT8 quantization starts from an fp32 export "
                        "(`fastp2p export --precision fp32`)")
    if method not in METHODS:
        raise UserError(f"--calib_method {method!r}: choose one of {', '.join(METHODS)}")
    if out.suffix != ".onnx":
        raise UserError(f"-o {out}: an ONNX export must be named *.onnx")
    check_onnx_output(out, inputs=[src], overwrite=overwrite)
    proto = onnx.load(str(src), load_external_data=False)
    excluded = set(exclude_op_types)
    nodes_to_exclude = [n.name for n in proto.graph.node if n.op_type in excluded]
    external = any(t.external_data for t in proto.graph.initializer)
    reader = _Reader(calib, meta["input"]["name"], meta["input"]["shape"], src)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="fastp2p-quantize-") as work:
        tmp = Path(work) / "int8.onnx"
        try:
            with _quiet_quantizer():
                q.quantize_static(
                    str(src), str(tmp), reader, quant_format=q.QuantFormat.QDQ, per_channel=per_channel,
                    activation_type=q.QuantType.QInt8 if symmetric else q.QuantType.QUInt8,
                    weight_type=q.QuantType.QInt8,
                    calibrate_method=getattr(q.CalibrationMethod, _ORT_METHODS[method]),
                    nodes_to_exclude=nodes_to_exclude, use_external_data_format=external,
                    # float biases: TensorRT refuses an int32 DequantizeLinear ("only activation types allowed as
                    # input to this layer", onnx/onnx-tensorrt#850); OpenVINO folds them either way
                    extra_options={"ActivationSymmetric": bool(symmetric), "WeightSymmetric": True,
                                   "QuantizeBias": False})
        except UserError:
            raise
        except ValueError as e:  # "No data is collected." for an empty calibration iterable
            if reader.images == 0:
                raise UserError("--calib: no calibration images were read; give a folder of source images") from None
            raise UserError(f"{src}: INT8 calibration failed ({first_line(e, 300)})") from None
        if reader.images == 0:
            raise UserError("--calib: no calibration images were read; give a folder of source images")
        qproto = onnx.load(str(tmp), load_external_data=True)
    quant_s = time.perf_counter() - t0
    qmeta = dict(meta)  # the export's metadata, then what quantization changed
    record = {"tool": TOOL, "onnxruntime": ort.__version__, "format": "QDQ", "method": method,
              "per_channel": bool(per_channel), "weights": "int8 symmetric" + (" per-channel" if per_channel else ""),
              "activations": "int8 symmetric per-tensor" if symmetric else "uint8 asymmetric per-tensor",
              "excluded_op_types": sorted(excluded), "source_onnx": src.name, "source_onnx_sha256": file_hash(src),
              "quantize_s": round(quant_s, 1), **getattr(calib, "info", {}), **(meta_extra or {})}
    record["calib_images"] = reader.images  # what was really read, whatever the set claimed
    qmeta.update(precision="int8", quantization=record, version=__version__)
    _set_meta(qproto, qmeta)  # replaces ONNX Runtime's own entries ("onnx.infer") too
    qproto.producer_name, qproto.producer_version = "fastp2p", __version__
    qproto.doc_string = (proto.doc_string.replace(", fp32;", ", int8 QDQ;") if ", fp32;" in proto.doc_string
                         else proto.doc_string + " (int8 QDQ)")
    large = external and qproto.ByteSize() > PROTOBUF_LIMIT  # an int8 graph is ~1/4 of its fp32 source
    with outputs.writing(out, "-o"):
        save_onnx(qproto, out, large=large)
    log.debug("quantized %s -> %s (%s, %d calibration images) in %.1f s", src, out, method, reader.images, quant_s)
    return out


# ---------------------------------------------------------------------------------------------------------------------
# checks
# ---------------------------------------------------------------------------------------------------------------------
def qdq_summary(path_or_proto) -> dict:
    """What an int8 file's Q/DQ nodes are: {"quantize", "dequantize": counts, "per_channel_weights": int8 weight
    tensors with one scale per channel, "asymmetric": tensors whose zero point is unsigned or not 0,
    "quantized_bias": int32 tensors behind a DequantizeLinear}; the last two are what TensorRT refuses."""
    onnx = require_onnx()
    from onnx import numpy_helper

    proto = path_or_proto if not isinstance(path_or_proto, str | Path) else onnx.load(str(path_or_proto),
                                                                                     load_external_data=False)
    inits = {t.name: t for t in proto.graph.initializer}
    out = {"quantize": 0, "dequantize": 0, "per_channel_weights": 0, "asymmetric": [], "quantized_bias": []}
    for n in proto.graph.node:
        if n.op_type not in ("QuantizeLinear", "DequantizeLinear"):
            continue
        out["quantize" if n.op_type == "QuantizeLinear" else "dequantize"] += 1
        data = inits.get(n.input[0]) if n.op_type == "DequantizeLinear" else None
        scale = inits.get(n.input[1]) if len(n.input) > 1 else None
        if data is not None and data.data_type == onnx.TensorProto.INT32:
            out["quantized_bias"].append(n.input[0])
        elif data is not None and data.data_type == onnx.TensorProto.INT8 and scale is not None \
                and len(scale.dims) == 1 and scale.dims[0] > 1:
            out["per_channel_weights"] += 1
        zp = inits.get(n.input[2]) if len(n.input) > 2 and n.input[2] else None
        if zp is not None and zp.data_type != onnx.TensorProto.INT32:
            z = numpy_helper.to_array(zp)
            if z.dtype != np.int8 or np.any(z != 0):
                out["asymmetric"].append(n.input[0])
    return out


def tensorrt_problem(path: str | Path) -> str | None:
    """Why TensorRT would refuse the int8 QDQ file at ``path`` (None when it takes it): TensorRT's explicit
    quantization is symmetric signed int8 only (zero point 0)."""
    s = qdq_summary(path)
    if not s["quantize"] and not s["dequantize"]:
        return f"{path}: says int8 but holds no QuantizeLinear/DequantizeLinear nodes; re-export it"
    if s["quantized_bias"]:
        return (f"{path}: {len(s['quantized_bias'])} bias(es) are int32 behind a DequantizeLinear (first: "
                f"{s['quantized_bias'][0]}), which TensorRT refuses (it takes float biases); re-export it with "
                "`fastp2p export --precision int8`")
    if s["asymmetric"]:
        return (f"{path}: {len(s['asymmetric'])} Q/DQ node(s) have a non-zero or unsigned zero point (first: "
                f"{s['asymmetric'][0]}), and TensorRT quantizes symmetric int8 only; re-export it with "
                "`fastp2p export --precision int8` (symmetric by default)")
    return None


"""ONNX export of the pix2pix generator, in an explicit inference mode.

    fastp2p export CKPT -o G.onnx [--mode paper|eval] [--precision fp32|fp16|bf16] [--dynamic] [--paper_dropout]

Modes (see ``fastp2p.inference``):

- ``paper``: every norm layer normalizes with the image's own statistics. Batch norm becomes ``InstanceNormalization``
  carrying the batch-norm affine (exactly what ``with_mode(G, "paper")`` computes), so a batch of N equals N single
  calls and the running statistics are never used. What the reference's users got wrong when they exported train-mode
  batch norm as ``BatchNormalization`` (running statistics) is therefore impossible here.
- ``eval``: running statistics, folded into the preceding convolution's weights and bias in float64 before export (no
  ``BatchNormalization`` node is left), no dropout.

Dropout in paper mode: the export is **deterministic by default (dropout off)**, i.e. ``translate --mode paper
--no_dropout_at_inference``. An ONNX ``Dropout`` node is the identity at inference, so a plain export would silently
drop the paper's noise; ``--paper_dropout`` instead bakes real, stochastic dropout into the graph as
``RandomUniformLike -> GreaterOrEqual -> Mul`` (the mask of ``nn.Dropout(0.5)``: keep with probability 1/2, scale by
2), which ONNX Runtime and TensorRT both run, drawing a new mask on every call. The chosen behaviour is recorded in
the metadata (``fastp2p.dropout``: ``off`` or ``on``).

Precision: ``fp32``; ``fp16``; ``bf16`` (needs opset 22, where ONNX's Conv first takes bfloat16, chosen
automatically; ONNX Runtime's CPU provider has no bfloat16 Conv, so bf16 files are for TensorRT). Low precision casts
weights and activations but keeps the graph's input and output float32 (the casts are inside the graph) and computes
the per-image normalization statistics in float32, as autocast does (a variance over 128 x 128 pixels in fp16 loses
low-contrast images). Under TensorRT's strongly typed mode these types *are* the engine's precision.

Shapes: the batch dimension is always dynamic; ``--dynamic`` also makes H and W dynamic (multiples of 2^num_downs, the
U-Net's total stride), otherwise they are fixed at the checkpoint's ``crop_size``.

Metadata (``metadata_props``, prefixed ``fastp2p.``): format, version, mode, dropout, precision, preprocessing (sizes,
direction, normalization), architecture, input/output layout, the source checkpoint's file name and sha256. The file
is self-contained unless the weights pass 2 GB, where ONNX's protobuf limit forces an external ``.data`` file beside
it.

The exporter is ``torch.onnx.export(dynamo=True)`` (the torch.export-based one, default since torch 2.9; it needs
``onnxscript``) which gives a clean graph (Conv, ConvTranspose, LeakyRelu, Relu, Concat, InstanceNormalization, Tanh
and nothing else); without onnxscript the legacy TorchScript exporter is used (it leaves a few Identity nodes that
every runtime removes).
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from fastp2p import __version__, outputs
from fastp2p.checkpoint import atomic_write
from fastp2p.config import Config, DataConfig, ModelConfig
from fastp2p.errors import UserError
from fastp2p.inference import MODES, PerSampleBatchNorm, with_mode
from fastp2p.models.unet import size_problem

log = logging.getLogger("fastp2p.engines")

FORMAT = "fastp2p-onnx-1"
META_PREFIX = "fastp2p."
INPUT, OUTPUT = "input", "output"
DEFAULT_OPSET = 18
MIN_OPSET = 17
BF16_OPSET = 22  # the first opset whose Conv / ConvTranspose accept bfloat16
PRECISIONS = ("fp32", "fp16", "bf16")  # what ``export_onnx`` casts the generator to
QUANTIZED_PRECISIONS = ("int8",)  # written by engines/quantize.py from an fp32 export (static QDQ)
FILE_PRECISIONS = PRECISIONS + QUANTIZED_PRECISIONS  # what a file's fastp2p.precision may say
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
EXPORTERS = ("auto", "dynamo", "torchscript")
PROTOBUF_LIMIT = 2**31 - 2**20  # a little under protobuf's 2 GiB, for the graph itself
MAX_BATCH = 4096
# metadata values stored as JSON (the others are plain strings)
_JSON_KEYS = {"preprocessing", "arch", "input", "output", "dynamic_hw", "size_multiple", "opset",
              "quantization",  # engines/quantize.py: tool, method, calibration set of an int8 file
              "quality_gate"}  # the scores of the quality gate run on a lossy export


def require_onnx():
    try:
        import onnx
    except ImportError:
        raise UserError("ONNX export needs the onnx package: pip install 'fastp2p[onnx]'") from None
    return onnx


# ---------------------------------------------------------------------------------------------------------------------
# sources: a fastp2p checkpoint or a reference .pth
# ---------------------------------------------------------------------------------------------------------------------
@dataclass
class Source:
    """A generator with what an engine must remember about it."""

    G: nn.Module
    preprocessing: dict
    arch: dict
    checkpoint: str = ""
    sha256: str = ""

    @property
    def num_downs(self) -> int:
        return int(self.G.num_downs)

    @property
    def multiple(self) -> int:
        return 2 ** self.num_downs


def source_from_generator(G, cfg: Config | None = None, *, checkpoint: str = "", sha256: str = "",
                          model: ModelConfig | None = None, direction: str | None = None,
                          crop_size: int | None = None) -> Source:
    """Describe ``G`` (a ``UnetGenerator``); ``cfg`` is its checkpoint's config (None for a reference .pth, described
    by ``model`` and the reference's test defaults)."""
    from fastp2p.checkpoint import preprocessing

    if cfg is None:
        m = model or ModelConfig()
        m = ModelConfig(netG=m.netG, norm=m.norm, no_dropout=m.no_dropout, ngf=G.down[0].out_channels,
                        input_nc=G.down[0].in_channels, output_nc=G.up[0].out_channels)
        # The reference's test.py: load_size = crop_size (256), no flip, AtoB unless told.
        cfg = Config(model=m, data=DataConfig(load_size=256, crop_size=256))
    pre = preprocessing(cfg)
    if direction is not None:
        pre["direction"] = direction
    if crop_size is not None:
        pre["crop_size"] = int(crop_size)
        pre["load_size"] = int(crop_size)
    pre["test_resize"] = "bicubic to crop_size x crop_size, no flip (the reference's test preprocessing)"
    why = size_problem(int(pre["crop_size"]), int(G.num_downs))
    if why:
        raise UserError(why)
    m = cfg.model
    arch = {"netG": m.netG, "num_downs": int(G.num_downs), "ngf": int(G.down[0].out_channels), "norm": m.norm,
            "use_dropout": not m.no_dropout, "input_nc": int(G.down[0].in_channels),
            "output_nc": int(G.up[0].out_channels)}
    return Source(G, pre, arch, checkpoint, sha256)


def load_source(path: str | Path, model: ModelConfig | None = None, *, direction: str | None = None,
                crop_size: int | None = None) -> Source:
    """The generator of a fastp2p ``.safetensors`` checkpoint or a reference ``.pth`` (described by ``model``, the
    ``--netG/--norm/--no_dropout/--ngf`` flags)."""
    from fastp2p.checkpoint import file_hash, load_generator

    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint not found: {path}")
    if path.suffix not in (".safetensors", ".pth", ".pt"):
        raise UserError(f"{path}: expected a fastp2p .safetensors checkpoint or a reference .pth")
    G, cfg = load_generator(path, model)
    return source_from_generator(G, cfg, checkpoint=path.name, sha256=file_hash(path), model=model,
                                 direction=direction, crop_size=crop_size)


# ---------------------------------------------------------------------------------------------------------------------
# the module that gets exported
# ---------------------------------------------------------------------------------------------------------------------
class MaskDropout(nn.Module):
    """``nn.Dropout(p)`` in training mode written with a uniform draw, so that it exports as RandomUniformLike ->
    GreaterOrEqual -> Mul and stays stochastic in ONNX Runtime and TensorRT (an ONNX Dropout is the identity there)."""

    def __init__(self, p: float):
        super().__init__()
        self.p = float(p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        keep = (torch.rand_like(x) >= self.p).to(x.dtype)
        return x * keep * (1.0 / (1.0 - self.p))


class Fp32InstanceNorm(nn.Module):
    """Per-image normalization (optionally with an affine) computed in float32 for a low-precision graph."""

    def __init__(self, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float):
        super().__init__()
        self.register_buffer("weight", None if weight is None else weight.detach().float().clone())
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.instance_norm(x.float(), weight=self.weight, bias=self.bias, use_input_stats=True,
                               eps=self.eps).to(x.dtype)

    def _apply(self, fn, recurse=True):  # keep the float32 parameters when the model is cast to fp16/bf16
        weight, bias = self.weight, self.bias
        out = super()._apply(fn, recurse)
        if weight is not None:
            self.weight = fn(weight).float()
        if bias is not None:
            self.bias = fn(bias).float()
        return out


class ExportModule(nn.Module):
    """float32 NCHW in [-1, 1] -> float32 NCHW in [-1, 1]; inside, the generator in ``dtype``."""

    def __init__(self, G: nn.Module, dtype: torch.dtype):
        super().__init__()
        self.G = G
        self.dtype = dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.dtype == torch.float32:
            return self.G(x)
        return self.G(x.to(self.dtype)).float()


def fold_batchnorm(G: nn.Module) -> nn.Module:
    """Fold every eval-mode ``BatchNorm2d`` of a ``UnetGenerator`` into the (transposed) convolution before it, in
    float64: y = (conv(x) + b - mean) * g / sqrt(var + eps) + beta. In place; returns ``G``."""
    for convs, norms in ((G.down, G.down_norm), (G.up, G.up_norm)):
        for i in range(len(convs)):
            conv, bn = convs[i], norms[i]
            if not isinstance(bn, nn.BatchNorm2d):
                continue
            if bn.running_mean is None:
                raise ValueError("cannot fold a batch norm without running statistics")
            with torch.no_grad():
                scale = bn.weight.double() / torch.sqrt(bn.running_var.double() + bn.eps)
                shift = bn.bias.double() - bn.running_mean.double() * scale
                w = conv.weight.double()
                transposed = isinstance(conv, nn.ConvTranspose2d)
                w = w * (scale.view(1, -1, 1, 1) if transposed else scale.view(-1, 1, 1, 1))
                b = conv.bias.double() * scale + shift if conv.bias is not None else shift
                kind = nn.ConvTranspose2d if transposed else nn.Conv2d
                new = kind(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                           bias=True)
                new.weight.copy_(w.to(conv.weight.dtype))
                new.bias.copy_(b.to(conv.weight.dtype))
            convs[i] = new.to(conv.weight.device).requires_grad_(False)
            norms[i] = nn.Identity()
    return G


def export_module(G: nn.Module, mode: str, *, dropout: bool = False, precision: str = "fp32") -> nn.Module:
    """The module ``export_onnx`` traces: ``G`` set up for ``mode`` (a copy; ``G`` is not touched)."""
    if mode not in MODES:
        raise UserError(f"--mode {mode!r}: choose one of {', '.join(MODES)}")
    if precision not in PRECISIONS:
        raise UserError(f"--precision {precision!r}: choose one of {', '.join(PRECISIONS)}")
    if mode == "eval" and dropout:
        raise UserError("--paper_dropout: eval mode has no dropout; use --mode paper")
    M = with_mode(G, mode, dropout=dropout).float().cpu()  # with_mode copies: G itself is left as it is
    if mode == "eval":
        fold_batchnorm(M)
    dtype = DTYPES[precision]
    for parent in list(M.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Dropout):  # left by with_mode in eval mode (inactive) and in paper mode + dropout
                setattr(parent, name, MaskDropout(child.p) if mode == "paper" else nn.Identity())
            elif dtype != torch.float32 and isinstance(child, PerSampleBatchNorm):
                setattr(parent, name, Fp32InstanceNorm(child.weight, child.bias, child.eps))
            elif dtype != torch.float32 and isinstance(child, nn.InstanceNorm2d):
                if child.track_running_stats:
                    raise ValueError("instance norm with running statistics is not a pix2pix layer")
                setattr(parent, name, Fp32InstanceNorm(child.weight if child.affine else None,
                                                       child.bias if child.affine else None, child.eps))
    M = M.eval().requires_grad_(False).to(dtype)  # eval(): nothing left depends on it; MaskDropout always draws
    return ExportModule(M, dtype).eval()


# ---------------------------------------------------------------------------------------------------------------------
# export
# ---------------------------------------------------------------------------------------------------------------------
def _have_onnxscript() -> bool:
    try:
        import onnxscript  # noqa: F401
    except ImportError:
        return False
    return True


@contextlib.contextmanager
def _quiet_exporter():
    """The exporters talk a lot (progress lines on stdout, INFO logs of the graph passes, deprecation and tracer
    warnings); all of it is kept for ``-v`` (debug logging) only."""
    if log.isEnabledFor(logging.DEBUG):
        yield
        return
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    sink = io.StringIO()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with contextlib.redirect_stdout(sink):
                yield
    finally:
        logging.disable(previous)


def _trace_onnx(M: nn.Module, example: torch.Tensor, *, dynamic: bool, multiple: int, opset: int, exporter: str,
                large: bool, workdir: Path):
    """ONNX ModelProto of ``M`` (weights in memory)."""
    onnx = require_onnx()
    if exporter == "auto":
        exporter = "dynamo" if _have_onnxscript() else "torchscript"
    if exporter == "dynamo":
        if not _have_onnxscript():
            raise UserError("--exporter dynamo needs onnxscript: pip install 'fastp2p[onnx]'")
        batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
        shapes = {0: batch}
        if dynamic:
            shapes[2] = multiple * torch.export.Dim("h_blocks", min=1, max=64)
            shapes[3] = multiple * torch.export.Dim("w_blocks", min=1, max=64)
        with _quiet_exporter():
            prog = torch.onnx.export(M, (example,), None, dynamo=True, opset_version=opset, input_names=[INPUT],
                                     output_names=[OUTPUT], dynamic_shapes=({**shapes},), verbose=False,
                                     optimize=True)
        if not large:
            return prog.model_proto, exporter
        path = workdir / "model.onnx"
        prog.save(str(path), external_data=True)
        return onnx.load(str(path), load_external_data=True), exporter
    if exporter != "torchscript":
        raise UserError(f"--exporter {exporter!r}: choose one of {', '.join(EXPORTERS)}")
    axes = {0: "batch"}
    if dynamic:
        axes.update({2: "height", 3: "width"})
    target = workdir / "model.onnx" if large else io.BytesIO()
    with _quiet_exporter():
        torch.onnx.export(M, (example,), target if isinstance(target, io.BytesIO) else str(target), dynamo=False,
                          opset_version=opset, input_names=[INPUT], output_names=[OUTPUT],
                          dynamic_axes={INPUT: axes, OUTPUT: axes}, do_constant_folding=True)
    if isinstance(target, io.BytesIO):
        return onnx.load_from_string(target.getvalue()), exporter
    return onnx.load(str(target), load_external_data=True), exporter


def _set_meta(proto, meta: dict) -> None:
    del proto.metadata_props[:]
    _set_meta_entries(proto, meta)


def _set_meta_entries(proto, meta: dict) -> None:
    for k, v in meta.items():
        entry = proto.metadata_props.add()
        entry.key = META_PREFIX + k
        entry.value = json.dumps(v) if k in _JSON_KEYS else str(v)


def meta_from_proto(proto, where: str | Path = "ONNX file") -> dict:
    """The ``fastp2p.*`` entries of ``proto``'s metadata; a JSON value that does not parse is a ``UserError`` naming
    ``where`` (the file) and the key."""
    out = {}
    for entry in proto.metadata_props:
        if not entry.key.startswith(META_PREFIX):
            continue
        k = entry.key[len(META_PREFIX):]
        if k in _JSON_KEYS:
            try:
                out[k] = json.loads(entry.value)
            except ValueError as e:  # json.JSONDecodeError
                raise UserError(f"{where}: corrupt {entry.key} metadata (not JSON: {getattr(e, 'msg', e)}); "
                                "re-export it with `fastp2p export`") from None
        else:
            out[k] = entry.value
    return out


def _count(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 1


def check_meta(meta: dict, where: str | Path, prefix: str = META_PREFIX, fix: str = "re-export it with `fastp2p "
               "export`") -> dict:
    """``meta`` has every entry the engines read, of the right type; else a ``UserError`` naming ``where`` and the
    first bad key (``prefix`` + key, as the file spells it) and saying how to get a good file (``fix``)."""
    def bad(key: str, why: str):
        raise UserError(f"{where}: {prefix}{key} metadata {why}; {fix}")

    if meta.get("mode") not in MODES:
        bad("mode", f"is {meta.get('mode')!r}, not one of {', '.join(MODES)}")
    if "precision" in meta and meta["precision"] not in FILE_PRECISIONS:  # absent: an early export, fp32
        bad("precision", f"is {meta['precision']!r}, not one of {', '.join(FILE_PRECISIONS)}")
    pre = meta.get("preprocessing")
    if not isinstance(pre, dict) or not _count(pre.get("crop_size")):
        bad("preprocessing", "is missing or has no positive crop_size")
    arch = meta.get("arch")
    if not isinstance(arch, dict) or not all(_count(arch.get(k)) for k in ("input_nc", "output_nc", "num_downs")):
        bad("arch", "is missing or lacks input_nc / output_nc / num_downs")
    if not _count(meta.get("size_multiple")):
        bad("size_multiple", "is missing or not a positive whole number")
    inp = meta.get("input")
    if not isinstance(inp, dict) or not isinstance(inp.get("name"), str) or not isinstance(inp.get("shape"), list) \
            or len(inp["shape"]) != 4:
        bad("input", "is missing or lacks its name / 4-d shape")
    return meta


def update_onnx_meta(path: str | Path, **entries) -> dict:
    """Set (or, with a value of None, remove) ``fastp2p.<key>`` metadata entries of the ONNX file at ``path`` and
    rewrite it atomically; the graph, the other entries and any external weights file are left as they are. Keys in
    ``_JSON_KEYS`` take JSON values, the others strings. Returns the file's fastp2p metadata afterwards. How the
    quality gate records its scores in an int8 export (``update_onnx_meta(p, quality_gate={...})``)."""
    path = Path(path)
    proto = _load_proto(path)
    for k, v in entries.items():
        if k not in _JSON_KEYS and not isinstance(v, str | type(None)):
            raise ValueError(f"fastp2p.{k}: a {type(v).__name__} needs a JSON key (engines/onnx.py _JSON_KEYS)")
    keep = [e for e in proto.metadata_props if e.key[len(META_PREFIX):] not in entries
            or not e.key.startswith(META_PREFIX)]
    del proto.metadata_props[:]
    proto.metadata_props.extend(keep)
    _set_meta_entries(proto, {k: v for k, v in entries.items() if v is not None})
    data = proto.SerializeToString()  # external weights are not loaded, so the graph alone is under 2 GB
    with outputs.writing(path, str(path)):
        atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))
    return meta_from_proto(proto, path)


def _load_proto(path: Path, hint: str = ""):
    """The ONNX model at ``path`` without its external weights; a missing or unreadable file is a ``UserError``."""
    onnx = require_onnx()
    if not path.is_file():
        raise UserError(f"ONNX file not found: {path}")
    try:
        return onnx.load(str(path), load_external_data=False)
    except Exception as e:  # protobuf's DecodeError and friends
        raise UserError(f"{path}: not a readable ONNX file ({type(e).__name__}){hint}") from None


def read_onnx_meta(path: str | Path) -> dict:
    """The ``fastp2p.*`` metadata of an exported ONNX file (without loading external weights)."""
    path = Path(path)
    proto = _load_proto(path)
    meta = meta_from_proto(proto, path)
    if meta.get("format") != FORMAT:
        raise UserError(f"{path}: not an ONNX file exported by fastp2p (no fastp2p.format metadata); "
                        "export it with `fastp2p export`")
    return check_meta(meta, path)


def _value_info(v) -> dict:
    t = v.type.tensor_type
    dims = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in t.shape.dim]
    onnx = require_onnx()
    return {"name": v.name, "shape": dims,
            "dtype": onnx.TensorProto.DataType.Name(t.elem_type).lower() if t.elem_type else None}


def describe_onnx(path: str | Path) -> dict:
    """What ``fastp2p info`` prints for any ONNX file: graph inputs/outputs (name, shape, dtype), opsets, producer,
    file size, and its ``fastp2p`` metadata (None for a file fastp2p did not export). External weights are not
    loaded. An unreadable file is a ``UserError`` naming it."""
    path = Path(path)
    proto = _load_proto(path, "; the file is damaged or not ONNX")
    if not proto.HasField("graph") or not proto.graph.node:  # protobuf parses an empty or cut file as a bare message
        raise UserError(f"{path}: not a readable ONNX file (no graph in it); the file is damaged or not ONNX")
    weights = {i.name for i in proto.graph.initializer}
    meta = meta_from_proto(proto, path)
    return {
        "file": str(path), "file_size": path.stat().st_size,
        "inputs": [_value_info(v) for v in proto.graph.input if v.name not in weights],
        "outputs": [_value_info(v) for v in proto.graph.output],
        "opset_import": {(o.domain or "ai.onnx"): o.version for o in proto.opset_import},
        "ir_version": proto.ir_version, "producer": f"{proto.producer_name} {proto.producer_version}".strip(),
        "graph": proto.graph.name, "nodes": len(proto.graph.node),
        "external_data": sorted({e.value for t in proto.graph.initializer for e in t.external_data
                                 if e.key == "location"}),
        "fastp2p": meta if meta.get("format") == FORMAT else None,
    }


def is_our_onnx(path: str | Path) -> bool:
    """An ONNX file fastp2p wrote (an export, or its ONNX Runtime optimization): ``fastp2p.format`` in its
    metadata (the graph is read, its external weights are not)."""
    import onnx

    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception:  # protobuf's DecodeError and friends: not an ONNX file, so not ours
        return False
    return any(p.key == META_PREFIX + "format" and p.value == FORMAT for p in proto.metadata_props)


def check_onnx_output(out: str | Path, flag: str = "-o", *, inputs=(), overwrite: bool = False,
                      kind: str = "export") -> Path:
    """``fastp2p.outputs.output_file`` for an ONNX output: an existing file is replaced only if ``is_our_onnx``
    (or ``overwrite``); never an input."""
    return outputs.output_file(out, flag, kind=kind, ours=is_our_onnx, inputs=inputs, overwrite=overwrite)


def save_onnx(proto, path: Path, *, large: bool) -> None:
    onnx = require_onnx()
    if not large:
        data = proto.SerializeToString()
        atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))
        return
    # > 2 GB: weights go to one external file beside the graph (protobuf cannot serialize more)
    path.parent.mkdir(parents=True, exist_ok=True)
    data_name = path.name + ".data"
    if (path.parent / data_name).exists():
        (path.parent / data_name).unlink()
    onnx.save_model(proto, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location=data_name,
                    size_threshold=1024)


def export_onnx(src, out: str | Path, *, mode: str = "paper", dropout: bool = False, precision: str = "fp32",
                dynamic: bool = False, opset: int | None = None, model: ModelConfig | None = None,
                direction: str | None = None, crop_size: int | None = None, exporter: str = "auto",
                check: bool = True, overwrite: bool = False) -> Path:
    """Export the generator of ``src`` (a checkpoint path or a ``Source``) to ``out`` and return ``out``.

    ``dropout`` only applies to paper mode: False (default) exports deterministic paper mode, True bakes stochastic
    dropout into the graph. Raises ``UserError`` for bad arguments; the file is written atomically. An existing
    ``out`` is replaced only if fastp2p wrote it (``is_our_onnx``) or with ``overwrite``; never ``src``."""
    onnx = require_onnx()
    if precision not in PRECISIONS:
        raise UserError(f"--precision {precision!r}: choose one of {', '.join(PRECISIONS)}")
    if opset is None:
        opset = BF16_OPSET if precision == "bf16" else DEFAULT_OPSET
    if opset < MIN_OPSET:
        raise UserError(f"--opset {opset}: fastp2p exports opset {MIN_OPSET} or newer")
    newest = onnx.defs.onnx_opset_version()
    if opset > newest:
        raise UserError(f"--opset {opset}: the installed onnx {onnx.__version__} knows opsets up to {newest}; "
                        f"choose {MIN_OPSET}..{newest}")
    if precision == "bf16" and opset < BF16_OPSET:
        raise UserError(f"--opset {opset}: bf16 convolutions need opset {BF16_OPSET} or newer (ONNX Conv has no "
                        "bfloat16 before it)")
    source = src if isinstance(src, Source) else load_source(src, model, direction=direction, crop_size=crop_size)
    out = Path(out)
    if out.suffix != ".onnx":
        raise UserError(f"-o {out}: an ONNX export must be named *.onnx")
    inputs = [None if isinstance(src, Source) else src]
    ours = is_our_onnx(out)  # an earlier export owns the external weights file beside it too
    check_onnx_output(out, inputs=inputs, overwrite=overwrite)
    t0 = time.perf_counter()
    M = export_module(source.G, mode, dropout=dropout, precision=precision)
    multiple, C = source.multiple, source.arch["input_nc"]
    crop = int(source.preprocessing["crop_size"])
    # Trace at batch 2 and at least 2 x the U-Net's stride so no dimension is specialized as 0/1.
    side = crop if (not dynamic or crop >= 2 * multiple) else 2 * multiple
    example = torch.rand(2, C, side, side) * 2 - 1
    n_bytes = sum(p.numel() * p.element_size() for p in M.state_dict().values())
    large = n_bytes > PROTOBUF_LIMIT
    if large:
        outputs.output_file(out.with_name(out.name + ".data"), "-o", kind="export", inputs=inputs,
                            ours=lambda p: ours, overwrite=overwrite)
    with tempfile.TemporaryDirectory(prefix="fastp2p-export-") as work:
        proto, used = _trace_onnx(M, example, dynamic=dynamic, multiple=multiple, opset=opset, exporter=exporter,
                                  large=large, workdir=Path(work))
    got = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)
    if got != opset:  # torch's exporter falls back to its own opset when it cannot convert, with only a log line
        raise UserError(f"--opset {opset}: torch {torch.__version__}'s {used} exporter produced opset {got} instead; "
                        f"choose an opset it supports (e.g. the default {DEFAULT_OPSET})")
    spatial = ["H", "W"] if dynamic else [crop, crop]
    meta = {
        "format": FORMAT,
        "version": __version__,
        "mode": mode,
        "dropout": "on" if (mode == "paper" and dropout) else "off",
        "precision": precision,
        "preprocessing": source.preprocessing,
        "arch": source.arch,
        "input": {"name": INPUT, "shape": ["N", C, *spatial], "dtype": "float32", "layout": "NCHW",
                  "range": [-1, 1]},
        "output": {"name": OUTPUT, "shape": ["N", source.arch["output_nc"], *spatial], "dtype": "float32",
                   "layout": "NCHW", "range": [-1, 1]},
        "dynamic_hw": bool(dynamic),
        "size_multiple": multiple,
        "opset": opset,
        "checkpoint": source.checkpoint,
        "checkpoint_sha256": source.sha256,
        "exporter": f"torch {torch.__version__} ({used})",
    }
    _set_meta(proto, meta)
    proto.producer_name, proto.producer_version = "fastp2p", __version__
    proto.doc_string = (f"pix2pix U-Net generator ({source.arch['netG']}), {mode} mode"
                        f"{', dropout on' if meta['dropout'] == 'on' else ''}, {precision}; "
                        "input and output float32 NCHW in [-1, 1]")
    proto.graph.name = "fastp2p_generator"
    if check:
        if large:
            with outputs.writing(out, "-o"):
                save_onnx(proto, out, large=True)
            onnx.checker.check_model(str(out), full_check=True)
        else:
            onnx.checker.check_model(proto, full_check=True)
    if not (check and large):
        with outputs.writing(out, "-o"):
            save_onnx(proto, out, large=large)
    log.debug("exported %s (%s mode, %s, %s) in %.1f s", out, mode, precision, "dynamic N,H,W" if dynamic
             else "dynamic N", time.perf_counter() - t0)
    return out

"""The generator on OpenVINO (CPU): an exported ``.onnx``, or the OpenVINO IR (``G.xml`` + ``G.bin``) that
``fastp2p build-engine --backend openvino`` writes from one, compiled by OpenVINO's CPU plugin.

The compiled model is cached on disk (OpenVINO's ``CACHE_DIR``: ``$FASTP2P_OPENVINO_CACHE``, else
``$XDG_CACHE_HOME/fastp2p/openvino``, else ``~/.cache/fastp2p/openvino``), so a second open skips the compile. The
file is handed to ``compile_model`` by path, so a cache hit skips reading the model too: unet_256 (ngf 64, 218 MB)
opens in 0.05 s from the cache, 0.6 s through a read ``ov.Model`` (hashed in memory), 1.6 s cold (2-core EPYC,
OpenVINO 2026.4). OpenVINO keys the cache by the file's contents and the precision, not its path or time stamp (a
re-export under the same name and mtime recompiles), nor by the threads or the hint (those apply at import). Each
cached blob is about the size of the weights.

The precision hint is fp32 unless told (or, for an IR, what its build recorded): OpenVINO otherwise runs bf16 on its
own on CPUs with AMX-BF16, which changes the outputs; ``bf16`` is taken only where the CPU has it. An INT8 QDQ file runs
its quantized convolutions in int8 (VNNI) under either hint. Threads: one per core this process may run on (as ONNX
Runtime). ``hint="latency"``: one stream, for batch 1; ``"throughput"``: several streams, a batch is split across as
many infer requests as OpenVINO suggests. The batch dimension of our exports is always dynamic (engines/onnx.py), so
any batch size runs.

The IR keeps the export's fastp2p metadata in its ``<rt_info><fastp2p>`` section (``model.set_rt_info``), the same
key/value strings as the ``.onnx``'s ``metadata_props`` with ``format`` = ``IR_FORMAT``, plus what the build chose
(``openvino_precision``, ``openvino_hint``), the source ``onnx`` and its sha256, and the OpenVINO version. In the file,
not in a JSON sidecar as for a TensorRT plan: an IR is an open XML format with room for it (a plan is opaque bytes), so
the ``.xml`` stays self-describing when it is copied with its ``.bin``, and ``read_ir_meta`` reads it with the standard
library's XML parser, without OpenVINO (``fastp2p info``, the output checks).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import logging
import os
import tempfile
import time
import types
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import torch

from fastp2p import __version__, outputs
from fastp2p.errors import UserError, first_line

from .onnx import check_meta, meta_from_proto, read_onnx_meta
from .onnxruntime import cpu_threads

log = logging.getLogger("fastp2p.engines")

PRECISIONS = ("fp32", "bf16")
HINTS = ("latency", "throughput")
IR_FORMAT = "fastp2p-openvino-ir-1"  # ``format`` in an IR's <rt_info><fastp2p> section
IR_SUFFIXES = (".xml",)
RT_SECTION = "fastp2p"
_XML_LIMIT = 64 << 20  # an IR's .xml holds the graph only (unet_256: 35 kB); a bigger .xml is not one of ours
KIND = "build-engine"  # the fastp2p.outputs kind of the files build_ir writes


def require_openvino():
    try:
        import openvino as ov
    except ImportError:
        raise UserError("the OpenVINO backend needs openvino: pip install 'fastp2p[openvino]'") from None
    return ov


def openvino_installed() -> str | None:
    """The installed openvino's version (e.g. "2026.4.1"), or None; found without importing it."""
    if importlib.util.find_spec("openvino") is None:
        return None
    try:
        return importlib.metadata.version("openvino")
    except importlib.metadata.PackageNotFoundError:  # importable but not from a wheel (a source build)
        return "unknown version"


def default_cache_dir() -> Path:
    env = os.environ.get("FASTP2P_OPENVINO_CACHE")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base).expanduser() / "fastp2p" / "openvino"


def cpu_has_bf16(core=None) -> bool:
    if core is None:
        core = require_openvino().Core()
    return "BF16" in core.get_property("CPU", "OPTIMIZATION_CAPABILITIES")


def check_precision(precision: str, core=None) -> None:
    """``precision`` is one OpenVINO's CPU plugin runs here; else one ``UserError``."""
    if precision not in PRECISIONS:
        raise UserError(f"OpenVINO precision {precision!r}: choose one of {', '.join(PRECISIONS)}")
    if precision == "bf16" and not cpu_has_bf16(core):
        raise UserError("OpenVINO precision bf16: this CPU has no bfloat16 support (AVX512-BF16 / AMX); use fp32")


# ---------------------------------------------------------------------------------------------------------------------
# the IR: fastp2p metadata in <rt_info>, read without OpenVINO
# ---------------------------------------------------------------------------------------------------------------------
def bin_path(xml: str | Path) -> Path:
    """The weights file OpenVINO reads beside ``xml`` (same stem, ``.bin``)."""
    return Path(xml).with_suffix(".bin")


def _rt_section(path: Path) -> dict[str, str] | None:
    """The raw key -> value strings of ``path``'s ``<rt_info><fastp2p>`` section; None when the file is no XML, has
    no such section, or is too big to be an IR's graph."""
    try:
        if path.stat().st_size > _XML_LIMIT:
            return None
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        return None
    sec = root.find(f"rt_info/{RT_SECTION}")
    if root.tag != "net" or sec is None:
        return None
    return {child.tag: child.get("value", "") for child in sec}


def _decode(raw: dict[str, str], where: Path) -> dict:
    """The section's strings decoded as ``meta_from_proto`` decodes an .onnx's ``metadata_props`` (the same keys and
    encodings), so an IR's meta equals its source's but for the keys the build adds."""
    props = [types.SimpleNamespace(key=f"fastp2p.{k}", value=v) for k, v in raw.items()]
    return meta_from_proto(types.SimpleNamespace(metadata_props=props), where)


def is_our_ir(path: str | Path) -> bool:
    """An IR ``build_ir`` wrote: its .xml's fastp2p section says ``IR_FORMAT``."""
    raw = _rt_section(Path(path))
    return raw is not None and raw.get("format") == IR_FORMAT


def describe_ir(path: str | Path) -> dict:
    """What ``fastp2p info`` prints for an OpenVINO IR (no OpenVINO needed): the files, their sizes, and the fastp2p
    metadata (None for an IR fastp2p did not build)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"FILE {path}: not found")
    raw = _rt_section(path)
    b = bin_path(path)
    info = {"format": "fastp2p OpenVINO IR" if raw and raw.get("format") == IR_FORMAT
            else "OpenVINO IR (not built by fastp2p)" if raw is not None or _is_ir_xml(path)
            else "not an OpenVINO IR", "file": str(path), "file_size": path.stat().st_size,
            "weights": str(b), "weights_size": b.stat().st_size if b.is_file() else None}
    if raw is not None and raw.get("format") == IR_FORMAT:
        meta = _decode(raw, path)
        try:
            check_meta(meta, path, prefix="fastp2p.", fix="rebuild it with `fastp2p build-engine --backend openvino`")
        except UserError as e:  # printed, not refused: info is where one looks when a file is refused elsewhere
            info["metadata_problem"] = str(e)
        info.update(meta)
    elif _is_ir_xml(path):
        info["note"] = ("no fastp2p metadata (no <rt_info><fastp2p> section): mode, precision and preprocessing "
                        "unknown; build it with `fastp2p build-engine CKPT|G.onnx -o G.xml --backend openvino`")
    else:
        raise UserError(f"FILE {path}: not an OpenVINO IR (no <net> XML); give a .xml that `fastp2p build-engine "
                        "--backend openvino` wrote")
    if info["weights_size"] is None:
        info["weights_problem"] = f"{b.name} is missing beside it; OpenVINO cannot load the IR without it"
    return info


def _is_ir_xml(path: Path) -> bool:
    try:
        for _, elem in ET.iterparse(path, events=("start",)):
            return elem.tag == "net"
    except (OSError, ET.ParseError):
        return False
    return False


def read_ir_meta(path: str | Path) -> dict:
    """The fastp2p metadata of an IR ``build_ir`` wrote (the .onnx's keys, plus ``openvino_precision``,
    ``openvino_hint``, ``onnx``, ``onnx_sha256``, ``openvino_version``); else one ``UserError`` naming the file."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"OpenVINO IR not found: {path}")
    raw = _rt_section(path)
    if raw is None or raw.get("format") != IR_FORMAT:
        raise UserError(f"{path}: not an OpenVINO IR built by fastp2p (no <rt_info><fastp2p> format {IR_FORMAT}); "
                        "build it with `fastp2p build-engine CKPT|G.onnx -o G.xml --backend openvino`")
    if not bin_path(path).is_file():
        raise UserError(f"{path}: its weights {bin_path(path).name} are missing beside it; copy the .bin with the "
                        ".xml, or rebuild it with `fastp2p build-engine --backend openvino`")
    return check_meta(_decode(raw, path), path, prefix="fastp2p.",
                      fix="rebuild it with `fastp2p build-engine --backend openvino`")


def check_ir_output(xml: str | Path, *, inputs=(), overwrite: bool = False) -> Path:
    """``xml`` and its ``.bin`` may be written (``fastp2p.outputs``): replaced only if an earlier ``build_ir``'s (the
    .bin counts as ours when the .xml beside it is), or with ``overwrite``; never an input. Needs no OpenVINO."""
    xml = Path(xml)
    if xml.suffix.lower() not in IR_SUFFIXES:
        raise UserError(f"-o {xml}: an OpenVINO IR is written as G.xml (with G.bin beside it); name it *.xml")
    outputs.output_file(xml, "-o", kind=KIND, ours=is_our_ir, inputs=inputs, overwrite=overwrite)
    outputs.output_file(bin_path(xml), "-o", kind=KIND, ours=lambda p: is_our_ir(xml), inputs=inputs,
                        overwrite=overwrite)
    return xml


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def build_ir(onnx_path: str | Path, out: str | Path, *, precision: str = "fp32", hint: str = "latency",
             overwrite: bool = False, cache_dir: str | Path | None = None) -> OvGenerator:
    """An exported ``onnx_path`` -> the OpenVINO IR ``out`` (.xml + .bin, fp32 weights as in the file: no fp16
    compression), with the metadata described in the module doc; then compiled once with ``precision`` / ``hint``,
    which warms the compile cache for later opens. Both files are written to temporary names and renamed into place
    (the .bin first), so a failed build leaves any earlier IR whole. Returns the warm ``OvGenerator``."""
    ov = require_openvino()
    import onnx

    onnx_path, out = Path(onnx_path), Path(out)
    read_onnx_meta(onnx_path)  # a fastp2p export, or the one error every backend gives
    check_precision(precision)
    if hint not in HINTS:
        raise UserError(f"--ov_hint {hint!r}: choose one of {', '.join(HINTS)}")
    check_ir_output(out, inputs=[onnx_path], overwrite=overwrite)
    proto = onnx.load(str(onnx_path), load_external_data=False)
    raw = {p.key.removeprefix("fastp2p."): p.value for p in proto.metadata_props if p.key.startswith("fastp2p.")}
    del proto
    t0 = time.perf_counter()
    try:
        model = ov.Core().read_model(str(onnx_path))
    except Exception as e:  # OpenVINO raises RuntimeError with multi-line messages
        raise UserError(f"{onnx_path}: OpenVINO cannot read it ({first_line(e, 300)})") from None
    _free_batch(ov, model)
    rt = model.get_rt_info()
    if "framework" in rt:  # OpenVINO's copy of the ONNX metadata_props: the fastp2p section below replaces it
        del rt["framework"]
    raw.update(format=IR_FORMAT, onnx=onnx_path.name, onnx_sha256=_sha256(onnx_path),
               openvino_version=ov.__version__.split("-")[0], openvino_precision=precision, openvino_hint=hint,
               built_by=f"fastp2p {__version__}", created=time.strftime("%Y-%m-%dT%H:%M:%S"))
    for k, v in raw.items():
        model.set_rt_info(v, [RT_SECTION, k])
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.stem}.", suffix=".xml", dir=out.parent)
    os.close(fd)
    tmp_xml = Path(tmp)
    try:
        with outputs.writing(out, "-o"):
            ov.save_model(model, str(tmp_xml), compress_to_fp16=False)
            os.chmod(tmp_xml, bin_path(tmp_xml).stat().st_mode & 0o777)  # as OpenVINO made the .bin (the umask's)
            for p in (bin_path(tmp_xml), tmp_xml):
                with open(p, "rb") as f:
                    os.fsync(f.fileno())
            os.replace(bin_path(tmp_xml), bin_path(out))
            os.replace(tmp_xml, out)
    finally:
        for p in (tmp_xml, bin_path(tmp_xml)):
            p.unlink(missing_ok=True)
    convert_s = time.perf_counter() - t0
    gen = OvGenerator(out, precision=precision, hint=hint, cache_dir=cache_dir)  # compiles: warms the cache
    log.debug("OpenVINO IR %s: converted in %.1f s, compiled (%s, %s) in %.1f s into the cache %s", out, convert_s,
             precision, hint, gen.load_s, gen.cache_dir)
    return gen


def _free_batch(ov, model) -> None:
    """An export always declares a symbolic batch; if a converted file pinned it, free it again."""
    shape = model.input(0).get_partial_shape()
    if shape.rank.is_static and shape.rank.get_length() == 4 and not shape[0].is_dynamic:
        model.reshape({model.input(0).get_any_name(): ov.PartialShape([-1, shape[1], shape[2], shape[3]])})


# ---------------------------------------------------------------------------------------------------------------------
# run
# ---------------------------------------------------------------------------------------------------------------------
class OvGenerator:
    """``G(x)``: float NCHW in [-1, 1] (torch, CPU) -> NCHW (the model's output type), through OpenVINO.

    path: an exported .onnx or a fastp2p IR .xml. precision / hint: None -> what an IR's build recorded, else fp32 /
    latency. threads: None -> one per core this process may run on. streams: None -> OpenVINO's choice for the hint
    (given, a batch is split over one infer request per stream, as in throughput mode). ``from_cache``: whether the
    compiled model came from the on-disk cache.
    meta: the file's fastp2p metadata when the caller has read it already (it is read otherwise)."""

    backend = "openvino"

    def __init__(self, path: str | Path, *, precision: str | None = None, hint: str | None = None,
                 threads: int | None = None, streams: int | None = None, cache_dir: str | Path | None = None,
                 meta: dict | None = None):
        ov = require_openvino()
        import openvino.properties as props
        import openvino.properties.hint as hints

        self.path = Path(path)
        is_ir = self.path.suffix.lower() in IR_SUFFIXES
        # a non-fastp2p or damaged file: the same error as ONNX Runtime's
        self.onnx_meta = meta if meta is not None else read_ir_meta(self.path) if is_ir else read_onnx_meta(self.path)
        precision = precision or (self.onnx_meta.get("openvino_precision") if is_ir else None) or "fp32"
        hint = hint or (self.onnx_meta.get("openvino_hint") if is_ir else None) or "latency"
        if hint not in HINTS:
            raise UserError(f"OpenVINO hint {hint!r}: choose one of {', '.join(HINTS)}")
        for n, flag in ((threads, "--threads"), (streams, "--streams")):
            if n is not None and int(n) < 1:
                raise UserError(f"{flag} {n}: must be >= 1")
        core = ov.Core()
        check_precision(precision, core)
        self.cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        with outputs.writing(self.cache_dir, "$FASTP2P_OPENVINO_CACHE"):
            self.cache_dir.mkdir(parents=True, exist_ok=True)
        core.set_property({props.cache_dir(): str(self.cache_dir)})
        config = {hints.inference_precision(): ov.Type.bf16 if precision == "bf16" else ov.Type.f32,
                  hints.performance_mode(): (hints.PerformanceMode.LATENCY if hint == "latency"
                                             else hints.PerformanceMode.THROUGHPUT),
                  props.inference_num_threads(): int(threads or cpu_threads())}
        if streams is not None:
            config[props.num_streams()] = int(streams)
        t0 = time.perf_counter()
        try:
            batch = (self.onnx_meta.get("input") or {}).get("shape", [None])[0]
            if isinstance(batch, str):  # symbolic: compile by path, so a cache hit reads nothing (see module doc)
                self.compiled = core.compile_model(str(self.path), "CPU", config)
            else:
                model = core.read_model(str(self.path))
                _free_batch(ov, model)
                self.compiled = core.compile_model(model, "CPU", config)
        except Exception as e:  # OpenVINO raises RuntimeError with multi-line messages
            raise UserError(f"{self.path}: OpenVINO cannot compile it ({first_line(e, 300)})") from None
        self.load_s = time.perf_counter() - t0
        self.precision, self.hint = precision, hint
        self.input_dtype = torch.float16 if self.compiled.input(0).get_element_type() == ov.Type.f16 \
            else torch.float32
        # one request in latency mode (a batch runs whole); otherwise one per stream, each taking a slice of the batch
        n = 1 if hint == "latency" and streams is None else max(1, int(self.compiled.get_property(
            props.optimal_number_of_infer_requests())))
        self.requests = [self.compiled.create_infer_request() for _ in range(n)]
        self.streams = int(self.compiled.get_property(props.num_streams()))
        self.threads = int(self.compiled.get_property(props.inference_num_threads()))
        try:
            self.from_cache = bool(self.compiled.get_property("LOADED_FROM_CACHE"))
        except RuntimeError:  # an OpenVINO without the property
            self.from_cache = None
        self.device = torch.device("cpu")
        log.debug("OpenVINO %s: %s %s (%s, %s, %d stream(s), %d thread(s), %d request(s)) in %.2f s; cache %s",
                  ov.__version__, "loaded" if self.from_cache else "compiled", self.path, precision, hint,
                  self.streams, self.threads, n, self.load_s, self.cache_dir)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = x.detach().to("cpu", self.input_dtype).contiguous()
        chunks = x.chunk(min(len(self.requests), x.shape[0]))
        for req, c in zip(self.requests, chunks, strict=False):
            req.start_async({0: c.numpy()}, share_inputs=True)
        outs = []
        for req, _ in zip(self.requests, chunks, strict=False):
            req.wait()
            outs.append(torch.from_numpy(np.array(req.get_output_tensor(0).data, copy=True)))
        return outs[0] if len(outs) == 1 else torch.cat(outs)


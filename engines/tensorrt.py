"""TensorRT engines (TensorRT >= 10 Python API), in the shape of TensorRT's ``samples/python/common.py`` and Polygraphy.

Build (``build_engine``): parse the exported ONNX, logging every parser error; a *strongly typed* network, so the
precision is the one the ONNX file was exported in (``fastp2p export --precision fp32|fp16|bf16``: TensorRT 11 has no
other way, its fp16/int8 builder flags are gone); one optimization profile over the batch (and H, W when the export is
dynamic); the builder optimization level; a persistent timing cache file; a workspace limit. The serialized ``.plan``
gets a JSON sidecar ``.plan.json`` with the TensorRT version, the GPU (name, compute capability), the profile shapes,
precision, mode and preprocessing, and the source checkpoint's hash.

INT8 is explicit quantization: ``fastp2p export --precision int8 --calib DIR`` (engines/quantize.py) writes Q/DQ
nodes calibrated on real images, and the strongly typed network takes its int8 types from them, so the build is the
same as for any other precision, and so is trtexec's (``--stronglyTyped``; no ``--int8``/``--fp16``: precision flags
do not apply to a strongly typed network, and TensorRT 11 has none; implicit INT8 calibration is deprecated in
TensorRT 10.1 and gone in 11). TensorRT quantizes symmetric int8 only (zero point 0): ``check_int8_onnx`` refuses,
before the build, a QDQ file with other zero points (an asymmetric uint8 one from another tool).

Run (``TrtGenerator``): refuses, with one ``UserError``, a plan whose sidecar names another TensorRT version or GPU;
binds torch-allocated CUDA tensors with ``set_input_shape`` / ``set_tensor_address`` and runs ``execute_async_v3`` on
the current torch stream (no host copies, no synchronization); optional CUDA-graph capture per input shape.

Every TensorRT name this module uses is listed in ``TRT_API_USED``; ``fastp2p.engines.trt_api_check`` (run in CI)
checks that the list matches this file's AST and that every name exists in the real TensorRT bindings.
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import time
from pathlib import Path

import torch

from fastp2p import __version__, outputs
from fastp2p.checkpoint import atomic_write
from fastp2p.errors import UserError

from .onnx import check_meta, read_onnx_meta

log = logging.getLogger("fastp2p.engines")

PLAN_FORMAT = "fastp2p-trt-plan-1"
DEFAULT_BATCH = (1, 8, 32)
DEFAULT_OPT_LEVEL = 3
DEFAULT_WORKSPACE_MIB = 4096

# Attribute names used on TensorRT objects and the ``trt`` module; checked against this file's AST and against the
# bindings (``fastp2p.engines.trt_api_check``). Variables holding TensorRT objects use the names in ``TRT_OBJECTS``.
TRT_API_USED = frozenset({
    # module level: classes, enums, enum members
    "__version__", "Logger", "WARNING", "VERBOSE", "Builder", "NetworkDefinitionCreationFlag",
    "STRONGLY_TYPED", "OnnxParser", "MemoryPoolType", "WORKSPACE", "BuilderFlag", "TF32", "Runtime",
    "TensorIOMode", "INPUT", "DataType", "FLOAT", "HALF", "BF16",
    # Builder
    "create_network", "create_builder_config", "create_optimization_profile", "build_serialized_network",
    # INetworkDefinition / ITensor
    "num_inputs", "num_outputs", "get_input", "get_output", "name", "shape", "dtype",
    # OnnxParser / IParserError
    "parse_from_file", "num_errors", "get_error", "code", "desc", "node", "node_name", "node_operator",
    # IBuilderConfig
    "set_memory_pool_limit", "builder_optimization_level", "clear_flag", "create_timing_cache", "set_timing_cache",
    "get_timing_cache", "add_optimization_profile",
    # IOptimizationProfile, ITimingCache
    "set_shape", "serialize",
    # Runtime, ICudaEngine
    "deserialize_cuda_engine", "create_execution_context", "num_io_tensors", "get_tensor_name", "get_tensor_mode",
    "get_tensor_dtype", "get_tensor_profile_shape",
    # IExecutionContext
    "set_input_shape", "get_tensor_shape", "set_tensor_address", "execute_async_v3",
})
TRT_OBJECTS = frozenset({"builder", "network", "parser", "error", "config", "profile", "cache", "runtime", "engine",
                         "context", "tensor"})


def require_tensorrt():
    """The ``tensorrt`` module, or a UserError saying what is missing."""
    try:
        import tensorrt as trt
    except ImportError as e:
        raise UserError(f"TensorRT is not installed here ({e.msg}); it needs an NVIDIA GPU and "
                        "`pip install 'fastp2p[tensorrt]'`") from None
    version = trt.__version__
    if int(version.split(".")[0]) < 10:
        raise UserError(f"TensorRT {version} is too old: fastp2p needs TensorRT >= 10")
    return trt


def tensorrt_available() -> tuple[bool, str]:
    """(usable, why not): TensorRT importable and a CUDA GPU present."""
    try:
        import tensorrt as trt
    except ImportError:
        return False, "TensorRT is not installed"
    version = trt.__version__
    if int(version.split(".")[0]) < 10:
        return False, f"TensorRT {version} is older than 10"
    if not torch.cuda.is_available():
        return False, "no CUDA GPU is visible"
    return True, ""


def gpu_identity(device: int | None = None) -> dict:
    idx = torch.cuda.current_device() if device is None else device
    props = torch.cuda.get_device_properties(idx)
    return {"name": props.name, "compute_capability": f"{props.major}.{props.minor}",
            "memory_gib": round(props.total_memory / 2**30, 1)}


def default_timing_cache() -> Path:
    """A per-machine cache shared by every build (TensorRT keys its entries by GPU and tactic)."""
    root = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "fastp2p" / "tensorrt"
    return root / "timing.cache"


def sidecar_path(plan: str | Path) -> Path:
    return Path(str(plan) + ".json")


def _is_plan_sidecar(path: Path) -> bool:
    return (outputs.json_object(path) or {}).get("format") == PLAN_FORMAT


def is_our_plan(plan: str | Path) -> bool:
    """A plan ``build_engine`` wrote: its ``.plan.json`` sidecar says so (a serialized engine has no room for
    metadata of ours; a plan built by hand with trtexec has no sidecar)."""
    return _is_plan_sidecar(sidecar_path(plan))


def check_plan_output(plan: str | Path, *, inputs=(), overwrite: bool = False,
                      timing_cache: str | Path | None = None) -> Path:
    """The files ``build_engine`` writes may be written (``fastp2p.outputs``): the plan and its sidecar replaced only
    if an earlier build's, or with ``overwrite``; never an input. Needs no TensorRT, so ``build-engine`` checks it
    before exporting anything."""
    plan = Path(plan)
    outputs.output_file(plan, "-o", kind="build-engine", ours=is_our_plan, inputs=inputs, overwrite=overwrite)
    outputs.output_file(sidecar_path(plan), "-o", kind="build-engine", ours=_is_plan_sidecar, inputs=inputs,
                        overwrite=overwrite)
    cache = Path(timing_cache) if timing_cache else default_timing_cache()
    # read and rewritten by every build, by design: only the path is checked
    outputs.output_file(cache, "--timing_cache", kind="build-engine", ours=lambda p: True, inputs=inputs)
    return plan


# ---------------------------------------------------------------------------------------------------------------------
# profile shapes
# ---------------------------------------------------------------------------------------------------------------------
def parse_triple(text: str, flag: str) -> tuple[int, int, int]:
    """'1,8,32' -> (1, 8, 32), checked min <= opt <= max; a single number means min = opt = max."""
    try:
        parts = [int(p) for p in str(text).split(",")]
    except ValueError:
        raise UserError(f"{flag} {text!r}: expected MIN,OPT,MAX (three whole numbers)") from None
    if len(parts) == 1:
        parts = parts * 3
    if len(parts) != 3 or not (1 <= parts[0] <= parts[1] <= parts[2]):
        raise UserError(f"{flag} {text!r}: expected MIN,OPT,MAX with 1 <= MIN <= OPT <= MAX")
    return parts[0], parts[1], parts[2]


def profile_shapes(meta: dict, batch=DEFAULT_BATCH, hw=None) -> dict:
    """{"min": [N, C, H, W], "opt": [...], "max": [...]} for the ONNX's input."""
    C = int(meta["arch"]["input_nc"])
    multiple = int(meta["size_multiple"])
    if meta.get("dynamic_hw"):
        hw = hw or (multiple, int(meta["preprocessing"]["crop_size"]), int(meta["preprocessing"]["crop_size"]))
        for s in hw:
            if s % multiple:
                raise UserError(f"--hw {','.join(map(str, hw))}: every size must be a multiple of {multiple}")
    else:
        crop = int(meta["input"]["shape"][2])
        if hw is not None and tuple(hw) != (crop, crop, crop):
            raise UserError(f"--hw: this ONNX has a fixed {crop}x{crop} input; export it with --dynamic for "
                            "other sizes")
        hw = (crop, crop, crop)
    return {k: [int(b), C, int(s), int(s)] for k, b, s in zip(("min", "opt", "max"), batch, hw, strict=True)}


def check_int8_onnx(onnx_path: str | Path) -> None:
    """A ``UserError`` unless the int8 QDQ file at ``onnx_path`` is one TensorRT takes (symmetric int8 Q/DQ nodes;
    ``engines/quantize.tensorrt_problem``). Needs no TensorRT, so build-engine checks before it prints a trtexec
    command or builds."""
    from .quantize import tensorrt_problem

    why = tensorrt_problem(onnx_path)
    if why:
        raise UserError(why)


def trtexec_command(onnx_path: str | Path, plan_path: str | Path, shapes: dict, *, input_name: str = "input",
                    opt_level: int = DEFAULT_OPT_LEVEL, workspace_mib: int = DEFAULT_WORKSPACE_MIB,
                    timing_cache: str | Path | None = None, tf32: bool = False) -> str:
    """The ``trtexec`` line that builds the same engine as ``build_engine`` (without the sidecar)."""
    def dims(v):
        return f"{input_name}:{'x'.join(map(str, v))}"

    args = ["trtexec", f"--onnx={onnx_path}", f"--saveEngine={plan_path}", "--stronglyTyped",
            f"--minShapes={dims(shapes['min'])}", f"--optShapes={dims(shapes['opt'])}",
            f"--maxShapes={dims(shapes['max'])}", f"--builderOptimizationLevel={opt_level}",
            f"--memPoolSize=workspace:{workspace_mib}M", f"--timingCacheFile={timing_cache or default_timing_cache()}"]
    if not tf32:
        args.append("--noTF32")
    return shlex.join(args)


# ---------------------------------------------------------------------------------------------------------------------
# build
# ---------------------------------------------------------------------------------------------------------------------
class TensorRTError(UserError):
    """A TensorRT build or load failed; the details were logged just before."""


def _make_logger(trt, verbose: bool):
    return trt.Logger(trt.Logger.VERBOSE if verbose else trt.Logger.WARNING)


def parse_onnx(trt, builder, onnx_path: Path, logger):
    """(network, parser) for ``onnx_path``, strongly typed; raises TensorRTError after logging every parser error."""
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    ok = parser.parse_from_file(str(onnx_path))  # reads external weights beside the file too
    errors = [parser.get_error(i) for i in range(parser.num_errors)]
    for error in errors:
        log.error("TensorRT ONNX parser: %s at node %s (%s, %s): %s", error.code(), error.node(), error.node_name(),
                  error.node_operator(), error.desc())
    if not ok or errors:
        raise TensorRTError(f"{onnx_path}: TensorRT's ONNX parser failed with {len(errors)} error(s), logged above")
    return network, parser


def build_engine(onnx_path: str | Path, plan_path: str | Path, *, batch=DEFAULT_BATCH, hw=None,
                 opt_level: int = DEFAULT_OPT_LEVEL, workspace_mib: int = DEFAULT_WORKSPACE_MIB,
                 timing_cache: str | Path | None = None, tf32: bool = False, verbose: bool = False,
                 overwrite: bool = False) -> Path:
    """Build a TensorRT engine from a fastp2p ONNX export; writes ``plan_path`` and ``plan_path.json`` (existing
    ones: see ``check_plan_output``).

    ``batch`` and ``hw`` are (min, opt, max); ``hw`` only for a ``--dynamic`` export (square sizes). ``tf32=False``
    keeps fp32 layers in real fp32 (TensorRT would otherwise use TF32 tensor cores for them)."""
    trt = require_tensorrt()
    if not torch.cuda.is_available():
        raise UserError("TensorRT needs a CUDA GPU and torch sees none here")
    onnx_path, plan_path = Path(onnx_path), Path(plan_path)
    check_plan_output(plan_path, inputs=[onnx_path], overwrite=overwrite, timing_cache=timing_cache)
    meta = read_onnx_meta(onnx_path)
    if meta.get("precision") == "int8":  # explicit quantization: the Q/DQ nodes type the strongly typed network
        check_int8_onnx(onnx_path)
    shapes = profile_shapes(meta, batch, hw)
    input_name = meta["input"]["name"]
    t0 = time.perf_counter()
    logger = _make_logger(trt, verbose)
    builder = trt.Builder(logger)
    network, parser = parse_onnx(trt, builder, onnx_path, logger)
    inputs = [network.get_input(i) for i in range(network.num_inputs)]
    outputs = [network.get_output(i) for i in range(network.num_outputs)]
    for tensor in inputs + outputs:
        log.debug("network %s %s: %s %s", "input" if tensor in inputs else "output", tensor.name, tensor.dtype,
                 tuple(tensor.shape))
    if [t.name for t in inputs] != [input_name]:
        raise TensorRTError(f"{onnx_path}: expected one input named {input_name!r}, found "
                            f"{[t.name for t in inputs]}")

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_mib) << 20)
    config.builder_optimization_level = int(opt_level)
    if not tf32:
        config.clear_flag(trt.BuilderFlag.TF32)
    cache_file = Path(timing_cache) if timing_cache else default_timing_cache()
    cache = config.create_timing_cache(cache_file.read_bytes() if cache_file.is_file() else b"")
    if not config.set_timing_cache(cache, ignore_mismatch=False):
        log.warning("timing cache %s does not match this TensorRT/GPU; starting an empty one", cache_file)
        cache = config.create_timing_cache(b"")
        config.set_timing_cache(cache, ignore_mismatch=True)
    profile = builder.create_optimization_profile()
    profile.set_shape(input_name, shapes["min"], shapes["opt"], shapes["max"])
    config.add_optimization_profile(profile)

    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise TensorRTError(f"{onnx_path}: TensorRT could not build an engine (see its log above)")
    build_s = time.perf_counter() - t0
    cache = config.get_timing_cache()
    cache_bytes = bytes(cache.serialize())
    with outputs.writing(cache_file, "--timing_cache"):
        atomic_write(cache_file, lambda tmp: Path(tmp).write_bytes(cache_bytes))
    plan_bytes = bytes(plan)
    with outputs.writing(plan_path, "-o"):
        atomic_write(plan_path, lambda tmp: Path(tmp).write_bytes(plan_bytes))

    from fastp2p.checkpoint import file_hash

    sidecar = {
        "format": PLAN_FORMAT, "tensorrt_version": trt.__version__, "gpu": gpu_identity(),
        "cuda": torch.version.cuda, "profile": {input_name: shapes}, "precision": meta.get("precision"),
        "quantization": meta.get("quantization"), "tf32": bool(tf32), "mode": meta.get("mode"),
        "dropout": meta.get("dropout"),
        "preprocessing": meta.get("preprocessing"), "arch": meta.get("arch"), "dynamic_hw": meta.get("dynamic_hw"),
        "size_multiple": meta.get("size_multiple"), "input": meta.get("input"), "output": meta.get("output"),
        "checkpoint": meta.get("checkpoint"), "checkpoint_sha256": meta.get("checkpoint_sha256"),
        "onnx": onnx_path.name, "onnx_sha256": file_hash(onnx_path), "builder_optimization_level": int(opt_level),
        "workspace_mib": int(workspace_mib), "timing_cache": str(cache_file), "build_s": round(build_s, 1),
        "fastp2p": __version__, "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    with outputs.writing(sidecar_path(plan_path), "-o"):
        atomic_write(sidecar_path(plan_path),
                     lambda tmp: Path(tmp).write_text(json.dumps(sidecar, indent=2) + "\n"))
    log.info("built %s (%s, profile %s) in %.0f s", plan_path, meta.get("precision"), shapes, build_s)
    return plan_path


# ---------------------------------------------------------------------------------------------------------------------
# run
# ---------------------------------------------------------------------------------------------------------------------
def read_plan_meta(plan_path: str | Path) -> dict:
    """The sidecar of ``plan_path``; for a plan built by hand with trtexec, the metadata of the ONNX beside it."""
    plan_path = Path(plan_path)
    side = sidecar_path(plan_path)
    if side.is_file():
        try:
            meta = json.loads(side.read_text())
        except (OSError, ValueError) as e:  # json.JSONDecodeError, UnicodeDecodeError (a binary file)
            raise UserError(f"{side}: unreadable sidecar ({e}); rebuild the plan with `fastp2p build-engine`") from None
        if not isinstance(meta, dict) or meta.get("format") != PLAN_FORMAT:
            raise UserError(f"{side}: not a fastp2p TensorRT sidecar")
        return check_meta(meta, side, prefix="", fix="rebuild the plan with `fastp2p build-engine`")
    onnx_beside = plan_path.with_suffix(".onnx")
    if onnx_beside.is_file():
        meta = dict(read_onnx_meta(onnx_beside))
        meta["onnx"] = onnx_beside.name
        return meta
    raise UserError(f"{plan_path}: no sidecar {side.name} (nor {onnx_beside.name}) beside it; build it with "
                    "`fastp2p build-engine` so fastp2p knows its preprocessing")


def check_compatible(meta: dict, plan_path: Path, trt_version: str, gpu: dict) -> None:
    """One UserError if the plan was built for another TensorRT version or another GPU."""
    built_trt = meta.get("tensorrt_version")
    if built_trt and built_trt != trt_version:
        raise UserError(f"{plan_path}: built with TensorRT {built_trt}, but this is TensorRT {trt_version}; "
                        f"rebuild it here with `fastp2p build-engine {meta.get('onnx', 'G.onnx')} -o {plan_path}`")
    built_gpu = meta.get("gpu") or {}
    if built_gpu and (built_gpu.get("name") != gpu["name"]
                      or built_gpu.get("compute_capability") != gpu["compute_capability"]):
        raise UserError(f"{plan_path}: built for {built_gpu.get('name')} (sm {built_gpu.get('compute_capability')}),"
                        f" but this GPU is {gpu['name']} (sm {gpu['compute_capability']}); rebuild it on this GPU")


def _torch_dtype(trt, dt):
    table = {trt.DataType.FLOAT: torch.float32, trt.DataType.HALF: torch.float16, trt.DataType.BF16: torch.bfloat16}
    if dt not in table:
        raise TensorRTError(f"unexpected engine I/O type {dt}")
    return table[dt]


class TrtGenerator:
    """``G(x)``: CUDA float NCHW in [-1, 1] -> CUDA float NCHW, on a deserialized TensorRT engine.

    ``cuda_graph=True`` captures one CUDA graph per input shape at first use and replays it afterwards (the launch
    overhead of a U-Net's ~40 kernels is a visible part of a batch-1 call); the returned tensor is then a fresh copy
    of the graph's static output."""

    backend = "tensorrt"

    def __init__(self, plan_path: str | Path, *, device: str | torch.device = "cuda", cuda_graph: bool = False,
                 verbose: bool = False):
        trt = require_tensorrt()
        self.trt = trt
        self.device = torch.device(device)
        if self.device.type != "cuda" or not torch.cuda.is_available():
            raise UserError("a TensorRT engine runs on a CUDA GPU; none is available here (use the .onnx with "
                            "ONNX Runtime instead)")
        if self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.path = Path(plan_path)
        if not self.path.is_file():
            raise UserError(f"engine not found: {self.path}")
        self.meta = read_plan_meta(self.path)
        check_compatible(self.meta, self.path, trt.__version__, gpu_identity(self.device.index))
        self.logger = _make_logger(trt, verbose)
        runtime = trt.Runtime(self.logger)
        with torch.cuda.device(self.device):
            engine = runtime.deserialize_cuda_engine(self.path.read_bytes())
            if engine is None:
                raise UserError(f"{self.path}: TensorRT could not load this plan (built by another TensorRT version "
                                "or for another GPU?); rebuild it here with `fastp2p build-engine`")
            context = engine.create_execution_context()
        self.runtime, self.engine, self.context = runtime, engine, context
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        ins = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        outs = [n for n in names if n not in ins]
        if len(ins) != 1 or len(outs) != 1:
            raise TensorRTError(f"{self.path}: expected one input and one output, found {ins} -> {outs}")
        self.input_name, self.output_name = ins[0], outs[0]
        self.input_dtype = _torch_dtype(trt, engine.get_tensor_dtype(self.input_name))
        self.output_dtype = _torch_dtype(trt, engine.get_tensor_dtype(self.output_name))
        self.profile = [tuple(s) for s in engine.get_tensor_profile_shape(self.input_name, 0)]  # min, opt, max
        self.cuda_graph = cuda_graph
        self._graphs: dict[tuple, tuple] = {}

    def _bind(self, x: torch.Tensor, y: torch.Tensor) -> None:
        context = self.context
        if not context.set_input_shape(self.input_name, tuple(x.shape)):
            raise UserError(f"input shape {tuple(x.shape)} is outside the engine's profile "
                            f"(min {self.profile[0]}, max {self.profile[2]})")
        context.set_tensor_address(self.input_name, x.data_ptr())
        context.set_tensor_address(self.output_name, y.data_ptr())

    def _output_like(self, x: torch.Tensor) -> torch.Tensor:
        self.context.set_input_shape(self.input_name, tuple(x.shape))
        shape = tuple(self.context.get_tensor_shape(self.output_name))
        return torch.empty(shape, dtype=self.output_dtype, device=self.device)

    def _enqueue(self, stream: torch.cuda.Stream) -> None:
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise TensorRTError(f"{self.path}: TensorRT execution failed (see its log above)")

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.device, self.input_dtype, non_blocking=True).contiguous()
        if self.cuda_graph:
            return self._replay(x)
        y = self._output_like(x)
        self._bind(x, y)
        self._enqueue(torch.cuda.current_stream(self.device))
        return y

    def _replay(self, x: torch.Tensor) -> torch.Tensor:
        key = tuple(x.shape)
        if key not in self._graphs:
            static_x = torch.empty_like(x)
            static_y = self._output_like(x)
            self._bind(static_x, static_y)
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):  # TensorRT needs one launch after a shape change before capture
                self._enqueue(side)
            torch.cuda.current_stream(self.device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                self._enqueue(torch.cuda.current_stream(self.device))
            self._graphs[key] = (graph, static_x, static_y)
        graph, static_x, static_y = self._graphs[key]
        static_x.copy_(x)
        graph.replay()
        return static_y.clone()

"""The generator on OpenVINO (CPU): our exported ``.onnx`` compiled by OpenVINO's CPU plugin.

The compiled model is cached on disk (OpenVINO's ``CACHE_DIR``: ``$FASTP2P_OPENVINO_CACHE``, else
``$XDG_CACHE_HOME/fastp2p/openvino``, else ``~/.cache/fastp2p/openvino``), so a second open skips the compile.
The precision hint is fp32 unless told: OpenVINO otherwise runs bf16 on its own on CPUs with AMX-BF16, which changes
the outputs; ``bf16`` is taken only where the CPU has it. Threads: one per core this process may run on (as ONNX
Runtime). ``hint="latency"``: one stream, for batch 1; ``"throughput"``: several streams, a batch is split across
as many infer requests as OpenVINO suggests. The batch dimension of our exports is always dynamic (engines/onnx.py),
so any batch size runs.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import numpy as np
import torch

from fastp2p.errors import UserError, first_line

from .onnx import read_onnx_meta
from .onnxruntime import cpu_threads

log = logging.getLogger("fastp2p.engines")

PRECISIONS = ("fp32", "bf16")
HINTS = ("latency", "throughput")


def require_openvino():
    try:
        import openvino as ov
    except ImportError:
        raise UserError("the OpenVINO backend needs openvino: pip install 'fastp2p[openvino]'") from None
    return ov


def default_cache_dir() -> Path:
    env = os.environ.get("FASTP2P_OPENVINO_CACHE")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base).expanduser() / "fastp2p" / "openvino"


def cpu_has_bf16(core) -> bool:
    return "BF16" in core.get_property("CPU", "OPTIMIZATION_CAPABILITIES")


class OvGenerator:
    """``G(x)``: float NCHW in [-1, 1] (torch, CPU) -> NCHW (the model's output type), through OpenVINO."""

    backend = "openvino"

    def __init__(self, path: str | Path, *, precision: str = "fp32", hint: str = "latency",
                 threads: int | None = None, streams: int | None = None, cache_dir: str | Path | None = None):
        ov = require_openvino()
        import openvino.properties as props
        import openvino.properties.hint as hints

        self.path = Path(path)
        self.onnx_meta = read_onnx_meta(self.path)  # a non-fastp2p or damaged file: the same error as ONNX Runtime
        if precision not in PRECISIONS:
            raise UserError(f"OpenVINO precision {precision!r}: choose one of {', '.join(PRECISIONS)}")
        if hint not in HINTS:
            raise UserError(f"OpenVINO hint {hint!r}: choose one of {', '.join(HINTS)}")
        core = ov.Core()
        if precision == "bf16" and not cpu_has_bf16(core):
            raise UserError("OpenVINO precision bf16: this CPU has no bfloat16 support (AVX512-BF16 / AMX); use fp32")
        self.cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
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
            model = core.read_model(str(self.path))
            shape = model.input(0).get_partial_shape()
            if shape.rank.is_static and shape.rank.get_length() == 4 and not shape[0].is_dynamic:
                # an export always declares a symbolic batch; if a converted file pinned it, free it again
                model.reshape({model.input(0).get_any_name(): ov.PartialShape([-1, shape[1], shape[2], shape[3]])})
            self.compiled = core.compile_model(model, "CPU", config)
        except Exception as e:  # OpenVINO raises RuntimeError with multi-line messages
            raise UserError(f"{self.path}: OpenVINO cannot compile it ({first_line(e, 300)})") from None
        self.load_s = time.perf_counter() - t0
        self.precision, self.hint = precision, hint
        self.input_dtype = torch.float16 if self.compiled.input(0).get_element_type() == ov.Type.f16 \
            else torch.float32
        n = 1 if hint == "latency" else max(1, int(self.compiled.get_property(
            props.optimal_number_of_infer_requests())))
        self.requests = [self.compiled.create_infer_request() for _ in range(n)]
        self.device = torch.device("cpu")
        log.debug("OpenVINO %s: compiled %s (%s, %s, %d request(s)) in %.2f s; cache %s", ov.__version__,
                  self.path, precision, hint, n, self.load_s, self.cache_dir)

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

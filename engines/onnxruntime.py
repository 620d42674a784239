"""The generator on ONNX Runtime: CPU here, CUDA (or ONNX Runtime's own TensorRT provider, on request) where present.

Tensors stay torch tensors: inputs and outputs are bound to the session by pointer (IO binding), so a call copies
nothing between torch and ONNX Runtime, on the CPU and on a GPU alike. Graph optimizations are all on (constant
folding, Conv+activation fusion, and on the CPU the NCHWc blocked layout that MLAS's convolutions want); threads: one
intra-op thread per core this process may run on, no inter-op pool (the graph is a chain).

``optimize_onnx`` writes ONNX Runtime's optimized graph to a file (``fastp2p build-engine --backend onnxruntime``):
the portable ("extended") level, because the layout-level rewrites are specific to the CPU that made them; they are
redone, in well under a second, whenever a session opens the file.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch

from fastp2p import __version__, outputs
from fastp2p.checkpoint import atomic_write
from fastp2p.errors import UserError, first_line

from .onnx import check_onnx_output, meta_from_proto, read_onnx_meta

log = logging.getLogger("fastp2p.engines")

ORT_FORMAT = "fastp2p-ort-1"  # the ``format`` of an optimized model's ``.json`` sidecar

_NP = {torch.float32: np.float32, torch.float16: np.float16, torch.uint8: np.uint8}
_ORT_TYPES = {"tensor(float)": torch.float32, "tensor(float16)": torch.float16, "tensor(bfloat16)": torch.bfloat16}


def require_ort():
    try:
        import onnxruntime as ort
    except ImportError:
        raise UserError("the ONNX Runtime backend needs onnxruntime: pip install 'fastp2p[onnx]'") from None
    return ort


def cpu_threads() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def session_options(threads: int | None = None, level: str = "all", optimized_path: str | Path | None = None,
                    spin: bool = False):
    ort = require_ort()
    so = ort.SessionOptions()
    so.graph_optimization_level = {"basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
                                   "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
                                   "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}[level]
    so.intra_op_num_threads = threads or cpu_threads()
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.log_severity_level = 3  # errors only
    # Idle worker threads sleep instead of spinning: on a small CPU shared with torch (decoding, pre/post-processing)
    # spinning threads steal the cores; measured no slower on the U-Net, whose ops are all large.
    so.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
    if optimized_path is not None:
        so.optimized_model_filepath = str(optimized_path)
    return so


def default_providers(device: torch.device, tensorrt_ep: bool = False) -> list:
    ort = require_ort()
    available = set(ort.get_available_providers())
    chosen: list = []
    if device.type == "cuda":
        if tensorrt_ep and "TensorrtExecutionProvider" in available:
            chosen.append("TensorrtExecutionProvider")
        if "CUDAExecutionProvider" not in available:
            raise UserError("--device cuda: this onnxruntime has no CUDA provider; install onnxruntime-gpu or use "
                            "--device cpu")
        opts = {"device_id": device.index or 0}
        if torch.cuda.is_available():  # run on torch's stream, so no stream synchronization is needed around calls
            opts.update(has_user_compute_stream="1",
                        user_compute_stream=str(torch.cuda.current_stream(device).cuda_stream))
        chosen.append(("CUDAExecutionProvider", opts))
    chosen.append("CPUExecutionProvider")
    return chosen


class OrtGenerator:
    """``G(x)``: float32 NCHW in [-1, 1] (torch, on ``device``) -> float32 NCHW, through an ONNX Runtime session."""

    backend = "onnxruntime"

    def __init__(self, path: str | Path, *, device: str | torch.device = "cpu", threads: int | None = None,
                 providers: list | None = None, tensorrt_ep: bool = False, spin: bool = False):
        ort = require_ort()
        self.path = Path(path)
        self.onnx_meta = read_onnx_meta(self.path)
        self.device = torch.device(device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise UserError("--device cuda: no CUDA device is available here; use --device cpu")
        if self.onnx_meta.get("precision") == "bf16" and self.device.type == "cpu":
            raise UserError(f"{self.path}: a bf16 export runs on TensorRT, not on ONNX Runtime's CPU provider (it "
                            "has no bfloat16 convolution); export with --precision fp32 or fp16")
        self.providers = providers or default_providers(self.device, tensorrt_ep)
        t0 = time.perf_counter()
        try:
            self.session = ort.InferenceSession(str(self.path), session_options(threads, spin=spin),
                                                providers=self.providers)
        except Exception as e:  # onnxruntime raises its own exception types (Fail, NotImplemented, ...)
            raise UserError(f"{self.path}: ONNX Runtime cannot open it ({first_line(e, 300)})") from None
        self.load_s = time.perf_counter() - t0
        (inp,), (out,) = self.session.get_inputs(), self.session.get_outputs()
        self.input_name, self.output_name = inp.name, out.name
        self.input_dtype = _ORT_TYPES.get(inp.type, torch.float32)
        self.output_dtype = _ORT_TYPES.get(out.type, torch.float32)
        self.output_nc = int(self.onnx_meta["arch"]["output_nc"])
        self._ort_device = "cuda" if self.device.type == "cuda" else "cpu"
        self._stream = torch.cuda.current_stream(self.device).cuda_stream if self.device.type == "cuda" else None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.device, self.input_dtype).contiguous()
        N, _, H, W = x.shape
        y = torch.empty((N, self.output_nc, H, W), dtype=self.output_dtype, device=self.device)
        binding = self.session.io_binding()
        dev_id = self.device.index or 0
        binding.bind_input(self.input_name, self._ort_device, dev_id, _NP[self.input_dtype], tuple(x.shape),
                           x.data_ptr())
        binding.bind_output(self.output_name, self._ort_device, dev_id, _NP[self.output_dtype], tuple(y.shape),
                            y.data_ptr())
        if self.device.type == "cuda" and torch.cuda.current_stream(self.device).cuda_stream != self._stream:
            torch.cuda.current_stream(self.device).synchronize()  # the session runs on the stream it was made with
        self.session.run_with_iobinding(binding)
        return y


def sidecar_path(out: str | Path) -> Path:
    return Path(str(out) + ".json")


def check_optimized_output(src: str | Path, out: str | Path, *, overwrite: bool = False) -> None:
    """``out`` and its sidecar may be written (``fastp2p.outputs``): replaced only if fastp2p wrote them, or with
    ``overwrite``; never ``src``."""
    check_onnx_output(out, inputs=[src], overwrite=overwrite, kind="build-engine")
    outputs.output_file(sidecar_path(out), "-o", kind="build-engine", inputs=[src], overwrite=overwrite,
                        ours=lambda p: (outputs.json_object(p) or {}).get("format") == ORT_FORMAT)


def optimize_onnx(src: str | Path, out: str | Path, *, level: str = "extended", threads: int | None = None,
                  overwrite: bool = False) -> Path:
    """Write ONNX Runtime's optimized graph of ``src`` to ``out`` (``.onnx``) with a JSON sidecar ``out.json``; the
    fastp2p metadata is carried over. Existing outputs: see ``check_optimized_output``."""
    import onnx

    ort = require_ort()
    src, out = Path(src), Path(out)
    meta = read_onnx_meta(src)
    if out.suffix != ".onnx":
        raise UserError(f"-o {out}: --backend onnxruntime writes an ONNX file; name it *.onnx")
    if out.resolve() == src.resolve():
        raise UserError(f"-o {out}: would overwrite its own source; choose another name")
    check_optimized_output(src, out, overwrite=overwrite)
    t0 = time.perf_counter()

    def write(tmp):
        so = session_options(threads, level, optimized_path=tmp)
        try:
            ort.InferenceSession(str(src), so, providers=["CPUExecutionProvider"])
        except Exception as e:  # onnxruntime's own exception types
            raise UserError(f"{src}: ONNX Runtime cannot optimize it ({first_line(e, 300)})") from None
        proto = onnx.load(tmp)
        if meta_from_proto(proto).get("format") is None:  # ONNX Runtime keeps metadata_props; make sure
            src_proto = onnx.load(str(src), load_external_data=False)
            proto.metadata_props.extend(src_proto.metadata_props)
            onnx.save_model(proto, tmp)

    with outputs.writing(out, "-o"):
        atomic_write(out, write)
    opt_s = time.perf_counter() - t0
    from fastp2p.checkpoint import file_hash

    sidecar = {"format": ORT_FORMAT, "backend": "onnxruntime", "onnxruntime": ort.__version__,
               "optimization_level": level, "providers": ["CPUExecutionProvider"], "precision": meta.get("precision"),
               "mode": meta.get("mode"), "dropout": meta.get("dropout"), "preprocessing": meta.get("preprocessing"),
               "arch": meta.get("arch"), "dynamic_hw": meta.get("dynamic_hw"),
               "checkpoint": meta.get("checkpoint"), "checkpoint_sha256": meta.get("checkpoint_sha256"),
               "onnx": src.name, "onnx_sha256": file_hash(src), "cpu": platform.processor() or platform.machine(),
               "fastp2p": __version__, "optimize_s": round(opt_s, 3), "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
    with outputs.writing(sidecar_path(out), "-o"):
        atomic_write(sidecar_path(out), lambda tmp: Path(tmp).write_text(json.dumps(sidecar, indent=2) + "\n"))
    log.debug("wrote %s (ONNX Runtime %s, %s optimizations) in %.1f s", out, ort.__version__, level, opt_s)
    return out

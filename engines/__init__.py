"""Export and inference engines (installed as fastp2p.engines).

- ``onnx``: ``export_onnx`` (a checkpoint or reference .pth -> ONNX, paper or eval mode, fp32/fp16/bf16),
  ``read_onnx_meta`` and ``update_onnx_meta``.
- ``onnxruntime``: ``OrtGenerator`` (ONNX Runtime with IO binding) and ``optimize_onnx``.
- ``quantize``: ``quantize_onnx`` / ``calibration_batches`` (an fp32 export -> a calibrated per-channel INT8 QDQ
  .onnx; ``fastp2p export --precision int8``).
- ``openvino``: ``OvGenerator`` (an .onnx or our OpenVINO IR .xml compiled by OpenVINO's CPU plugin, cached on disk)
  and ``build_ir`` (``build-engine --backend openvino``).
- ``tensorrt``: ``build_engine`` (ONNX -> .plan + JSON sidecar) and ``TrtGenerator`` (TensorRT >= 10).
- ``runtime``: ``open_runtime(path, backend=...)`` -> a ``Generator`` over torch, ONNX Runtime, OpenVINO or TensorRT.
- ``trt_api_check``: static check of the TensorRT names used against the real bindings wheel.

Nothing here imports onnx, onnxruntime, openvino or tensorrt until it is used.
"""

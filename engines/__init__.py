"""Export and inference engines (installed as fastp2p.engines).

- ``onnx``: ``export_onnx`` (a checkpoint or reference .pth -> ONNX, paper or eval mode, fp32/fp16/bf16) and
  ``read_onnx_meta``.
- ``onnxruntime``: ``OrtGenerator`` (ONNX Runtime with IO binding) and ``optimize_onnx``.
- ``openvino``: ``OvGenerator`` (an exported .onnx compiled by OpenVINO's CPU plugin, cached on disk).
- ``tensorrt``: ``build_engine`` (ONNX -> .plan + JSON sidecar) and ``TrtGenerator`` (TensorRT >= 10).
- ``runtime``: ``open_runtime(path, backend=...)`` -> a ``Generator`` over torch, ONNX Runtime, OpenVINO or TensorRT.
- ``cli``: ``add_subcommands`` for ``fastp2p export`` and ``fastp2p build-engine``.
- ``trt_api_check``: static check of the TensorRT names used against the real bindings wheel.

Nothing here imports onnx, onnxruntime, openvino or tensorrt until it is used.
"""

"""Static TensorRT API check: every TensorRT name that engines/tensorrt.py uses exists in the real bindings.

TensorRT itself cannot be installed without an NVIDIA GPU; its bindings wheel (tensorrt-cu13-bindings, 1.3 MB) can be
downloaded anywhere, and its tensorrt.so holds the names (see fastp2p.engines.trt_api_check). The wheel is taken from
$FASTP2P_TRT_WHEEL, from ~/.cache/fastp2p/wheels, or pip-downloaded there (tensorrt-cu13-bindings, the newest
TensorRT, and tensorrt-cu12-bindings<10.14, the last TensorRT 10); without network the wheel tests skip.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from fastp2p.engines import trt_api_check

CACHE = Path.home() / ".cache" / "fastp2p" / "wheels"


def _wheel(which: str) -> Path:
    path = trt_api_check.find_wheel(CACHE, timeout=120, which=which)
    if path is None:
        pytest.skip(f"cannot find or pip-download {trt_api_check.WHEELS[which][0]} (no network?); put the wheel in "
                    f"{CACHE} or set FASTP2P_TRT_WHEEL")
    return path


@pytest.fixture(scope="module")
def wheel() -> Path:
    return _wheel("latest")


@pytest.mark.parametrize("which", sorted(trt_api_check.WHEELS))
def test_every_tensorrt_name_used_exists_in_the_bindings(which):
    """The newest TensorRT and the last TensorRT 10: fastp2p supports both."""
    problems = trt_api_check.check(_wheel(which))
    assert not problems, "\n".join(problems)


def test_bindings_scan_knows_tensorrt_10_api_and_rejects_removed_names(wheel):
    so, init_py = trt_api_check.bindings_files(wheel)
    names = trt_api_check.binding_names(so, init_py)
    for name in ("Builder", "OnnxParser", "STRONGLY_TYPED", "execute_async_v3", "set_tensor_address",
                 "set_input_shape", "build_serialized_network", "create_timing_cache", "WORKSPACE", "__version__"):
        assert name in names, name
    # names TensorRT removed (TensorRT 7/8 API, and weak typing in 11): a use of any of them must fail the check.
    # (A removed name that is the tail of a live one, such as INT8 of UINT8, cannot be told apart: the linker stores
    # them as one string.)
    for name in ("max_workspace_size", "EXPLICIT_BATCH", "get_binding_index", "execute_async_v2", "build_engine",
                 "FP16", "no_such_api_name"):
        assert name not in names, name


def test_check_catches_a_misspelled_or_undeclared_call(wheel):
    source, _, _ = trt_api_check.module_source()
    bad = source.replace("context.execute_async_v3(", "context.execute_async_v4(", 1)
    assert bad != source
    problems = trt_api_check.check(wheel, source=bad)
    assert any("execute_async_v4" in p for p in problems)
    assert any("does not exist in the TensorRT bindings" in p for p in problems)


def test_ast_walk_finds_trt_chains_and_object_attributes():
    src = (
        "import tensorrt as trt\n"
        "def f(x):\n"
        "    config = x\n"
        "    config.set_flag(trt.BuilderFlag.FP16)\n"
        "    self.context.set_input_shape('a', (1,))\n"
        "    other.not_counted()\n"
    )
    assert trt_api_check.used_names(src, {"config", "context"}) == {"set_flag", "BuilderFlag", "FP16",
                                                                     "set_input_shape"}


def test_binding_names_include_merged_suffixes():
    so = b"\x00IExprBuilder\x00set_shape\x00 some docstring with FP16 inside\x00"
    names = trt_api_check.binding_names(so)
    assert {"IExprBuilder", "ExprBuilder", "Builder", "set_shape", "shape"} <= names
    assert "FP16" not in names  # prose is not a name

"""The OpenVINO cases (tests/openvino_cases.py) in a fresh Python process.

Why: one full-suite run (2026-12-02, fresh clone, 2-core EPYC) segfaulted in the test right after these, with DALI,
the Triton interpreter, inductor and several oneDNN/OpenMP runtimes already loaded into the same pytest process; the
cases pass alone and beside the tests around them, and `fastp2p --backend openvino` is one process of its own. Until
the interaction is understood, the suite keeps OpenVINO's runtime out of the shared process.

The CLI's default ``--backend auto`` picks OpenVINO for an .onnx whenever it is installed, so a test that runs a
command in-process on an .onnx (tests/test_readme.py runs the README's so) would load it there: tests/conftest.py sets
``FASTP2P_BACKEND=onnxruntime`` (the variable ``auto`` obeys) for the shared process; tests/openvino_cases.py
unsets it for each of its cases.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_openvino_cases_in_their_own_process():
    pytest.importorskip("openvino", reason="openvino is not installed (pip install 'fastp2p[openvino]')")
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/openvino_cases.py"],
                       cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    assert " passed" in r.stdout and "failed" not in r.stdout, r.stdout[-2000:]

"""The quality gate (``fastp2p.gate``) and ``fastp2p eval --reference``: a generator against itself, against a
perturbed copy and against its own ONNX export; pass / fail / --force; mode mismatches refused; eval without
--reference unchanged; the default gate data. Tiny generators (unet_128, ngf 8) on three generated 128 px pairs."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import write_smooth_pairs
from PIL import Image

from fastp2p import gate
from fastp2p import metrics as M
from fastp2p.checkpoint import save
from fastp2p.cli import main
from fastp2p.config import Config, DataConfig, ModelConfig
from fastp2p.errors import UserError
from fastp2p.evaluate import evaluate
from fastp2p.models import build_generator

# The metrics.json keys of `fastp2p eval` without --reference: a contract (add fields, rename none).
EVAL_KEYS = {"images", "L1", "PSNR", "SSIM", "FID", "LPIPS", "checkpoint", "engine", "backend", "mode", "dropout",
             "direction", "crop_size", "seed", "data", "max_images", "skipped", "definitions", "files", "time_s",
             "versions"}
REF_FIELDS = {"reference", "reference_backend", "psnr_ref", "ssim_ref", "l1_ref", "psnr_ref_min", "reference_L1",
              "reference_PSNR", "reference_SSIM"}
LEVEL_PSNR = 20 * math.log10(255)  # 48.13 dB: every value of one image off by one 8-bit level


def _cfg(data: str | None = None) -> Config:
    return Config(ModelConfig(netG="unet_128", ngf=8),
                  DataConfig(data=data, crop_size=128, load_size=128, direction="BtoA"))


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("gate")


@pytest.fixture(scope="module")
def teacher(work) -> Path:
    torch.manual_seed(0)
    return save(work / "teacher.safetensors", cfg=_cfg(), G=build_generator("unet_128", ngf=8))


@pytest.fixture(scope="module")
def noisy(work, teacher) -> Path:
    """The teacher with Gaussian noise (std 0.01) on every weight: close, but not equal, outputs."""
    torch.manual_seed(0)
    G = build_generator("unet_128", ngf=8)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in G.parameters():
            p.add_(0.01 * torch.randn(p.shape, generator=g))
    return save(work / "noisy.safetensors", cfg=_cfg(), G=G)


@pytest.fixture(scope="module")
def pairs(work) -> Path:
    """3 aligned A|B files of 128 x 256: smooth random A, B = a brighter copy."""
    return write_smooth_pairs(work / "pairs", 3, 128)


@pytest.fixture(scope="module")
def onnx_eval(work, teacher) -> Path:
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    from fastp2p.engines.onnx import export_onnx

    # the TorchScript exporter: ~1.5 s vs ~8 s for dynamo here (as tests/test_eval.py)
    return export_onnx(teacher, work / "teacher_eval.onnx", mode="eval", exporter="torchscript")


@pytest.fixture(scope="module")
def noisy_scores(noisy, teacher, pairs) -> dict:
    return gate.score_against_reference(noisy, teacher, pairs)


# ---------------------------------------------------------------------------------------------------------------------
# score_against_reference
# ---------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dropout", [False, True])
def test_a_generator_against_itself_scores_the_cap(teacher, pairs, dropout):
    """Identical outputs: PSNR capped at metrics.PSNR_MAX (100 dB, not inf), L1 0, SSIM 1, and the two scores
    against the targets equal. With paper-mode dropout on, one architecture on torch with one seed draws the same
    masks in both passes, so it still holds."""
    s = gate.score_against_reference(teacher, teacher, pairs, dropout=dropout)
    assert s["psnr_ref"] == s["psnr_ref_min"] == M.PSNR_MAX
    assert s["l1_ref"] == 0.0 and s["ssim_ref"] == pytest.approx(1.0, abs=1e-12)
    assert (s["l1"], s["psnr"], s["ssim"]) == (s["reference_l1"], s["reference_psnr"], s["reference_ssim"])
    assert s["images"] == 3 and s["mode"] == "paper" and s["dropout"] is dropout and s["direction"] == "BtoA"
    assert s["candidate"] == s["reference"] == str(teacher) and Path(s["data"]) == pairs
    json.dumps(s, allow_nan=False)  # recordable in an artifact's metadata as it is


def test_a_perturbed_copy_scores_lower_and_matches_eval(noisy, teacher, pairs, noisy_scores):
    s = noisy_scores
    assert 10 < s["psnr_ref_min"] <= s["psnr_ref"] < M.PSNR_MAX and s["l1_ref"] > 0 and s["ssim_ref"] < 1
    # the scores against the targets are plain eval's, for each generator (the same deterministic paper mode)
    for src, pre in ((noisy, ""), (teacher, "reference_")):
        e = evaluate(src, pairs, dropout=False, write=False, progress=False)
        assert (s[pre + "l1"], s[pre + "psnr"], s[pre + "ssim"]) == (e["L1"], e["PSNR"], e["SSIM"])


def test_an_engine_against_its_checkpoint(onnx_eval, teacher, pairs):
    """The INT8 flow's shape: an exported candidate, the checkpoint reference opened in the engine's (eval) mode.
    fp32 ORT vs torch differ by summation order only, <= 1 level where they differ (tests/test_eval.py), so the
    PSNR is at least that of every value one level off."""
    s = gate.score_against_reference(onnx_eval, teacher, pairs)
    assert s["mode"] == "eval" and s["backend"] == "onnxruntime" and s["reference_backend"] == "torch"
    assert s["psnr_ref_min"] >= LEVEL_PSNR and s["l1_ref"] <= 1 / 255


def test_mismatched_modes_are_refused_in_one_line(onnx_eval, teacher, pairs, tmp_path, capsys):
    with pytest.raises(UserError) as e:  # candidate paper mode (the checkpoint default), reference baked eval
        evaluate(teacher, pairs, reference=onnx_eval, write=False, progress=False)
    msg = str(e.value)
    assert "--reference" in msg and "eval mode" in msg and "paper mode" in msg and "\n" not in msg
    rc = main(["eval", "--checkpoint", str(teacher), "--reference", str(onnx_eval), "--data", str(pairs),
               "-o", str(tmp_path / "o"), "--no_progress"])
    err = capsys.readouterr().err
    assert rc == 2 and len([ln for ln in err.splitlines() if "error:" in ln]) == 1 and "Traceback" not in err
    assert not (tmp_path / "o" / "metrics.json").exists()  # refused before any report


# ---------------------------------------------------------------------------------------------------------------------
# quality_gate
# ---------------------------------------------------------------------------------------------------------------------
def test_gate_passes_fails_and_force(noisy, teacher, pairs, noisy_scores, monkeypatch, caplog):
    lines: list[str] = []
    p = noisy_scores["psnr_ref"]
    r = gate.quality_gate(noisy, teacher, pairs, min_psnr=p - 0.5, what="INT8 export", log=lines.append)
    assert r["passed"] is True and r["min_psnr"] == p - 0.5 and r["psnr_ref"] == p
    assert len(lines) == 1 and lines[0].startswith("gate INT8 export: 3 image(s)") and "passed" in lines[0]
    assert f"{p:.2f}" in lines[0] and f"{noisy_scores['reference_l1']:.4f}" in lines[0]

    # below the bar (scores reused: the rest is the gate's logic)
    monkeypatch.setattr(gate, "score_against_reference", lambda *a, **k: dict(noisy_scores))
    lines.clear()
    with pytest.raises(UserError) as e:
        gate.quality_gate(noisy, teacher, pairs, min_psnr=p + 0.5, log=lines.append)
    msg = str(e.value)
    assert "--min_psnr" in msg and "--force" in msg and f"{p:.2f} dB" in msg and "\n" not in msg
    assert len(lines) == 1 and "BELOW" in lines[0]
    with caplog.at_level("WARNING", logger="fastp2p.gate"):
        r = gate.quality_gate(noisy, teacher, pairs, min_psnr=p + 0.5, force=True, log=lines.append)
    assert r["passed"] is False and r["psnr_ref"] == p
    warned = [x.getMessage() for x in caplog.records if x.name == "fastp2p.gate"]
    assert len(warned) == 1 and "--force" in warned[0] and f"{p:.2f}" in warned[0]
    with pytest.raises(UserError, match="--min_psnr"):
        gate.quality_gate(noisy, teacher, pairs, min_psnr=float("nan"))


# ---------------------------------------------------------------------------------------------------------------------
# fastp2p eval --reference
# ---------------------------------------------------------------------------------------------------------------------
def _imgs(html: str) -> list[str]:
    import re

    return re.findall(r'<img src="([^"]+)"', html)


def test_eval_reference_report_and_gate_exit_codes(noisy, teacher, pairs, noisy_scores, tmp_path, capsys, caplog):
    out = tmp_path / "ev"
    argv = ["eval", "--checkpoint", str(noisy), "--reference", str(teacher), "--data", str(pairs), "-o", str(out),
            "--no_dropout_at_inference", "--no_progress"]
    high = f"{noisy_scores['psnr_ref'] + 1:.3f}"
    assert main([*argv, "--min_psnr", high]) == 2  # below the bar: the report is written, then exit 2
    cap = capsys.readouterr()
    errors = [ln for ln in cap.err.splitlines() if "error:" in ln]
    assert len(errors) == 1 and "--min_psnr" in errors[0] and "--force" in errors[0] and "Traceback" not in cap.err
    assert "against the reference" in cap.out and "gate eval: 3 image(s)" in cap.out

    meta = json.loads((out / "metrics.json").read_text())
    assert set(meta) == EVAL_KEYS | REF_FIELDS
    assert meta["reference"] == str(teacher) and meta["reference_backend"] == "torch"
    for k in ("psnr_ref", "ssim_ref", "l1_ref"):
        assert meta[k] == noisy_scores[k]  # the library gate and the CLI compute the same
    assert {"psnr_ref", "ssim_ref", "l1_ref"} <= set(meta["definitions"])
    with open(out / "metrics.csv") as f:
        table = list(csv.DictReader(f))
    assert list(table[0]) == ["name", "L1", "PSNR", "SSIM", "psnr_ref", "ssim_ref", "l1_ref"] and len(table) == 3
    # per image, recomputed from the gallery PNGs (the scores are on the 8-bit images)
    for row in table:
        o, r = (M.from_uint8(np.array(Image.open(out / "images" / f"{row['name']}_{k}.png")))
                for k in ("output", "reference"))
        assert float(row["psnr_ref"]) == pytest.approx(float(M.psnr(o, r)[0]), abs=1e-9)
        assert float(row["l1_ref"]) == pytest.approx(float(M.l1(o, r)[0]), abs=1e-12)
    assert np.mean([float(r["psnr_ref"]) for r in table]) == pytest.approx(meta["psnr_ref"], abs=1e-9)
    html = (out / "index.html").read_text()
    assert [Path(s).stem.split("_")[-1] for s in _imgs(html)[:4]] == ["input", "reference", "output", "target"]
    assert len(_imgs(html)) == 12 and 'data-key="psnr_ref"' in html

    with caplog.at_level("WARNING", logger="fastp2p.gate"):
        assert main([*argv, "--min_psnr", high, "--force"]) == 0  # replaces its own earlier report
    assert any("--force" in x.getMessage() for x in caplog.records if x.name == "fastp2p.gate")
    assert "BELOW" in capsys.readouterr().out
    assert main([*argv, "--min_psnr", f"{noisy_scores['psnr_ref'] - 1:.3f}"]) == 0
    assert "passed" in capsys.readouterr().out
    for bad in (["--min_psnr", "30"], ["--force"]):  # a gate needs a reference
        rc = main(["eval", "--checkpoint", str(noisy), "--data", str(pairs), "-o", str(tmp_path / "x"), *bad])
        assert rc == 2 and "--reference" in capsys.readouterr().err


def test_eval_without_reference_is_unchanged(noisy, teacher, pairs, tmp_path):
    plain = evaluate(noisy, pairs, out=tmp_path / "plain", progress=False)
    assert set(json.loads((tmp_path / "plain" / "metrics.json").read_text())) == EVAL_KEYS
    assert (tmp_path / "plain" / "metrics.csv").read_text().splitlines()[0] == "name,L1,PSNR,SSIM"
    html = (tmp_path / "plain" / "index.html").read_text()
    assert len(_imgs(html)) == 9 and "reference" not in html
    assert set(plain["definitions"]) == {"L1", "PSNR", "SSIM", "FID", "LPIPS"}
    assert not any("reference" in p.name for p in (tmp_path / "plain" / "images").iterdir())
    # a reference pass leaves the scores of the generator itself as they were (forked RNG, same seed)
    ref = evaluate(noisy, pairs, out=tmp_path / "ref", reference=teacher, progress=False)
    for k in ("L1", "PSNR", "SSIM"):
        assert ref[k] == plain[k]
    assert [r["L1"] for r in ref["per_image"]] == [r["L1"] for r in plain["per_image"]]


# ---------------------------------------------------------------------------------------------------------------------
# default_gate_data
# ---------------------------------------------------------------------------------------------------------------------
def test_default_gate_data(tmp_path, teacher):
    root = tmp_path / "ds"
    for split in ("train", "val"):
        (root / split).mkdir(parents=True)
    assert gate.default_gate_data(_cfg(str(root))) == root / "val"
    assert gate.default_gate_data(_cfg(str(root / "train"))) == root / "val"  # the train split named itself
    assert gate.default_gate_data(_cfg(str(root / "val"))) == root / "val"  # a split already
    assert gate.default_gate_data(_cfg(None)) is None  # synthetic training
    (tmp_path / "flat").mkdir()
    assert gate.default_gate_data(_cfg(str(tmp_path / "flat"))) is None
    assert gate.default_gate_data({"config": _cfg(str(root)).to_dict()}) == root / "val"  # checkpoint metadata
    ck = save(tmp_path / "c.safetensors", cfg=_cfg(str(root)), G=build_generator("unet_128", ngf=8))
    assert gate.default_gate_data(ck) == root / "val"
    assert gate.default_gate_data(teacher) is None


def test_gate_on_facades_val(facades, teacher, noisy):
    """Real data: the default gate data of a checkpoint trained on facades is its val split, and the gate runs there."""
    ck = save(Path(teacher).with_name("fac.safetensors"), cfg=_cfg(str(facades)), G=build_generator("unet_128", ngf=8))
    data = gate.default_gate_data(ck)
    assert data == facades / "val"
    s = gate.score_against_reference(noisy, teacher, data, max_images=2)
    assert s["images"] == 2 and Path(s["data"]) == facades / "val" and 10 < s["psnr_ref"] < M.PSNR_MAX

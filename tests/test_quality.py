"""bench/quality.py, the generator of docs/quality.md: the agreement verdicts, the baseline trainer's checkpoint and
log, and the doc it writes (the full run is hours of CPU; here a 2-step baseline on real facades pairs)."""

import argparse
import json

import pytest
import torch
from fastp2p.bench import quality

from fastp2p.checkpoint import load_generator
from fastp2p.config import override


def _res(f, b0, b1):
    return {"fastp2p-s0": f, "baseline-s0": b0, "baseline-s1": b1}


def _m(l1, psnr, ssim):
    return {"L1": l1, "PSNR": psnr, "SSIM": ssim, "steps": 1600}


def test_verdicts_noise_and_direction():
    v = quality.verdicts(_res(_m(0.20, 13.0, 0.30), _m(0.19, 13.2, 0.31), _m(0.22, 12.8, 0.29)))
    assert v["L1"]["noise"] == pytest.approx(0.03) and v["L1"]["diff"] == pytest.approx(0.20 - 0.205)
    assert all(x["agree"] for x in v.values())
    # outside the noise and worse: disagree; outside the noise but better than both baselines: agree
    v = quality.verdicts(_res(_m(0.30, 11.0, 0.40), _m(0.19, 13.2, 0.31), _m(0.20, 13.1, 0.30)))
    assert not v["L1"]["agree"] and not v["PSNR"]["agree"]
    assert v["SSIM"]["agree"] and v["SSIM"]["better_than_both"]


def test_baseline_run_checkpoint_and_doc(facades, tmp_path):
    cfg = quality.quality_config(facades, 4, 0, tmp_path, "baseline-s0", amp=False)
    cfg = override(cfg, max_steps=2, log_every=1, num_workers=0)
    summary = quality.train_baseline(cfg)
    assert summary["steps"] == 2
    run = tmp_path / "baseline-s0"
    log = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2] and all(r["lr"] == pytest.approx(2e-4) for r in log)
    G, _ = load_generator(run / "latest_net_G.pth")  # a reference-format checkpoint, as the reference saves it
    assert G.num_downs == 8
    with torch.no_grad():
        y = G.eval()(torch.zeros(1, 3, 256, 256))
    assert y.shape == (1, 3, 256, 256) and torch.isfinite(y).all()

    res = _res(_m(0.20, 13.0, 0.30), _m(0.19, 13.2, 0.31), _m(0.22, 12.8, 0.29))
    doc, grid = tmp_path / "docs" / "quality.md", tmp_path / "docs" / "quality_samples.png"
    args = argparse.Namespace(epochs=4, data=facades)
    quality.write_doc(tmp_path, doc, res, {"baseline-s0": {"s_per_step": 0.5}}, args, grid)
    text = doc.read_text()
    assert "| baseline-s1 |" in text and "Verdict: agree" in text and "quality_samples.png" in text
    assert json.loads((tmp_path / "quality.json").read_text())["verdicts"]["L1"]["agree"] is True

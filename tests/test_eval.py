"""``fastp2p eval`` and ``fastp2p.metrics``: metric values (known cases, scikit-image), the Fréchet distance on known
Gaussians, FID/LPIPS plumbing with tiny TorchScript stand-ins, the report files, engine == checkpoint, CLI errors, and
the trainer's ``--eval_every``."""

from __future__ import annotations

import csv
import json
import math
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import write_smooth_pairs
from PIL import Image

from fastp2p import metrics as M
from fastp2p.checkpoint import load, save
from fastp2p.cli import main
from fastp2p.config import Config, DataConfig, ModelConfig, TrainConfig
from fastp2p.evaluate import InceptionFeatures, TrainEval, evaluate
from fastp2p.models import build_generator


def _batch(rng, n, c, h, w):
    return torch.from_numpy(rng.random((n, c, h, w)))


# ---------------------------------------------------------------------------------------------------------------------
# metrics: known values
# ---------------------------------------------------------------------------------------------------------------------
def test_identical_images():
    x = _batch(np.random.default_rng(0), 2, 3, 32, 40)
    assert M.l1(x, x).tolist() == [0.0, 0.0]
    assert M.psnr(x, x).tolist() == [M.PSNR_MAX] * 2  # capped
    assert math.isinf(M.psnr(x, x, cap=None)[0])
    assert torch.allclose(M.ssim(x, x), torch.ones(2, dtype=torch.float64), atol=1e-12)


@pytest.mark.parametrize("c", [0.01, 0.1, 0.25])
def test_constant_shift(c):
    x = _batch(np.random.default_rng(1), 2, 3, 24, 24) * (1 - c)
    y = x + c
    assert torch.allclose(M.l1(x, y), torch.full((2,), c, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(M.psnr(x, y), torch.full((2,), 10 * math.log10(1 / c**2), dtype=torch.float64), atol=1e-9)
    # a shift changes only the luminance term of SSIM: 2 mx my + C1 / (mx^2 + my^2 + C1) < 1
    assert (M.ssim(x, y) < 1).all() and (M.ssim(x, y) > 0.5).all()


@pytest.mark.parametrize("shape", [(3, 64, 64), (1, 37, 50), (3, 11, 11)])
def test_ssim_and_psnr_match_scikit_image(shape):
    skm = pytest.importorskip("skimage.metrics")
    rng = np.random.default_rng(2)
    c, h, w = shape
    a = rng.random((h, w, c))
    b = np.clip(a + 0.15 * rng.standard_normal(a.shape), 0, 1)
    # and an 8-bit pair, as eval scores them
    a8, b8 = (rng.integers(0, 256, (h, w, c), dtype=np.uint8) for _ in range(2))
    for x, y in ((a, b), (a8 / 255.0, b8 / 255.0)):
        ours_s = M.ssim(torch.from_numpy(x).permute(2, 0, 1)[None], torch.from_numpy(y).permute(2, 0, 1)[None])
        ref_s = skm.structural_similarity(x, y, gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
                                          data_range=1, channel_axis=2)
        assert ours_s.item() == pytest.approx(ref_s, abs=1e-10)
        ours_p = M.psnr(torch.from_numpy(x).permute(2, 0, 1)[None], torch.from_numpy(y).permute(2, 0, 1)[None])
        assert ours_p.item() == pytest.approx(skm.peak_signal_noise_ratio(x, y, data_range=1), abs=1e-9)


def test_from_uint8_scales_to_unit_range():
    img = np.array([[[0, 255, 51]]], dtype=np.uint8)
    assert M.from_uint8(img).flatten().tolist() == [0.0, 1.0, 0.2]


# ---------------------------------------------------------------------------------------------------------------------
# Fréchet distance
# ---------------------------------------------------------------------------------------------------------------------
def test_frechet_distance_closed_form_diagonal():
    rng = np.random.default_rng(3)
    mu1, mu2 = rng.standard_normal(6), rng.standard_normal(6)
    a, b = rng.random(6) + 0.1, rng.random(6) * 3 + 0.1
    expect = np.sum((mu1 - mu2) ** 2) + np.sum(a + b - 2 * np.sqrt(a * b))
    assert M.frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expect, rel=1e-9)
    # 1-D: N(0, 1) vs N(1, 4): 1 + 1 + 4 - 2 * 2
    assert M.frechet_distance([0.0], [[1.0]], [1.0], [[4.0]]) == pytest.approx(2.0, rel=1e-12)


def test_frechet_distance_full_covariances():
    """Tr((S1 S2)^1/2) == Tr((S1^1/2 S2 S1^1/2)^1/2), the symmetric form, for random SPD matrices."""
    rng = np.random.default_rng(4)
    d = 8
    A, B = rng.standard_normal((d, d)), rng.standard_normal((d, d))
    s1, s2 = A @ A.T + 0.1 * np.eye(d), B @ B.T + 0.1 * np.eye(d)
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)

    def psd_sqrt(s):
        w, v = np.linalg.eigh(s)
        return (v * np.sqrt(np.clip(w, 0, None))) @ v.T

    r1 = psd_sqrt(s1)
    expect = np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2) - 2 * np.trace(psd_sqrt(r1 @ s2 @ r1))
    assert M.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expect, rel=1e-9)
    assert M.frechet_distance(mu1, s1, mu1, s1) == pytest.approx(0.0, abs=1e-8)


def test_frechet_distance_of_two_samples_of_one_gaussian_is_near_zero():
    rng = np.random.default_rng(5)
    d = 4
    A = rng.standard_normal((d, d))
    cov, mu = A @ A.T + np.eye(d), rng.standard_normal(d)
    x = rng.multivariate_normal(mu, cov, size=20000)
    y = rng.multivariate_normal(mu, cov, size=20000)
    same = M.fid_from_features(x, y)
    shifted = M.fid_from_features(x, y + 1.0)
    assert 0 <= same < 0.02 * np.trace(cov)
    assert shifted == pytest.approx(same + d, abs=0.1)  # ||(1, 1, 1, 1)||^2 = 4
    mean, c = M.feature_stats(x)
    assert np.allclose(mean, x.mean(0)) and np.allclose(c, np.cov(x, rowvar=False))


# ---------------------------------------------------------------------------------------------------------------------
# fixtures: a tiny checkpoint, aligned pairs, fake TorchScript FID / LPIPS models
# ---------------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("eval")


@pytest.fixture(scope="module")
def ckpt(work) -> Path:
    torch.manual_seed(0)
    G = build_generator("unet_128", ngf=4)
    cfg = Config(ModelConfig(netG="unet_128", ngf=4), DataConfig(crop_size=128, load_size=128, direction="BtoA"))
    return save(work / "G.safetensors", cfg=cfg, G=G)


@pytest.fixture(scope="module")
def pairs(work) -> Path:
    """3 aligned A|B files of 96 x 192: smooth A, B = a brighter copy, so the scores are not noise."""
    return write_smooth_pairs(work / "pairs", 3, 96)


class _FakeInception(torch.nn.Module):
    """Stands in for inception-2015-12-05.pt: same call convention, 2 features (mean, std) per image; checks that it
    gets float 299 x 299 images in [0, 255], as clean-fid feeds it."""

    def forward(self, x: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        assert return_features
        assert x.shape[1] == 3 and x.shape[2] == 299 and x.shape[3] == 299 and x.is_floating_point()
        assert float(x.min()) >= 0.0 and float(x.max()) <= 255.0
        f = x.flatten(1)
        return torch.stack([f.mean(1), f.std(1)], 1)


class _FakeLpips(torch.nn.Module):
    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return (a - b).abs().mean(dim=(1, 2, 3), keepdim=True)  # N,1,1,1 like lpips.LPIPS


@pytest.fixture(scope="module")
def fake_weights(work) -> tuple[Path, Path]:
    fid, lp = work / "inception.pt", work / "lpips.pt"
    torch.jit.script(_FakeInception()).save(str(fid))
    torch.jit.script(_FakeLpips()).save(str(lp))
    return fid, lp


# ---------------------------------------------------------------------------------------------------------------------
# evaluate(): report files, FID/LPIPS plumbing, equivalences
# ---------------------------------------------------------------------------------------------------------------------
class _Gallery(HTMLParser):
    def __init__(self):
        super().__init__()
        self.rows, self.imgs, self.keys, self.external, self.scripts = 0, [], [], [], 0
        self._in_body = False

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "tbody":
            self._in_body = True
        elif tag == "tr" and self._in_body:
            self.rows += 1
        elif tag == "img":
            self.imgs.append(a["src"])
        elif tag == "th" and "data-key" in a:
            self.keys.append(a["data-key"])
        elif tag == "script":
            self.scripts += 1
        for k in ("src", "href"):
            if a.get(k, "").startswith(("http:", "https:", "//")):
                self.external.append(a[k])

    def handle_endtag(self, tag):
        if tag == "tbody":
            self._in_body = False


def test_report_files_fid_and_lpips(ckpt, pairs, fake_weights, tmp_path):
    fid_w, lp_w = fake_weights
    out = tmp_path / "ev"
    r = evaluate(ckpt, pairs, out=out, fid_weights=fid_w, lpips_weights=lp_w, batch_size=2)
    meta = json.loads((out / "metrics.json").read_text())
    for k in ("images", "L1", "PSNR", "SSIM", "FID", "LPIPS", "checkpoint", "engine", "mode", "direction", "data",
              "skipped"):
        assert k in meta, k
    assert meta["images"] == 3 and meta["skipped"] == {} and meta["engine"] is None
    assert meta["mode"] == "paper" and meta["direction"] == "BtoA" and meta["crop_size"] == 128
    rows = r["per_image"]
    assert meta["L1"] == pytest.approx(np.mean([x["L1"] for x in rows]))
    # LPIPS stand-in is the mean |a - b| on [-1, 1]: twice L1 on [0, 1], per image
    for x in rows:
        assert x["LPIPS"] == pytest.approx(2 * x["L1"], rel=1e-5)
    # FID plumbing: recompute from the written PNGs
    feats = InceptionFeatures(fid_w)
    img = {k: np.stack([np.asarray(Image.open(out / "images" / f"{x['name']}_{k}.png")) for x in rows])
           for k in ("output", "target")}
    assert meta["FID"] == pytest.approx(M.fid_from_features(feats(img["output"]), feats(img["target"])), rel=1e-6)
    # the per-image metrics recomputed from the PNGs (metrics are on the 8-bit images)
    o, t = M.from_uint8(img["output"]), M.from_uint8(img["target"])
    assert np.allclose(M.ssim(o, t).tolist(), [x["SSIM"] for x in rows], atol=1e-12)
    # CSV: one row per image, same numbers
    with open(out / "metrics.csv") as f:
        table = list(csv.DictReader(f))
    assert [row["name"] for row in table] == [x["name"] for x in rows] == ["p0", "p1", "p2"]
    assert list(table[0]) == ["name", "L1", "PSNR", "SSIM", "LPIPS"]
    assert [float(row["PSNR"]) for row in table] == [x["PSNR"] for x in rows]
    # gallery: well-formed, one row per image, every image present, sortable, self-contained
    g = _Gallery()
    g.feed((out / "index.html").read_text())
    g.close()
    assert g.rows == 3 and len(g.imgs) == 9
    assert all((out / src).is_file() for src in g.imgs)
    assert g.keys == ["name", "l1", "psnr", "ssim", "lpips"] and g.scripts == 1 and not g.external
    assert Image.open(out / "images" / "p0_output.png").size == (128, 128)


def test_paper_mode_outputs_equal_translate(ckpt, pairs, tmp_path):
    """eval translates exactly as `translate` does (same preprocessing, same seeded paper-mode dropout)."""
    from fastp2p.translate import translate_paths

    state = torch.get_rng_state()
    evaluate(ckpt, pairs, out=tmp_path / "ev", seed=3)
    assert torch.equal(torch.get_rng_state(), state)  # the caller's RNG is left alone
    translate_paths([str(pairs)], ckpt, tmp_path / "tr", seed=3)
    for i in range(3):
        a = np.asarray(Image.open(tmp_path / "ev" / "images" / f"p{i}_output.png"))
        b = np.asarray(Image.open(tmp_path / "tr" / f"p{i}.png"))
        assert np.array_equal(a, b)


def test_onnx_engine_equals_its_checkpoint(ckpt, pairs, work, tmp_path):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    from fastp2p.engines.onnx import export_onnx

    # the TorchScript exporter: ~1.5 s vs ~8 s for dynamo here; which exporter made the file is not what is tested
    onnx_path = export_onnx(ckpt, work / "G_eval.onnx", mode="eval", exporter="torchscript")
    a = evaluate(ckpt, pairs, out=tmp_path / "ckpt", mode="eval")
    b = evaluate(onnx_path, pairs, out=tmp_path / "onnx")
    assert a["checkpoint"] == str(ckpt) and b["engine"] == str(onnx_path) and b["checkpoint"] is None
    assert b["backend"] == "onnxruntime" and b["mode"] == "eval" and b["direction"] == "BtoA"
    # The two float32 outputs differ by summation order only: d <~ 4e-7 (the pessimistic estimate behind FP32_TOL in
    # tests/test_engines.py, 8e-6 relative, on outputs < 0.05 here). So a uint8 value changes, by one level, only
    # where it sits within d of a rounding boundary: a chance <~ 255 d = 1e-4, <~ 5 of the 128*128*3 values of an
    # image. Each moves L1 by 1 / (255 * 49152) = 8e-8, PSNR by ~5e-6 (|error| ~ 0.1, MSE ~ 0.014 here) and SSIM by
    # ~1e-6: abs 1e-4 holds for ~20 of them.
    for x, y in zip(a["per_image"], b["per_image"], strict=True):
        assert x["name"] == y["name"]
        pa, pb = (np.asarray(Image.open(tmp_path / d / "images" / f"{x['name']}_output.png")).astype(int)
                  for d in ("ckpt", "onnx"))
        assert np.abs(pa - pb).max() <= 1
        for k in ("L1", "PSNR", "SSIM"):
            assert x[k] == pytest.approx(y[k], abs=1e-4), (k, x, y)


# ---------------------------------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------------------------------
def test_cli_on_facades_val(facades, ckpt, tmp_path, capsys):
    out = tmp_path / "fac"
    assert main(["eval", "--checkpoint", str(ckpt), "--data", str(facades), "--max_images", "3", "-o", str(out)]) == 0
    cap = capsys.readouterr()
    assert "FID and LPIPS skipped" in cap.err and "--fid_weights" in cap.err and len(cap.err.strip().splitlines()) == 1
    assert "3 image(s)" in cap.out
    meta = json.loads((out / "metrics.json").read_text())
    assert meta["images"] == 3 and Path(meta["data"]) == facades / "val" and meta["FID"] is None
    assert set(meta["skipped"]) == {"FID", "LPIPS"}
    assert 0 < meta["L1"] < 1 and 0 < meta["PSNR"] < 100 and -1 < meta["SSIM"] < 1
    assert len((out / "metrics.csv").read_text().splitlines()) == 4


def _err(capsys, argv, *needles):
    try:
        rc = main(argv)
    except SystemExit as e:  # argparse: usage + one error line, exit 2
        rc = e.code
    assert rc == 2
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if "error:" in ln]
    assert len(lines) == 1 and "Traceback" not in err, err
    for n in needles:
        assert n in lines[0], (n, err)


def test_cli_errors_are_one_line(ckpt, pairs, tmp_path, capsys):
    c = str(ckpt)
    _err(capsys, ["eval", "--checkpoint", c], "--data")
    _err(capsys, ["eval", "--data", str(pairs)], "--checkpoint", "--engine")
    _err(capsys, ["eval", "--checkpoint", c, "--engine", c, "--data", str(pairs)], "--engine")
    _err(capsys, ["eval", "--checkpoint", c, "--data", str(tmp_path / "nope")], "--data", "nope")
    (tmp_path / "empty").mkdir()
    _err(capsys, ["eval", "--checkpoint", c, "--data", str(tmp_path / "empty")], "empty", "no .png")
    _err(capsys, ["eval", "--checkpoint", str(tmp_path / "gone.safetensors"), "--data", str(pairs)], "gone.safetensors")
    _err(capsys, ["eval", "--checkpoint", str(tmp_path / "G.onnx"), "--data", str(pairs)], "--engine")
    _err(capsys, ["eval", "--checkpoint", c, "--data", str(pairs), "--fid_weights", str(tmp_path / "inc.pt"),
                  "-o", str(tmp_path / "o")], "--fid_weights", "inc.pt")
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not torchscript")
    _err(capsys, ["eval", "--checkpoint", c, "--data", str(pairs), "--lpips_weights", str(bad),
                  "-o", str(tmp_path / "o")], "--lpips_weights", "bad.pt")


# ---------------------------------------------------------------------------------------------------------------------
# trainer: --eval_every
# ---------------------------------------------------------------------------------------------------------------------
def _tiny(out: Path, data: str | None = None, **train) -> Config:
    return Config(ModelConfig(netG="unet_128", ngf=4, ndf=4),
                  DataConfig(data=data, load_size=136, crop_size=128, synthetic_size=4, num_workers=0),
                  TrainConfig(**{"out": str(out), "name": "t", "log_every": 2, "sample_every": 100, "save_every": 100,
                                 "max_steps": 3, **train}))


def test_eval_every_logs_records_and_does_not_change_training(tmp_path):
    from fastp2p.train import fit

    fit(_tiny(tmp_path / "plain"), progress=False)
    fit(_tiny(tmp_path / "eval", eval_every=2, eval_max_images=2), progress=False)
    rows = [json.loads(ln) for ln in (tmp_path / "eval" / "t" / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "eval" in r]
    assert [r["step"] for r in evals] == [2, 3]  # every 2 steps, and the final weights
    for r in evals:
        e = r["eval"]
        assert e["images"] == 2 and e["mode"] == "paper" and e["data"] == "synthetic:val"
        assert all(math.isfinite(e[k]) for k in ("L1", "PSNR", "SSIM"))
    assert [r["step"] for r in rows if "eval" not in r] == [2, 3]  # the loss rows are unchanged
    assert (tmp_path / "eval" / "t" / "loss_curve.png").is_file()
    _, a = load(tmp_path / "plain" / "t" / "checkpoints" / "latest.safetensors")
    _, b = load(tmp_path / "eval" / "t" / "checkpoints" / "latest.safetensors")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), "evaluation changed training"


def test_eval_data_defaults_to_the_val_split(facades, pairs, tmp_path, caplog):
    from fastp2p.train import fit

    te = TrainEval.from_config(_tiny(tmp_path, data=str(facades), eval_every=5, eval_max_images=2))
    assert Path(te.where) == facades / "val" and len(te.pairs) == 2
    te = TrainEval.from_config(_tiny(tmp_path, data=str(facades / "train"), eval_every=5))
    assert Path(te.where) == facades / "val" and len(te.pairs) == 50
    assert TrainEval.from_config(_tiny(tmp_path, data=str(facades))) is None  # no --eval_every
    # training data without a val/ split: one warning, no evaluation, training goes on
    with caplog.at_level("WARNING", logger="fastp2p.eval"):
        fit(_tiny(tmp_path / "noval", data=str(pairs), eval_every=1, max_steps=1), progress=False)
    assert any("--eval_data" in r.getMessage() for r in caplog.records)
    assert "eval" not in (tmp_path / "noval" / "t" / "metrics.jsonl").read_text()

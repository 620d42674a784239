"""Progress and pictures (issue 15): progress bars for translate / eval, TensorBoard events, the loss curve with eval
scores and markers, captioned sample grids, the eval gallery's natural order."""

import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fastp2p import report
from fastp2p.checkpoint import save
from fastp2p.cli import main
from fastp2p.config import Config, DataConfig, ModelConfig
from fastp2p.models import build_generator

NAMES = ("10", "2", "1")  # natural order 1, 2, 10; string order 1, 10, 2


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("progress")


@pytest.fixture(scope="module")
def ckpt(work) -> Path:
    torch.manual_seed(0)
    G = build_generator("unet_128", 3, 3, 4, "batch", True)
    cfg = Config(ModelConfig(netG="unet_128", ngf=4), DataConfig(crop_size=128, load_size=128))
    return save(work / "G.safetensors", cfg=cfg, G=G)


@pytest.fixture(scope="module")
def pairs(work) -> Path:
    folder = work / "pairs"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for n in NAMES:
        Image.fromarray(rng.integers(0, 256, (128, 256, 3), dtype=np.uint8)).save(folder / f"{n}.png")
    return folder


# no_progress: --no_progress on a terminal; pipe: stderr is no terminal (a log file, a pipe, pytest's capture)
CASES = {"bar": (True, []), "no_progress": (True, ["--no_progress"]), "pipe": (False, [])}


@pytest.fixture(params=list(CASES))
def case(request, monkeypatch):
    """A function giving (extra argv, whether a bar is expected); it makes the stderr of the test's call (capsys's
    capture, in place only once the test runs) claim to be a terminal where the case says so."""
    tty, argv = CASES[request.param]

    def setup():
        monkeypatch.setattr(sys.stderr, "isatty", lambda: tty)
        return argv, request.param == "bar"
    return setup


def _bar(err: str) -> bool:
    """tqdm's bar for all 3 images: the count and the rate."""
    return bool(re.search(r"3/3 \[.*(img/s|s/img)", err))  # tqdm writes s/img below 1 img/s


def test_translate_folder_progress(ckpt, pairs, tmp_path, capsys, case):
    argv, bar = case()
    assert main(["translate", "--checkpoint", str(ckpt), str(pairs), "-o", str(tmp_path / "o"), *argv]) == 0
    cap = capsys.readouterr()
    assert cap.out.strip().splitlines() == [f"wrote 3 image(s) to {tmp_path / 'o'}"]  # stdout stays clean
    assert _bar(cap.err) == bar, cap.err
    assert ("translate" in cap.err) == bar


def test_eval_progress_and_gallery(ckpt, pairs, tmp_path, capsys, case):
    argv, bar = case()
    out = tmp_path / "ev"
    assert main(["eval", "--checkpoint", str(ckpt), "--data", str(pairs), "-o", str(out), *argv]) == 0
    cap = capsys.readouterr()
    lines = cap.out.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("eval: 3 image(s)") and "img/s" not in cap.out
    assert _bar(cap.err) == bar, cap.err
    if not bar:  # the one message line (FID / LPIPS skipped) stays alone on stderr
        assert len(cap.err.strip().splitlines()) == 1, cap.err
    page = (out / "index.html").read_text()
    rows = re.findall(r'<tr data-name="([^"]+)"', page)
    assert rows == ["1", "2", "10"]  # natural order, whatever order the pairs were scored in
    assert "images/</code> beside this page" in page
    assert all(f'src="images/{n}_output.png"' in page and (out / "images" / f"{n}_output.png").is_file()
               for n in NAMES)
    assert re.search(r"img \{[^}]*width: 256px", page)


def test_natural_key():
    from fastp2p.evaluate import natural_key

    names = ["img10.jpg", "img2.jpg", "IMG1.jpg", "a", "img2b.jpg", "10", "9"]
    assert sorted(names, key=natural_key) == ["9", "10", "a", "IMG1.jpg", "img2.jpg", "img2b.jpg", "img10.jpg"]


# ---------------------------------------------------------------------------------------------------------------------
# sample grids
# ---------------------------------------------------------------------------------------------------------------------
def _rows(h=32, n=2):
    g = torch.Generator().manual_seed(0)
    return [torch.rand(n, 3, h, h, generator=g) * 2 - 1 for _ in range(3)]


@pytest.mark.parametrize("size", [32, 128])  # labels shortened to A / G(A) / B when a column is narrow
def test_grid_caption(size):
    rows = _rows(size)
    plain = np.asarray(report.grid_image(rows))
    cap = np.asarray(report.grid_image(rows, caption="step 7", labels=report.SAMPLE_LABELS))
    other = np.asarray(report.grid_image(rows, caption="step 8000", labels=report.SAMPLE_LABELS))
    assert plain.shape == (2 * size, 3 * size, 3)
    band = cap.shape[0] - plain.shape[0]
    assert band >= 16 and cap.shape[1] == plain.shape[1]
    assert np.array_equal(cap[band:], plain)  # the grid itself untouched, below the band
    assert (cap[:band] < 128).any() and (cap[:band] == 255).mean() > 0.5  # dark text on white
    assert not np.array_equal(cap[:band], other[:band])  # the step is written
    # every column block gets its label: dark pixels in each third of the label line
    label_line = cap[band // 2:band]
    assert all((label_line[:, i * size:(i + 1) * size] < 128).any() for i in range(3))


# ---------------------------------------------------------------------------------------------------------------------
# loss curve
# ---------------------------------------------------------------------------------------------------------------------
C0 = np.array([31, 119, 180])  # matplotlib's first line colour


def _blue_pixels(path: Path) -> int:
    img = np.asarray(Image.open(path).convert("RGB")).astype(int)
    return int((np.abs(img - C0).sum(axis=2) < 60).sum())


def test_loss_curve_one_row_and_eval(tmp_path):
    row = {"step": 5, "loss_D": 0.7, "loss_G_GAN": 0.9, "loss_G_L1": 20.0}
    ev = [{"step": 5, "eval": {"L1": 0.2, "PSNR": 14.0, "SSIM": 0.3}}]
    one = tmp_path / "one.png"
    assert report.plot_metrics([row], [], one) == list(report.LOSS_KEYS)
    both = tmp_path / "both.png"
    assert report.plot_metrics([row], ev, both) == [*report.LOSS_KEYS, "eval L1", "eval PSNR", "eval SSIM"]
    h1, h2 = Image.open(one).size[1], Image.open(both).size[1]
    assert h2 == 2 * h1  # a second row of panels
    # a single point is drawn (a marker), in every panel: 3 resp. 6 of them
    n1, n2 = _blue_pixels(one), _blue_pixels(both)
    assert n1 > 0 and n2 > 1.5 * n1
    # through the reporter, from metrics.jsonl (with a line cut short by a kill)
    (tmp_path / "metrics.jsonl").write_text(json.dumps(row) + "\n" + json.dumps(ev[0]) + '\n{"step": 6, "lo')
    rep = report.RunReporter.__new__(report.RunReporter)
    rep.run_dir, rep.metrics_path = tmp_path, tmp_path / "metrics.jsonl"
    assert rep.loss_curve() == tmp_path / "loss_curve.png"
    assert Image.open(tmp_path / "loss_curve.png").size == Image.open(both).size


# ---------------------------------------------------------------------------------------------------------------------
# TensorBoard
# ---------------------------------------------------------------------------------------------------------------------
TRAIN = ["train", "--preset", "debug", "--ngf", "4", "--ndf", "4", "--num_workers", "0", "--no_progress",
         "--log_every", "1", "--sample_every", "2", "--save_every", "100", "--eval_every", "2",
         "--eval_max_images", "2"]


def _events(run: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    return acc


@pytest.mark.slow
def test_train_tensorboard(tmp_path, capsys):
    pytest.importorskip("tensorboard")
    out = tmp_path / "runs"
    assert main(TRAIN + ["--max_steps", "3", "--out", str(out), "--name", "tb", "--tensorboard"]) == 0
    run = out / "tb"
    acc = _events(run)
    tags = acc.Tags()
    want = {f"train/{k}" for k in report.ROW_SCALARS} | {f"eval/{k}" for k in report.EVAL_KEYS}
    assert want <= set(tags["scalars"]), tags["scalars"]
    assert "samples" in tags["images"]
    metrics = [json.loads(s) for s in (run / "metrics.jsonl").read_text().splitlines()]
    loss_rows = [r for r in metrics if "eval" not in r]
    assert [e.step for e in acc.Scalars("train/loss_D")] == [r["step"] for r in loss_rows] == [1, 2, 3]
    assert [e.value for e in acc.Scalars("train/loss_G_L1")] == pytest.approx([r["loss_G_L1"] for r in loss_rows])
    evals = [r for r in metrics if "eval" in r]
    assert [e.step for e in acc.Scalars("eval/PSNR")] == [r["step"] for r in evals] == [2, 3]
    assert [e.value for e in acc.Scalars("eval/PSNR")] == pytest.approx([r["eval"]["PSNR"] for r in evals])
    assert [e.step for e in acc.Images("samples")] == [2, 3]
    # the sample grid on disk carries its caption band; the loss curve has its eval row
    grid = Image.open(run / "samples" / "step_0000002.png")
    assert grid.size[0] == 3 * 128 and grid.size[1] > 128
    assert Image.open(run / "loss_curve.png").size[1] == 640  # two rows of 3.2 in at 100 dpi
    # a resume appends: steps 4..5 after 1..3, none twice
    capsys.readouterr()
    assert main(TRAIN + ["--max_steps", "5", "--out", str(out), "--name", "tb", "--resume"]) == 0
    steps = [e.step for e in _events(run).Scalars("train/loss_D")]
    assert steps == [1, 2, 3, 4, 5]


def test_no_tensorboard_flag_writes_none(tmp_path, capsys):
    out = tmp_path / "runs"
    assert main(["train", "--preset", "debug", "--ngf", "4", "--ndf", "4", "--num_workers", "0", "--no_progress",
                 "--max_steps", "1", "--out", str(out), "--name", "x", "--no-tensorboard"]) == 0
    assert not (out / "x" / "tensorboard").exists() and (out / "x" / "samples" / "step_0000001.png").is_file()


def _one_error(capsys, argv, *needles):
    rc = main(argv)
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert rc == 2 and len(err) == 1 and err[0].startswith("fastp2p: error: "), err
    for n in needles:
        assert n in err[0], (n, err[0])


def test_missing_packages(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import now raises ImportError
    argv = TRAIN + ["--max_steps", "1", "--out", str(tmp_path / "runs"), "--name", "m"]
    _one_error(capsys, argv + ["--tensorboard"], "--tensorboard", 'pip install "fastp2p[tensorboard]"')
    assert not (tmp_path / "runs" / "m").exists()
    assert report.tensorboard_on(None) is False  # the default: off without the package, no error
    try:
        import wandb  # noqa: F401
    except ImportError:
        _one_error(capsys, argv + ["--no-tensorboard", "--wandb"], "--wandb", "pip install wandb")

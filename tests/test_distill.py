"""``fastp2p distill``: a narrower student from a teacher checkpoint, trained by fit()'s loop (fastp2p.distill).

Teacher: two fit() steps of a ngf-8 unet_128 on the built-in synthetic pairs (built once per module); students ngf 4,
a few steps each."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal

import pytest
import torch
from safetensors.torch import load_file

from fastp2p import checkpoint
from fastp2p.cli.main import main
from fastp2p.config import Config, DataConfig, DistillConfig, ModelConfig, TrainConfig
from fastp2p.distill import DistillReporter, DistillTrainer, distill, layer_channels, student_config
from fastp2p.errors import UserError
from fastp2p.models import build_generator
from fastp2p.train import fit

SMALL = {"num_workers": 0, "synthetic_size": 4, "log_every": 2, "sample_every": 100, "save_every": 100,
         "tensorboard": False, "save_epoch_freq": 0}


def _teacher(root, name: str, seed: int = 0):
    cfg = Config(ModelConfig(netG="unet_128", ngf=8, ndf=8),
                 DataConfig(load_size=136, crop_size=128, synthetic_size=4, num_workers=0),
                 TrainConfig(out=str(root), name=name, max_steps=2, seed=seed, log_every=2, sample_every=100,
                             save_every=100, tensorboard=False, save_epoch_freq=0))
    fit(cfg, progress=False)
    return root / name / "checkpoints" / "latest.safetensors"


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    return _teacher(tmp_path_factory.mktemp("teacher"), "t")


def _cfg(teacher, out, name="s", **flags):
    return student_config(teacher, 4, out=str(out), name=name, **{**SMALL, **flags})


def _rows(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _state(run):
    """(weights, training state) tensors of a run's latest checkpoint."""
    ckpt = run / "checkpoints" / "latest.safetensors"
    return load_file(str(ckpt)), load_file(str(checkpoint.state_path(ckpt, checkpoint.read_meta(ckpt))))


def _assert_same(a, b):
    for x, y in zip(a, b, strict=True):
        assert x.keys() == y.keys()
        for k in x:
            if k != "rng.torch":
                assert torch.equal(x[k], y[k]), k


@pytest.fixture(scope="module")
def straight(teacher, tmp_path_factory):
    """A 4-step distillation in one go: what the resumed and interrupted runs must reproduce."""
    out = tmp_path_factory.mktemp("straight")
    summary = distill(_cfg(teacher, out, max_steps=4), progress=False)
    return out / "s", summary


def test_writes_an_ordinary_student_checkpoint(teacher, straight, tmp_path):
    run, summary = straight
    ckpt = run / "checkpoints" / "latest.safetensors"
    assert summary["steps"] == 4 and summary["checkpoint"] == str(ckpt)
    G, cfg = checkpoint.load_generator(ckpt)
    assert cfg.model.ngf == 4 and cfg.model.netG == "unet_128" and cfg.distill.teacher_ngf == 8
    assert cfg.distill.teacher_sha256 == checkpoint.file_hash(teacher)
    # the generator is the plain ngf-4 U-Net: the adapters live in the training state only
    weights, state = _state(run)
    assert {k[2:] for k in weights if k.startswith("G.")} == set(build_generator("unet_128", ngf=4).state_dict())
    assert all(k.startswith(("G.", "D.")) for k in weights)
    adapters = {k: v for k, v in state.items() if k.startswith("adapter.")}
    assert len(adapters) == 2 * 4  # weight + bias for each of down2, down4, up3, up5
    assert adapters["adapter.0.weight"].shape == (layer_channels(8, "down2"), layer_channels(4, "down2"), 1, 1)
    # metrics.jsonl: pix2pix's loss rows and, after each, the distillation terms
    rows = _rows(run)
    losses = [r for r in rows if "loss_G_L1" in r]
    terms = [r["distill"] for r in rows if "distill" in r]
    assert [r["step"] for r in losses] == [2, 4] and len(terms) == 2
    for t in terms:
        assert t["loss_G_teacher"] > 0 and math.isfinite(t["loss_G_teacher"])
        assert t["loss_G_feat"] > 0 and math.isfinite(t["loss_G_feat"])
    assert summary["loss_G_teacher"] == terms[-1]["loss_G_teacher"]
    # translate and export take it as any checkpoint
    pairs = tmp_path / "in"
    pairs.mkdir()
    from PIL import Image

    Image.new("RGB", (256, 128), (90, 140, 200)).save(pairs / "p.png")
    assert main(["translate", str(pairs), "--checkpoint", str(ckpt), "-o", str(tmp_path / "o"), "--mode",
                 "eval"]) == 0
    assert Image.open(tmp_path / "o" / "p.png").size == (128, 128)
    pytest.importorskip("onnx")
    assert main(["export", str(ckpt), "-o", str(tmp_path / "G.onnx"), "--mode", "eval"]) == 0
    assert (tmp_path / "G.onnx").stat().st_size > 0


def test_teacher_is_untouched_and_its_targets_deterministic(teacher, straight):
    before = load_file(str(teacher))
    tr = DistillTrainer(_cfg(teacher, straight[0].parent, name="unused", discriminator="teacher"), "cpu")
    # D starts as the teacher's (--discriminator teacher) or fresh
    assert all(torch.equal(tr.D.state_dict()[k[2:]], v) for k, v in before.items() if k.startswith("D."))
    fresh = DistillTrainer(_cfg(teacher, straight[0].parent, name="unused", discriminator="fresh"), "cpu")
    assert not all(torch.equal(fresh.D.state_dict()[k[2:]], v) for k, v in before.items() if k.startswith("D."))
    A, B = (torch.rand(1, 3, 128, 128) * 2 - 1 for _ in range(2))
    for _ in range(2):
        losses = tr.train_step(A, B)
    assert losses.loss_G_teacher > 0 and losses.loss_G_feat > 0
    # training moved the student and D, never the teacher (frozen: no gradients, running statistics untouched)
    sd = tr.T.state_dict()
    assert all(not p.requires_grad for p in tr.T.parameters())
    assert all(torch.equal(sd[k[2:]], v) for k, v in before.items() if k.startswith("G.") and k[2:] in sd)
    assert not all(torch.equal(tr.D.state_dict()[k[2:]], v) for k, v in before.items() if k.startswith("D."))
    with torch.no_grad():
        assert torch.equal(tr.T(A), tr.T(A))  # paper mode without dropout: the same target every time
    # and distilling wrote nothing into the teacher's file: its hash is the one recorded before the run
    recorded = Config.from_dict(json.loads((straight[0] / "config.json").read_text())).distill.teacher_sha256
    assert checkpoint.file_hash(teacher) == recorded


def test_resume_is_exact(teacher, straight, tmp_path):
    distill(_cfg(teacher, tmp_path, max_steps=2), progress=False)
    resumed = distill(_cfg(teacher, tmp_path, max_steps=4, resume=True), progress=False)
    assert resumed["steps"] == 4
    _assert_same(_state(tmp_path / "s"), _state(straight[0]))


class _TermAt2(DistillReporter):
    """Sends this process a SIGTERM after step 2, as a scheduler would."""

    def step(self, trainer, *args, **kwargs):
        super().step(trainer, *args, **kwargs)
        if trainer.step == 2:
            os.kill(os.getpid(), signal.SIGTERM)


def test_sigterm_saves_at_the_step_boundary_and_resumes(teacher, straight, tmp_path):
    summary = fit(_cfg(teacher, tmp_path, max_steps=4), progress=False, trainer_factory=DistillTrainer,
                  reporter_factory=_TermAt2)
    assert summary["interrupted"] == "SIGTERM" and summary["steps"] == 2
    assert checkpoint.read_meta(tmp_path / "s" / "checkpoints" / "latest.safetensors")["step"] == 2
    distill(_cfg(teacher, tmp_path, max_steps=4, resume=True), progress=False)
    _assert_same(_state(tmp_path / "s"), _state(straight[0]))


def test_resume_refuses_another_teacher_or_other_settings(teacher, straight, tmp_path_factory):
    other = _teacher(tmp_path_factory.mktemp("other"), "t2", seed=1)
    out = straight[0].parent
    with pytest.raises(UserError, match="sha256"):
        distill(_cfg(other, out, max_steps=6, resume=True), progress=False)
    with pytest.raises(UserError, match="--lambda_feat"):
        distill(_cfg(teacher, out, max_steps=6, resume=True, lambda_feat=0.5), progress=False)


def test_student_must_be_narrower(teacher, tmp_path):
    for ngf in (8, 16):
        with pytest.raises(UserError, match=f"--ngf {ngf}: the teacher .* has ngf 8"):
            student_config(teacher, ngf, out=str(tmp_path))
    assert student_config(teacher, out=str(tmp_path)).model.ngf == 2  # default: a quarter of the teacher's


def test_bad_feat_layers(teacher, tmp_path):
    for spec in ("up1", "down8", "mid3", "up3,up3"):
        with pytest.raises(UserError, match="--feat_layers"):
            student_config(teacher, 4, out=str(tmp_path), feat_layers=spec)


def _one_error_line(capsys, argv, *needles):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("fastp2p: error: "), err
    for n in needles:
        assert n in err[0], (n, err)


def test_bad_teacher_is_one_line(teacher, tmp_path, capsys):
    out = ["--out", str(tmp_path / "runs"), "--no_progress"]
    _one_error_line(capsys, ["distill", *out], "--teacher", "required")
    _one_error_line(capsys, ["distill", "--teacher", str(tmp_path / "none.safetensors"), *out], "--teacher",
                    "none.safetensors")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a checkpoint")
    _one_error_line(capsys, ["distill", "--teacher", str(junk), *out], "junk.safetensors")
    pth = tmp_path / "latest_net_G.pth"
    torch.save(build_generator("unet_128", ngf=8).state_dict(), pth)
    _one_error_line(capsys, ["distill", "--teacher", str(pth), *out], "latest_net_G.pth", "convert")
    onnx = tmp_path / "G.onnx"
    onnx.write_bytes(b"x")
    _one_error_line(capsys, ["distill", "--teacher", str(onnx), *out], "G.onnx", ".safetensors")
    _one_error_line(capsys, ["distill", "--teacher", str(tmp_path), *out], "--teacher", "folder")
    _one_error_line(capsys, ["distill", "--teacher", str(teacher), "--ngf", "8", *out], "--ngf 8", "narrower")
    # --discriminator teacher with a teacher checkpoint that has no discriminator (a converted .pth): use fresh
    g_only = tmp_path / "g_only.safetensors"
    G, cfg = checkpoint.load_generator(teacher)
    checkpoint.save(g_only, cfg=cfg, G=G)
    _one_error_line(capsys, ["distill", "--teacher", str(g_only), "--discriminator", "teacher", "--max_steps", "1",
                             *out], "--discriminator fresh")


def test_ordinary_config_has_no_distill_section():
    cfg = Config()
    assert cfg.distill is None and Config.from_dict(cfg.to_dict()) == cfg
    d = dataclasses.replace(cfg, distill=DistillConfig(teacher="t.safetensors"))
    assert Config.from_dict(json.loads(json.dumps(d.to_dict()))) == d


def test_cli_run_then_resume_from_the_runs_own_settings(teacher, tmp_path, capsys, tmp_path_factory):
    out = tmp_path / "runs"
    small = ["--out", str(out), "--num_workers", "0", "--no-tensorboard", "--log_every", "1", "--save_epoch_freq",
             "0", "--no_progress"]
    assert main(["distill", "--teacher", str(teacher), "--ngf", "4", "--lambda_feat", "0.5", "--name", "c",
                 "--max_steps", "1", *small]) == 0
    capsys.readouterr()
    # --resume needs neither --teacher nor the distill settings: the run's config holds them
    assert main(["distill", "--name", "c", "--resume", "--max_steps", "2", *small]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["steps"] == 2 and summary["teacher"] == str(teacher)
    ckpt = out / "c" / "checkpoints" / "latest.safetensors"
    cfg = Config.from_dict(checkpoint.read_meta(ckpt)["config"])
    assert cfg.distill.lambda_feat == 0.5 and cfg.model.ngf == 4
    other = _teacher(tmp_path_factory.mktemp("other_cli"), "t3", seed=2)
    _one_error_line(capsys, ["distill", "--name", "c", "--resume", "--teacher", str(other), "--max_steps", "3",
                             *small], "--teacher", "sha256")
    _one_error_line(capsys, ["distill", "--name", "c", "--resume", "--ngf", "2", *small], "--ngf")


def test_record_scores_keeps_the_checkpoint_whole(straight, tmp_path):
    import shutil

    from fastp2p.distill import record_scores

    src = straight[0] / "checkpoints"
    ckpt = tmp_path / "latest.safetensors"
    for p in src.glob("latest*"):
        shutil.copy(p, tmp_path / p.name)
    before = load_file(str(ckpt))
    record_scores(ckpt, {"psnr_ref": 31.5, "passed": True})
    meta = checkpoint.read_meta(ckpt)
    assert meta["quality"] == {"psnr_ref": 31.5, "passed": True}
    assert json.loads(ckpt.with_suffix(".json").read_text())["quality"]["psnr_ref"] == 31.5
    after = load_file(str(ckpt))
    assert all(torch.equal(before[k], after[k]) for k in before) and before.keys() == after.keys()
    checkpoint.load_state(ckpt, meta)  # the training state it names still belongs to it
    assert checkpoint.load_generator(ckpt)[1].model.ngf == 4


def test_quality_gate_scores_the_student_against_its_teacher(teacher, tmp_path, capsys):
    from PIL import Image

    val = tmp_path / "val"
    val.mkdir()
    g = torch.Generator().manual_seed(0)
    for i in range(2):
        arr = (torch.rand(128, 256, 3, generator=g) * 255).to(torch.uint8).numpy()
        Image.fromarray(arr).save(val / f"{i}.png")
    small = ["--teacher", str(teacher), "--ngf", "4", "--max_steps", "1", "--out", str(tmp_path / "runs"),
             "--num_workers", "0", "--no-tensorboard", "--save_epoch_freq", "0", "--no_progress", "--gate_data",
             str(val)]
    # below the bar: exit 2 with one line naming --min_psnr; the run's checkpoint stays, the failed scores recorded
    assert main(["distill", *small, "--name", "a", "--min_psnr", "99"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].count("\n") == 0 and "--min_psnr 99" in err[-1] and "--force" in err[-1]
    assert any(line.startswith("gate student: 2 image(s)") for line in err)
    q = checkpoint.read_meta(tmp_path / "runs" / "a" / "checkpoints" / "latest.safetensors")["quality"]
    assert q["passed"] is False and q["min_psnr"] == 99 and q["images"] == 2 and 0 < q["psnr_ref"] < 99
    # --force keeps it (exit 0); the scores equal a separate gate run on the same files
    assert main(["distill", *small, "--name", "b", "--min_psnr", "99", "--force"]) == 0
    ckpt = tmp_path / "runs" / "b" / "checkpoints" / "latest.safetensors"
    q = checkpoint.read_meta(ckpt)["quality"]
    from fastp2p.gate import score_against_reference

    again = score_against_reference(ckpt, teacher, val)
    assert q["passed"] is False and q["psnr_ref"] == pytest.approx(again["psnr_ref"], abs=1e-9)
    # --no_gate: nothing scored, nothing recorded
    assert main(["distill", *small, "--name", "c", "--no_gate"]) == 0
    assert "quality" not in checkpoint.read_meta(tmp_path / "runs" / "c" / "checkpoints" / "latest.safetensors")

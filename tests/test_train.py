import dataclasses
import json

import pytest
import torch
from torch import nn

from fastp2p.config import Config, DataConfig, ModelConfig, TrainConfig, override
from fastp2p.losses import lr_factor
from fastp2p.models import build_discriminator, keys
from fastp2p.models.reference import RefUnetGenerator
from fastp2p.train import Trainer, fit


def tiny_cfg(tmp_path, **train) -> Config:
    return Config(
        ModelConfig(netG="unet_128", ngf=4, ndf=4, norm="batch"),
        DataConfig(load_size=136, crop_size=128, synthetic_size=6, num_workers=0),
        TrainConfig(out=str(tmp_path), name="t", log_every=2, sample_every=3, save_every=100, **train),
    )


def reference_step(G, D, opt_G, opt_D, A, B, lambda_L1=100.0):
    """The reference's Pix2PixModel.optimize_parameters, written out by hand."""
    bce = nn.BCEWithLogitsLoss()
    fake = G(A)
    for p in D.parameters():
        p.requires_grad = True
    opt_D.zero_grad()
    pred_fake = D(torch.cat((A, fake), 1).detach())
    loss_D_fake = bce(pred_fake, torch.tensor(0.0).expand_as(pred_fake))
    pred_real = D(torch.cat((A, B), 1))
    loss_D_real = bce(pred_real, torch.tensor(1.0).expand_as(pred_real))
    loss_D = (loss_D_fake + loss_D_real) * 0.5
    loss_D.backward()
    opt_D.step()
    for p in D.parameters():
        p.requires_grad = False
    opt_G.zero_grad()
    pred_fake = D(torch.cat((A, fake), 1))
    loss_G_GAN = bce(pred_fake, torch.tensor(1.0).expand_as(pred_fake))
    loss_G_L1 = nn.L1Loss()(fake, B) * lambda_L1
    (loss_G_GAN + loss_G_L1).backward()
    opt_G.step()
    return loss_D.item(), loss_G_GAN.item(), loss_G_L1.item()


@pytest.mark.parametrize("norm,dropout", [("batch", True), ("instance", False)])
def test_train_step_equals_hand_written_reference_step(tmp_path, norm, dropout):
    cfg = tiny_cfg(tmp_path)
    cfg = override(cfg, norm=norm, no_dropout=not dropout)
    tr = Trainer(cfg, "cpu")
    G = RefUnetGenerator(3, 3, 7, 4, norm, use_dropout=dropout)
    G.load_state_dict(keys.to_reference(tr.G.state_dict(), 7))
    D = build_discriminator("basic", 6, 4, norm=norm, init=False)
    D.load_state_dict(tr.D.state_dict())
    # Both sides in float64. Adam's step m / (sqrt(v) + eps) is ~lr = 2e-4 whatever the gradient's size, and near a
    # zero gradient it moves by lr * dg / eps for a gradient difference dg (eps = 1e-8). In float32 the two sides' sums
    # (GEMM convs + fused Adam here, oneDNN + for-loop Adam in the reference; both orders depend on the CPU's ISA,
    # kernels and threads) differ by dg ~ 2^-24 x the gradient's terms, ~1e-9: a tenth of a step or more on whichever
    # elements happen to have a near-zero gradient on that CPU, and full steps on the biases before an instance norm
    # (true gradient exactly 0). In float64, dg <= gamma_n x the sum of the terms' |.| <= 16384 x 2^-53 x 50 = 1e-10
    # (n <= 128*128 positions; that sum is < 50 for every bias here), so such an element moves by at most
    # lr dg / eps = 1e-2 of a step, on any CPU. What remains is the trainer's L1 loss, computed in float32
    # (fake.float()): that scales the L1 gradient by 1 + O(2^-24), a fixed factor, the same on every CPU.
    # (tr.G.double() keeps the Parameter objects, so the trainer's optimizers still hold them.)
    for m in (tr.G, tr.D, G, D):
        m.double()
    opt_G = torch.optim.Adam(G.parameters(), lr=2e-4, betas=(0.5, 0.999))
    opt_D = torch.optim.Adam(D.parameters(), lr=2e-4, betas=(0.5, 0.999))
    for _step in range(3):
        A, B = (torch.rand(1, 3, 128, 128, dtype=torch.float64) * 2 - 1 for _ in range(2))
        rng = torch.get_rng_state()
        ref = reference_step(G, D, opt_G, opt_D, A, B)
        torch.set_rng_state(rng)  # same dropout masks for both
        got = tr.train_step(A, B)
        # loss_G_L1 is a float32 mean here (|rounding| <= ~log2(n) 2^-24 = 1e-6 relative, torch sums pairwise)
        assert got.loss_D.item() == pytest.approx(ref[0], rel=1e-4)
        assert got.loss_G_GAN.item() == pytest.approx(ref[1], rel=1e-4)
        assert got.loss_G_L1.item() == pytest.approx(ref[2], rel=1e-4)
    # Every parameter and buffer, the biases before instance norms included, within 10% of one Adam step (a wrong
    # loss term, lr, beta or update order moves weights by whole steps).
    assert all(p.dtype == torch.float64 for p in tr.G.parameters())
    ours = keys.to_reference(tr.G.state_dict(), 7)
    for k, v in G.state_dict().items():
        torch.testing.assert_close(ours[k], v, rtol=0, atol=2e-5, msg=lambda m, k=k: f"{k}: {m}")
    for k, v in D.state_dict().items():
        torch.testing.assert_close(tr.D.state_dict()[k], v, rtol=0, atol=2e-5, msg=lambda m, k=k: f"{k}: {m}")


def test_linear_lr_policy_matches_reference_formula():
    # reference: 1 - max(0, epoch + epoch_count - n_epochs) / (n_epochs_decay + 1), epoch_count = 1, epoch 0-based
    assert [lr_factor("linear", e, 100, 100) for e in (0, 98, 99, 100, 199)] == pytest.approx(
        [1.0, 1.0, 1.0 - 0 / 101, 1.0 - 1 / 101, 1.0 - 100 / 101])
    assert lr_factor("step", 49, 1, 1, 50) == 1.0 and lr_factor("step", 50, 1, 1, 50) == pytest.approx(0.1)
    assert lr_factor("cosine", 0, 10, 0) == 1.0 and lr_factor("cosine", 10, 10, 0) == pytest.approx(0.0)


@pytest.mark.parametrize("native_bf16", [True, False], ids=["bf16-cpu", "no-bf16-cpu"])
def test_amp_step_runs_and_is_finite(tmp_path, monkeypatch, native_bf16):
    # --amp on a CPU picks bf16 autocast or fp32 by the CPU's features (perf.cpu_has_native_bf16): both paths here,
    # whatever this CPU has (bf16 autocast runs on any x86-64 CPU, emulated where it has no bf16 units).
    from fastp2p import perf

    monkeypatch.setattr(perf, "cpu_has_native_bf16", lambda: native_bf16)
    tr = Trainer(dataclasses.replace(tiny_cfg(tmp_path), train=dataclasses.replace(tiny_cfg(tmp_path).train,
                                                                                   amp=True)), "cpu")
    assert tr.dtype == (torch.bfloat16 if native_bf16 else None)
    for _ in range(2):
        out = tr.train_step(torch.randn(1, 3, 128, 128).clamp(-1, 1), torch.randn(1, 3, 128, 128).clamp(-1, 1))
    assert all(torch.isfinite(v) for v in (out.loss_D, out.loss_G_GAN, out.loss_G_L1))
    assert tr.G.down[0].weight.dtype == torch.float32  # master weights stay fp32


def _weights(run_dir):
    from safetensors.torch import load_file

    return load_file(str(run_dir / "checkpoints" / "latest.safetensors"))


def test_resume_is_exact(tmp_path):
    n = 4
    straight = fit(tiny_cfg(tmp_path / "a", max_steps=2 * n), progress=False)
    assert straight["steps"] == 2 * n
    fit(tiny_cfg(tmp_path / "b", max_steps=n), progress=False)
    resumed = fit(tiny_cfg(tmp_path / "b", max_steps=2 * n, resume=True), progress=False)
    assert resumed["steps"] == 2 * n
    wa, wb = _weights(tmp_path / "a" / "t"), _weights(tmp_path / "b" / "t")
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


def test_run_folder_contents(tmp_path):
    fit(tiny_cfg(tmp_path, max_steps=6), progress=False)
    run = tmp_path / "t"
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [2, 4, 6]
    for key in ("step", "epoch", "loss_D", "loss_G_GAN", "loss_G_L1", "lr", "img_per_s", "data_wait_frac"):
        assert key in rows[0]
    assert 0.0 <= rows[-1]["data_wait_frac"] <= 1.0
    assert sorted(p.name for p in (run / "samples").iterdir()) == ["step_0000003.png", "step_0000006.png"]
    assert (run / "loss_curve.png").stat().st_size > 1000
    meta = json.loads((run / "checkpoints" / "latest.json").read_text())
    assert meta["step"] == 6 and meta["preprocessing"]["crop_size"] == 128
    assert json.loads((run / "config.json").read_text())["model"]["ngf"] == 4


def test_existing_run_needs_resume(tmp_path):
    from fastp2p.errors import UserError

    fit(tiny_cfg(tmp_path, max_steps=1), progress=False)
    with pytest.raises(UserError, match="--resume"):
        fit(tiny_cfg(tmp_path, max_steps=2), progress=False)


@pytest.mark.slow
def test_loss_decreases_on_facades_subset(tmp_path, facades):
    import shutil

    sub = tmp_path / "facades" / "train"
    sub.mkdir(parents=True)
    for i in range(1, 9):
        shutil.copy(facades / "train" / f"{i}.jpg", sub / f"{i}.jpg")
    cfg = Config(ModelConfig(netG="unet_128", ngf=16, ndf=16),
                 DataConfig(data=str(tmp_path / "facades"), direction="BtoA", load_size=128, crop_size=128,
                            num_workers=0, no_flip=True),
                 TrainConfig(out=str(tmp_path), name="f", max_steps=160, log_every=40, sample_every=1000, seed=1))
    fit(cfg, progress=False)
    rows = [json.loads(line) for line in (tmp_path / "f" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["loss_G_L1"] < 0.8 * rows[0]["loss_G_L1"], rows


def test_triton_kernels_step_matches_torch_step(tmp_path):
    """--kernels triton (interpreted on CPU) trains the same step as PyTorch's norm + activation modules."""
    pytest.importorskip("triton")
    from fastp2p.kernels import FusedNormAct

    A, B = torch.rand(1, 3, 128, 128) * 2 - 1, torch.rand(1, 3, 128, 128) * 2 - 1
    out = {}
    for backend in ("torch", "triton"):
        cfg = override(tiny_cfg(tmp_path), kernels=backend, no_dropout=True)
        tr = Trainer(cfg, "cpu")
        assert any(isinstance(m, FusedNormAct) for m in tr.G.modules()) == (backend == "triton")
        losses = [tr.train_step(A, B) for _ in range(2)]
        out[backend] = (losses, tr.G.state_dict())
    # Losses only (see test_train_step_equals_hand_written_reference_step for why float32 weights after Adam are not
    # comparable): the forwards differ by float32 summation order, ~1e-6 relative. The weights Adam moved differently
    # by a visible fraction of a step (lr = 2e-4) are the few whose gradient was within ~1e-8 of zero (a fraction
    # ~1e-6 of them); a loss moves by |d loss / d w| (< 1) x lr for each, ~1e-6 relative for a handful of weights
    # (and not at all for the loss whose gradient was the near-zero one). 1e-4 is far above both, on any CPU.
    for a, b in zip(out["torch"][0], out["triton"][0], strict=True):
        assert a.loss_G_L1.item() == pytest.approx(b.loss_G_L1.item(), rel=1e-4)
        assert a.loss_D.item() == pytest.approx(b.loss_D.item(), rel=1e-4)
    assert out["torch"][1].keys() == out["triton"][1].keys()


@pytest.mark.slow
def test_compile_step_matches_eager_step(tmp_path):
    A, B = torch.rand(1, 3, 128, 128) * 2 - 1, torch.rand(1, 3, 128, 128) * 2 - 1
    losses = {}
    for compiled in (False, True):
        tr = Trainer(override(tiny_cfg(tmp_path), compile=compiled, no_dropout=True), "cpu")
        losses[compiled] = [tr.train_step(A, B) for _ in range(2)]
    # rel 1e-4: as in test_triton_kernels_step_matches_torch_step (inductor's kernels sum in their own orders)
    for a, b in zip(losses[False], losses[True], strict=True):
        assert b.loss_G_L1.item() == pytest.approx(a.loss_G_L1.item(), rel=1e-4)
        assert b.loss_D.item() == pytest.approx(a.loss_D.item(), rel=1e-4)
        assert b.loss_G_GAN.item() == pytest.approx(a.loss_G_GAN.item(), rel=1e-4)

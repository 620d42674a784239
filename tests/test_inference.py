import torch
from torch import nn

from fastp2p.inference import PerSampleBatchNorm, to_model_input, to_uint8, with_mode
from fastp2p.models import build_generator

# Batch N against N single calls, and PerSampleBatchNorm against nn.BatchNorm2d: the same sums, but oneDNN may pick
# another kernel (another summation order) for another batch size or on another CPU, and the statistics are summed by
# other code. Two float32 orders differ like random walks, ~1e-5 relative over the U-Net's 14 layers (see
# tests/test_perf.py::test_whole_generator_same_output_and_gradients), 4 sigma 4e-5, on outputs |y| < 1: 1e-4. Images
# mixed into each other's statistics, or the wrong mode, are off by ~0.1.
ATOL = 1e-4


def _trained_like(g):
    # give the running statistics non-trivial values so paper and eval modes must differ
    g.train()
    with torch.no_grad():
        for _ in range(3):
            g(torch.randn(2, 3, 128, 128) * 2 + 0.5)
    return g


def test_paper_mode_batch_equals_per_image_calls():
    g = _trained_like(build_generator("unet_128", ngf=8, norm="batch"))
    paper = with_mode(g, "paper", dropout=False)
    assert any(isinstance(m, PerSampleBatchNorm) for m in paper.modules())
    x = torch.randn(4, 3, 128, 128)
    batched = paper(x)
    single = torch.cat([paper(x[i : i + 1]) for i in range(4)])
    torch.testing.assert_close(batched, single, rtol=0, atol=ATOL)


def test_paper_mode_equals_reference_train_mode_at_batch_1():
    """The reference's test.py leaves the net in train mode: batch norm on one image = per-image statistics."""
    g = _trained_like(build_generator("unet_128", ngf=8, norm="batch", use_dropout=False))
    x = torch.randn(1, 3, 128, 128)
    expect = g.train()(x)
    got = with_mode(g, "paper")(x)
    torch.testing.assert_close(got, expect, rtol=0, atol=ATOL)


def test_paper_mode_leaves_running_stats_and_source_untouched():
    g = _trained_like(build_generator("unet_128", ngf=8))
    before = {k: v.clone() for k, v in g.state_dict().items()}
    with_mode(g, "paper")(torch.randn(2, 3, 128, 128))
    assert all(torch.equal(before[k], v) for k, v in g.state_dict().items())
    assert not any(isinstance(m, PerSampleBatchNorm) for m in g.modules())


def test_eval_mode_uses_running_stats_and_no_dropout():
    g = _trained_like(build_generator("unet_128", ngf=8))
    ev = with_mode(g, "eval")
    x = torch.randn(2, 3, 128, 128)
    torch.testing.assert_close(ev(x), ev(x))  # deterministic
    torch.testing.assert_close(ev(x[:1]), ev(x)[:1], rtol=0, atol=ATOL)
    assert not torch.allclose(ev(x), with_mode(g, "paper", dropout=False)(x), atol=1e-3)


def test_paper_mode_dropout_is_random():
    g = build_generator("unet_128", ngf=8)
    paper = with_mode(g, "paper")
    x = torch.randn(1, 3, 128, 128)
    assert not torch.equal(paper(x), paper(x))
    assert any(isinstance(m, nn.Dropout) and m.training for m in paper.modules())


def test_uint8_round_trip():
    img = torch.randint(0, 256, (2, 8, 8, 3), dtype=torch.uint8)
    x = to_model_input(img)
    assert x.shape == (2, 3, 8, 8) and x.min() >= -1 and x.max() <= 1
    assert torch.equal(to_uint8(x), img) or (to_uint8(x).int() - img.int()).abs().max() <= 1

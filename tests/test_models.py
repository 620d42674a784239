import pytest
import torch
from torch import nn

from fastp2p.models import build_discriminator, build_generator, init_weights, keys
from fastp2p.models.reference import RefUnetGenerator


def n_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


@pytest.mark.parametrize(
    "netG,norm,expected",
    [("unet_256", "batch", 54_413_955), ("unet_256", "instance", 54_409_603), ("unet_128", "batch", 41_828_995)],
)
def test_generator_parameter_counts_match_reference(netG, norm, expected):
    assert n_params(build_generator(netG, norm=norm, init=False)) == expected


@pytest.mark.parametrize("norm,expected", [("batch", 2_768_705), ("instance", 2_767_809)])
def test_basic_discriminator_parameter_counts(norm, expected):
    assert n_params(build_discriminator("basic", 6, norm=norm, init=False)) == expected


def test_patchgan_receptive_field_output_size():
    d = build_discriminator("basic", 6)
    assert d(torch.randn(1, 6, 256, 256)).shape == (1, 1, 30, 30)
    assert build_discriminator("pixel", 6)(torch.randn(2, 6, 16, 16)).shape == (2, 1, 16, 16)
    assert build_discriminator("n_layers", 6, n_layers_D=2)(torch.randn(1, 6, 64, 64)).shape[1] == 1


def test_dropout_only_on_the_three_512_blocks_below_bottleneck():
    g = build_generator("unet_256")
    dropped = [i for i, m in enumerate(g.up_dropout) if isinstance(m, nn.Dropout)]
    assert dropped == [4, 5, 6]  # levels 5..7 of 8; never the innermost (7, 0-based) nor the 256-channel level
    assert all(g.up[i].out_channels == 512 for i in dropped)
    assert not any(isinstance(m, nn.Dropout) for m in build_generator("unet_256", use_dropout=False).modules())


def test_bias_placement():
    g_b, g_i, g_n = (build_generator("unet_128", ngf=8, norm=n) for n in ("batch", "instance", "none"))
    assert g_b.down[1].bias is None and g_b.up[1].bias is None and g_b.up[0].bias is not None
    assert g_i.down[1].bias is not None and g_i.up[1].bias is not None
    assert g_n.down[1].bias is not None  # spec: with no norm, convs keep their bias


def test_init_statistics():
    torch.manual_seed(1)
    g = build_generator("unet_256")
    w = g.down[3].weight
    assert abs(w.mean().item()) < 1e-3 and abs(w.std().item() - 0.02) < 1e-3
    bn = g.down_norm[3]
    assert abs(bn.weight.mean().item() - 1.0) < 5e-3 and abs(bn.weight.std().item() - 0.02) < 5e-3
    assert torch.count_nonzero(bn.bias) == 0


def _no_dropout(m):
    for mod in m.modules():
        if isinstance(mod, nn.Dropout):
            mod.p = 0.0
    return m


@pytest.mark.parametrize("netG,num_downs,size", [("unet_128", 7, 128), ("unet_256", 8, 256)])
@pytest.mark.parametrize("norm", ["batch", "instance"])
def test_reference_keys_round_trip_same_function(netG, num_downs, size, norm):
    ngf = 8
    ref = init_weights(RefUnetGenerator(3, 3, num_downs, ngf, norm, use_dropout=True))
    sd = ref.state_dict()
    # reference checkpoints may come from DataParallel ("module.") and still carry num_batches_tracked
    wrapped = {"module." + k: v for k, v in sd.items()}
    assert keys.num_downs_of_reference(wrapped) == num_downs
    ours = build_generator(netG, ngf=ngf, norm=norm, init=False)
    ours.load_state_dict(keys.from_reference(wrapped, num_downs), strict=True)
    back = keys.to_reference(ours.state_dict(), num_downs)
    assert back.keys() == sd.keys()
    assert all(torch.equal(back[k], sd[k]) for k in sd)
    x = torch.randn(2, 3, size, size)
    _no_dropout(ref).train()
    _no_dropout(ours).train()
    torch.testing.assert_close(ours(x), ref(x), rtol=0, atol=1e-6)
    ref.eval()
    ours.eval()
    torch.testing.assert_close(ours(x), ref(x), rtol=0, atol=1e-6)


def test_reference_gradients_match():
    ref = _no_dropout(init_weights(RefUnetGenerator(3, 3, 7, 8, "batch")))
    ours = _no_dropout(build_generator("unet_128", ngf=8, init=False))
    ours.load_state_dict(keys.from_reference(ref.state_dict(), 7))
    x = torch.randn(1, 3, 128, 128)
    ref(x).square().mean().backward()
    ours(x).square().mean().backward()
    g_ref = keys.to_reference({k: p.grad for k, p in ours.named_parameters()}, 7)
    for k, p in ref.named_parameters():
        torch.testing.assert_close(g_ref[k], p.grad, rtol=1e-4, atol=1e-6)


def test_unknown_reference_key_is_named():
    with pytest.raises(KeyError, match="bogus"):
        keys.from_reference({"model.model.0.weight": torch.zeros(1), "model.bogus.weight": torch.zeros(1)}, 7)

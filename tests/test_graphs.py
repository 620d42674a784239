"""--cuda_graphs (fastp2p.graphs): the static-buffer step equals the eager step bit for bit on the CPU (the function
the CUDA graph captures); on a GPU, the graphed step equals the eager one and its masks change per replay."""

from __future__ import annotations

import json

import pytest
import torch

from fastp2p.config import override, preset
from fastp2p.graphs import GraphedStep, graphs_problem
from fastp2p.train import Trainer


def _cfg(**kw):
    # Dropout on (the paper's G), batch norm, batch 2: the parts a replay could get wrong (masks, running stats).
    return override(preset("debug"), netG="unet_128", ngf=8, ndf=8, batch_size=2, **kw)


def _batches(n, seed=1, size=128):
    g = torch.Generator().manual_seed(seed)
    return [(torch.rand(2, 3, size, size, generator=g) * 2 - 1, torch.rand(2, 3, size, size, generator=g) * 2 - 1)
            for _ in range(n)]


def _state(tr):
    sd = {f"G.{k}": v for k, v in tr.G.state_dict().items()}
    sd.update({f"D.{k}": v for k, v in tr.D.state_dict().items()})
    for name, opt in (("opt_G", tr.opt_G), ("opt_D", tr.opt_D)):
        for pid, st in opt.state_dict()["state"].items():
            sd.update({f"{name}.{pid}.{k}": v for k, v in st.items()})
    return sd


def test_static_buffer_step_is_the_eager_step_bit_for_bit():
    eager, graphed = Trainer(_cfg()), Trainer(_cfg())
    step = GraphedStep(graphed, capture=False)
    assert all(torch.is_tensor(g["lr"]) for o in (graphed.opt_G, graphed.opt_D) for g in o.param_groups)
    for i, (A, B) in enumerate(_batches(3)):
        epoch = i  # a new lr every step: the tensor lr must follow the schedule in place
        assert eager.set_epoch(epoch) == graphed.set_epoch(epoch)
        rng = torch.get_rng_state()  # one global RNG: both sides draw the same dropout masks
        le = eager.train_step(A, B)
        torch.set_rng_state(rng)
        lg = step(A, B)
        for k in ("loss_D", "loss_G_GAN", "loss_G_L1"):
            assert torch.equal(getattr(le, k), getattr(lg, k)), (i, k)
    assert eager.step == graphed.step == 3
    se, sg = _state(eager), _state(graphed)
    assert se.keys() == sg.keys()
    differ = [k for k in se if not torch.equal(se[k], sg[k])]
    assert not differ, differ[:5]
    # lr of the schedule's last epoch, held in a float64 tensor
    assert float(graphed.opt_G.param_groups[0]["lr"]) == eager.opt_G.param_groups[0]["lr"]


def test_dropout_masks_change_from_step_to_step():
    tr = Trainer(_cfg())
    step = GraphedStep(tr, capture=False)
    masks = []

    def record(mod, inp, out):
        masks.append((out == 0).clone())

    drop = next(m for m in tr.G.modules() if isinstance(m, torch.nn.Dropout))
    h = drop.register_forward_hook(record)
    (A, B), = _batches(1)
    for _ in range(2):
        step(A, B)  # the same input twice: only the masks' RNG makes them differ
    h.remove()
    assert len(masks) == 2 and not torch.equal(masks[0], masks[1])
    frac = torch.stack(masks).float().mean().item()
    assert abs(frac - 0.5) < 0.05  # p = 0.5 over 2 x 2 x 512 x 4 x 4 elements: the std is ~0.008


def test_tensor_lr_checkpoints_as_numbers():
    tr = Trainer(_cfg())
    GraphedStep(tr, capture=False)
    lr = tr.set_epoch(12)  # debug preset: 10 epochs at 2e-4, then linear decay
    meta = tr.train_state()["meta"]
    json.dumps(meta)  # the state's metadata stays JSON
    saved = meta["opt_G"]["param_groups"][0]["lr"]
    assert isinstance(saved, float) and saved == float(torch.tensor(lr, dtype=torch.float64)) and 0 < saved < 2e-4


def test_graphs_problem_names_the_reason():
    assert "cuda" in graphs_problem(Trainer(_cfg()))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graph_step_matches_eager_on_gpu():
    torch.backends.cudnn.deterministic = True
    cfg = _cfg(device="cuda", no_dropout=True)  # masks differ between the two runs' RNG streams otherwise
    eager, graphed = Trainer(cfg, "cuda"), Trainer(cfg, "cuda")
    GraphedStep(eager, capture=False)  # the same tensor lr on both sides: only the capture differs
    step = GraphedStep(graphed, warmup=2)
    for A, B in _batches(6):
        A, B = A.cuda(), B.cuda()
        eager.train_step(A, B)
        step(A, B)
    assert next(iter(step.shapes.values())).graph is not None, step.failed
    se, sg = _state(eager), _state(graphed)
    worst = max(float((se[k].double() - sg[k].double()).abs().max()) for k in se if se[k].is_floating_point())
    assert worst <= 1e-5, worst


def test_step_function_picks_eager_where_graphs_cannot_run():
    from fastp2p.errors import UserError
    from fastp2p.graphs import step_function

    tr = Trainer(_cfg())
    assert step_function(tr, None) == tr.train_step  # CPU: the eager step, no tensor lr
    assert not torch.is_tensor(tr.opt_G.param_groups[0]["lr"])
    assert step_function(tr, False) == tr.train_step
    with pytest.raises(UserError, match="--cuda_graphs: CUDA graphs need --device cuda"):
        step_function(tr, True)


def test_speed_flags_apply_around_the_trainers_step_only():
    """The trainer's TF32 / cudnn.benchmark settings must not leak into a reference baseline in the same process."""
    from fastp2p.train import SPEED_FLAGS, backend_flags, current_backend_flags

    before = current_backend_flags()
    flipped = {k: not v for k, v in before.items()}
    seen = {}
    with backend_flags(flipped):
        seen = current_backend_flags()
    assert seen == flipped and current_backend_flags() == before
    with pytest.raises(RuntimeError), backend_flags(flipped):
        raise RuntimeError("a failing step restores them too")
    assert current_backend_flags() == before
    assert Trainer(_cfg()).backend_flags == {}  # CPU: torch's defaults
    assert set(SPEED_FLAGS) == set(before)

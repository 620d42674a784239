"""The whole training iteration as one CUDA graph per input shape (``--cuda_graphs``).

Why: at batch 1 an eager pix2pix iteration issues ~600 kernel launches (G forward, D loss/backward/Adam step, G
loss/backward/Adam step) whose math takes well under a millisecond on an H100; the host's launch overhead
(~10-15 us each) sets the step time. One ``graph.replay()`` launches all of them at once.

What a replay needs to be the same step as the eager one (``torch.cuda.graphs`` "whole-network capture"):
- static input buffers: each batch is copied into the buffers the graph reads (``GraphedStep.__call__``);
- no host sync inside the step: fused Adam keeps its ``step`` counters on the device, the losses stay tensors (read
  every ``log_every`` steps), and GradScaler (fp16, which syncs on ``found_inf``) is not graphed;
- the lr in a device tensor (``use_tensor_lr``) that the schedule fills in place, so a new epoch needs no re-capture;
- dropout: the default CUDA generator is registered with every capture, and each replay advances its Philox offset,
  so every step draws new masks (the graph-safe generator state);
- gradients: set to None before the capture, so backward's first write allocates them in the graph's private pool and
  each replay overwrites them (no accumulation across steps);
- warm-up: the first ``warmup`` steps of each shape run eagerly on a side stream (cuDNN/cuBLAS handles, autotuning,
  lazy state such as Adam's moments) before the capture, as the torch docs require.

A partial last batch has another shape: it gets its own graph (captured once, replayed every epoch). On the CPU (and
for the CPU tests) the same object runs the step over the static buffers without capturing, which is bit for bit the
eager step. Resume and checkpoints are unchanged: the graph reads the parameters, optimizer state and BN buffers in
place (``load_state_dict`` copies into them before the first capture).
"""

from __future__ import annotations

import logging

import torch

log = logging.getLogger("fastp2p.train")


def use_tensor_lr(trainer) -> None:
    """Hold each optimizer group's lr in a device tensor, which ``Trainer.set_epoch`` fills in place. On CUDA float32
    (what the fused kernel reads); on a CPU float64, so the result is bit for bit the float-lr step."""
    dtype = torch.float32 if trainer.device.type == "cuda" else torch.float64
    for opt in (trainer.opt_G, trainer.opt_D):
        for group in opt.param_groups:
            if not torch.is_tensor(group["lr"]):
                group["lr"] = torch.tensor(float(group["lr"]), dtype=dtype, device=trainer.device)


def graphs_problem(trainer) -> str | None:
    """Why the step cannot be graphed on this trainer (None: it can)."""
    if trainer.device.type != "cuda":
        return "CUDA graphs need --device cuda"
    if trainer.scale:
        return "fp16 autocast's GradScaler reads found_inf on the host every step"
    if trainer.dist.enabled:
        return "DDP's gradient all-reduce is not captured here (one process per GPU runs eagerly)"
    if trainer.cfg.train.compile and getattr(trainer.cfg.train, "compile_mode", None) == "reduce-overhead":
        return "--compile_mode reduce-overhead captures its own CUDA graphs"
    return None


class _Shape:
    """Static buffers, the graph and its outputs for one input shape."""

    def __init__(self, A: torch.Tensor, B: torch.Tensor):
        self.A = torch.empty_like(A)  # same strides (channels-last stays channels-last)
        self.B = torch.empty_like(B)
        self.seen = 0
        self.graph: torch.cuda.CUDAGraph | None = None
        self.out = None  # StepLosses of the captured step (static tensors)
        self.fake: torch.Tensor | None = None


class GraphedStep:
    """``trainer.train_step`` over static input buffers; on CUDA captured into one graph per input shape after
    ``warmup`` eager steps of that shape. Call it as the step: ``losses = step(A, B)``."""

    def __init__(self, trainer, warmup: int = 3, capture: bool | None = None):
        self.trainer = trainer
        self.capture = trainer.device.type == "cuda" if capture is None else capture
        self.warmup = warmup
        self.shapes: dict[tuple, _Shape] = {}
        self.failed: str | None = None  # a capture that raised: the rest of the run is eager (one warning line)
        use_tensor_lr(trainer)

    def __call__(self, A: torch.Tensor, B: torch.Tensor):
        t = self.trainer
        key = (tuple(A.shape), tuple(A.stride()), A.dtype, tuple(B.shape), tuple(B.stride()), B.dtype)
        s = self.shapes.get(key)
        if s is None:
            s = self.shapes[key] = _Shape(A, B)
        s.A.copy_(A, non_blocking=True)
        s.B.copy_(B, non_blocking=True)
        if not self.capture or self.failed is not None:
            return t.train_step(s.A, s.B)
        if s.graph is None:
            if s.seen < self.warmup:
                s.seen += 1
                return self._side_stream(lambda: t.train_step(s.A, s.B))
            self._capture(s)
            if s.graph is None:  # the capture failed: this step runs eagerly
                return t.train_step(s.A, s.B)
        s.graph.replay()
        t.step += 1
        t._last_fake = s.fake
        # Clones: the caller may keep a loss tensor across steps (the reporter's running sums), and the next replay
        # overwrites the static ones in place.
        return type(s.out)(*(x.clone() for x in (s.out.loss_D, s.out.loss_G_GAN, s.out.loss_G_L1)))

    @staticmethod
    def _side_stream(fn):
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            out = fn()
        torch.cuda.current_stream().wait_stream(side)
        return out

    def _capture(self, s: _Shape) -> None:
        t = self.trainer
        for opt in (t.opt_G, t.opt_D):
            opt.zero_grad(set_to_none=True)  # backward allocates the gradients inside the graph's pool
        graph = torch.cuda.CUDAGraph()
        step = t.step
        try:
            with torch.cuda.graph(graph):
                out = t.train_step(s.A, s.B)
        except Exception as e:  # noqa: BLE001 - any capture error: keep training eagerly, say why once
            from .errors import first_line

            t.step = step
            self.failed = first_line(e)
            log.warning("--cuda_graphs: capture failed (%s); training continues without CUDA graphs", self.failed)
            return
        t.step = step  # the capture records the step's kernels without running them; the replay runs them
        s.graph, s.out, s.fake = graph, out, t._last_fake
        log.info("--cuda_graphs: captured the training step for input %s", tuple(s.A.shape))


def step_function(trainer, requested: bool | None):
    """The step ``fit`` calls: a ``GraphedStep`` where ``--cuda_graphs`` asks for it (``None``: wherever the step can be
    graphed), else ``trainer.train_step``. An explicit ``--cuda_graphs`` that this run cannot honour is a one-line
    error, not a silent eager run."""
    if requested is False:
        return trainer.train_step
    why = graphs_problem(trainer)
    if why is not None:
        if requested:
            from .errors import UserError

            raise UserError(f"--cuda_graphs: {why}; drop --cuda_graphs (or use --no-cuda_graphs)")
        if trainer.device.type == "cuda":
            log.info("CUDA graphs off: %s", why)
        return trainer.train_step
    return GraphedStep(trainer)

"""Fused normalization + activation: ``act(norm(x) * weight + bias)`` in one pass each way, as Triton kernels.

What it replaces: ``nn.BatchNorm2d`` / ``nn.InstanceNorm2d`` (and ``fastp2p.inference.PerSampleBatchNorm``) followed by
LeakyReLU(slope), ReLU or nothing. Eager PyTorch spends 3-5 passes over the activation on that (statistics, normalize,
activation, and for InstanceNorm on channels-last a ``.contiguous()`` to NCHW and back: pytorch issues #67976/#72341).

Statistics modes (``stats``):
    ``"instance"``  per (sample, channel) over H*W: InstanceNorm2d, and batch norm evaluated per sample (paper mode)
    ``"batch"``     per channel over N*H*W: BatchNorm2d in training, running statistics moved exactly like
                    ``nn.BatchNorm2d`` (momentum or cumulative average, unbiased variance, ``num_batches_tracked``):
                    by the v2 kernels themselves, by the module from the returned batch mean / variance in v1
    ``"running"``   given statistics (BatchNorm2d in eval): a pure elementwise pass

Passes (x is read, y written; "tile" = [BLOCK_C channels x BLOCK_L positions]). Two implementations, picked per module
by ``variant=`` / ``FASTP2P_NORM_ACT_IMPL=v1|v2`` (``default_variant``: v2 in the interpreter, v1 on a GPU until a
GPU run confirms v2). Launches per layer, fwd / bwd:

                            v1                                   v2
    batch (training)        3 + ~9 torch ops / 2 + 3 torch sums  2 / 2, no torch ops but allocations + one memset
    instance, 1 chunk       1 / 1 + 2 torch sums                 1 / 1
    instance, chunks        3 / 2 + torch sums                   2 / 2
    running (eval)          1 + 2 copies / 1 + 2 torch sums      1 / 1

    forward   instance, one chunk per (n, c-block): ONE kernel: Welford over x, then normalize + act (the re-read of x
              comes from L1/L2 on a GPU); otherwise: partial statistics per (n, L-chunk, c) -> merge -> apply.
              v1: the merge is its own kernel whose cdiv(C, 128) programs each walk all N * n_chunks partial rows one
              after another; the module then updates running_mean / running_var / num_batches_tracked with ~9 small
              torch ops and, for momentum=None, float(num_batches_tracked) (a host sync).
              v2: the merge runs at the end of the statistics kernel, in the last program of each group to finish
              (an atomic ticket per group; see "v2" above the kernels), as a tiled [rows x channels] reduction in
              registers; the same program moves the running statistics (momentum, unbiased variance, or 1 /
              num_batches_tracked read on the device), and the apply kernel bumps num_batches_tracked: 2 launches.
    backward  dz = act'(z) * dy with z recomputed from x (nothing but x, the C-sized mean/var and the parameters is
              saved), then dx = w * rstd * (dz - mean(dz) - xhat * mean(dz * xhat)), dw = sum(dz * xhat), db = sum(dz);
              same kernel layout as the forward (one kernel for single-chunk instance norm and for ``"running"``).
              v1 reduces the partial sums with torch (.sum over rows for dx, and again for dw / db); v2 sums each
              partial row once, in the reduction kernel's last program per channel block, into db, dw (and the
              per-sample sums instance norm needs), which the dx kernel reads: at most 2 launches.

U-Net skip path (``unet_skip``, opt-in: ``apply_fused_skips`` / ``FASTP2P_FUSED_SKIPS=1``): the up path's
ReLU(cat[a_i, u_{i+1}]) before every up conv is one write, ReLU(a_i) and ReLU(u_{i+1}) into the two channel slices of a
preallocated buffer (2 passes instead of cat + ReLU's 4; ReLU(LeakyReLU(h)) = ReLU(h), and ReLU commutes with dropout's
non-negative scaling), with a Function per level whose backward is ReLU's threshold_backward, sliced per producer.
Tests: tests/test_unet_skip.py (float64, bit-equal to the plain U-Net, forward, every gradient, running statistics).
Up-path slice writes (``apply_fused_skips(model, norm_writes=True)`` / ``FASTP2P_FUSED_SKIPS=norm``): the up norm's
forward launcher takes ``out=`` (a channel slice of the join buffer; the kernels store through its (n, c, l) strides)
with ``act="relu"``, and its backward reads the gradient's channel slice through its strides (``_nlc_addressable``: no
copy), via ``FusedNormAct.forward_into`` / ``backward_from``. Not built: the down-path kernel storing a second output
ReLU(h_i) into the buffer's first channels.
Memory format: NCHW-contiguous and channels-last (NHWC) inputs run as they are (the kernels take (n, c, h*w) strides;
outputs keep the input's format). A tensor that is neither is made dense *in its suggested format*, never with a bare
``.contiguous()``. ``dy`` may come in the other format; it is read through its own strides.

Registration. ``torch.library.custom_op`` (opaque to the compiler) + ``register_fake`` + ``register_autograd``: compiles
with ``fullgraph=True`` under ``aot_eager`` and ``inductor`` on CPU (Triton interpreter) and on CUDA. A
``torch.library.triton_op`` + ``wrap_triton`` variant (ops ``fastp2p::norm_act_fwd_t`` / ``_bwd_t``) lets inductor see
inside the kernels on CUDA; on CPU it fails under compile ("Cannot access data pointer of Tensor" during fake tracing),
so it is opt-in: ``FusedNormAct(..., registration="triton_op")`` / ``apply_fused_kernels(..., registration=...)``.
v2's forward ops (``fastp2p::norm_act_fwd2`` / ``_fwd2_t``) mutate the running statistics (declared in
``mutates_args``: compile functionalizes them); torch.library attaches no autograd formula to a mutating op, so an
``autograd.Function`` wraps it (dynamo traces it whole) with ``fastp2p::norm_act_bwd2`` / ``_bwd2_t`` as its backward.
Which one is faster on a GPU is for ``python -m fastp2p.bench.kernels`` to say (not yet measured: no GPU so far).

Block sizes and chunking are heuristics (``_config``), not tuned on a GPU yet.
"""

import contextlib
import os

import torch
import torch.nn.functional as F
from torch import Tensor, nn

try:
    import triton
    import triton.language as tl
except ImportError:  # not Linux, or installed without the `kernels` extra: backend="torch" only
    triton = tl = None

ACTS = {"none": 0, "relu": 1, "leaky_relu": 2}
STATS = ("instance", "batch", "running")

# ---------------------------------------------------------------------------------------------------------------------
# Debug / test knobs
# ---------------------------------------------------------------------------------------------------------------------
# Poison: every output and scratch buffer is filled with NaN before the kernels run, so an element a kernel forgot to
# write shows up as NaN instead of as stale memory that happens to look right.
_POISON = os.environ.get("FASTP2P_KERNELS_POISON", "") == "1"
_OVERRIDE: dict = {}


@contextlib.contextmanager
def poisoned_outputs(on: bool = True):
    global _POISON
    old, _POISON = _POISON, on
    try:
        yield
    finally:
        _POISON = old


@contextlib.contextmanager
def override_config(**kw):
    """Force ``block_c``, ``block_l`` and/or ``chunk`` (positions per program, rounded up to ``block_l``): tests use it
    to run the multi-chunk paths at small sizes; benchmarks to sweep."""
    old = dict(_OVERRIDE)
    _OVERRIDE.update(kw)
    try:
        yield
    finally:
        _OVERRIDE.clear()
        _OVERRIDE.update(old)


# @triton.jit picks the interpreter when the kernels are defined (this module's import): that is the moment that counts
_INTERPRET = os.environ.get("TRITON_INTERPRET", "") == "1"


def _interpreting() -> bool:
    return _INTERPRET


def triton_usable(device: torch.device | str | None = None) -> bool:
    """True when the Triton kernels can run on ``device``: Triton imported and a CUDA device, or the interpreter
    (``TRITON_INTERPRET=1`` set before import) for CPU tensors."""
    if triton is None:
        return False
    dev = torch.device(device) if device is not None else None
    if dev is None:
        return torch.cuda.is_available() or _interpreting()
    return dev.type == "cuda" or (dev.type == "cpu" and _interpreting())


# ---------------------------------------------------------------------------------------------------------------------
# Triton kernels
# ---------------------------------------------------------------------------------------------------------------------
if triton is not None:

    @triton.jit
    def _act(z, slope, ACT: tl.constexpr):
        # z < 0 (not z <= 0 / z > 0) so NaN passes through, as torch.relu / F.leaky_relu do.
        if ACT == 1:
            z = tl.where(z < 0.0, 0.0, z)
        elif ACT == 2:
            z = tl.where(z < 0.0, z * slope, z)
        return z

    @triton.jit
    def _act_grad(dy, z, slope, ACT: tl.constexpr):
        # torch: relu' = (z > 0), leaky_relu' = (z > 0 ? 1 : slope), so both take the "negative" branch at z == 0.
        if ACT == 1:
            dy = tl.where(z > 0.0, dy, 0.0)
        elif ACT == 2:
            dy = tl.where(z > 0.0, dy, dy * slope)
        return dy

    @triton.jit
    def _tile_offsets(n, c, pos, sn, sc, sl):
        return n * sn + c[:, None] * sc + pos[None, :] * sl

    @triton.jit
    def _channel_params(W, B, MEAN, VAR, soff, c, cm, eps, HAS_W: tl.constexpr, HAS_B: tl.constexpr):
        """Per-channel fp32 vectors: mean, rstd, scale = rstd * w, shift b."""
        mean = tl.load(MEAN + soff + c, mask=cm, other=0.0).to(tl.float32)
        var = tl.load(VAR + soff + c, mask=cm, other=1.0).to(tl.float32)
        rstd = 1.0 / tl.sqrt_rn(var + eps)
        scale, shift = _scale_shift(W, B, c, cm, rstd, HAS_W, HAS_B)
        return mean, rstd, scale, shift

    @triton.jit
    def _apply_program(W, B, MEAN, VAR, C, L, chunk, eps, PER_SAMPLE: tl.constexpr, HAS_W: tl.constexpr,
                       HAS_B: tl.constexpr, BLOCK_C: tl.constexpr):
        """What program (k, n, cb) of the apply/backward kernels works on: sample n, channels c (mask cm), positions
        [l0, l1) of chunk k, its statistics row offset soff (per-sample statistics or shared) and channel params."""
        k = tl.program_id(0)
        n = tl.program_id(1).to(tl.int64)
        c = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
        cm = c < C
        soff = n * C if PER_SAMPLE else n * 0  # a tensor either way: one return type for the helper
        mean, rstd, scale, shift = _channel_params(W, B, MEAN, VAR, soff, c, cm, eps, HAS_W, HAS_B)
        l0 = k * chunk
        l1 = tl.minimum(l0 + chunk, L)
        return n, c, cm, soff, l0, l1, mean, rstd, scale, shift

    @triton.jit
    def _scale_shift(W, B, c, cm, rstd, HAS_W: tl.constexpr, HAS_B: tl.constexpr):
        """The affine folded into the normalization: y = (x - mean) * scale + shift, scale = rstd * w."""
        if HAS_W:
            scale = rstd * tl.load(W + c, mask=cm, other=1.0).to(tl.float32)
        else:
            scale = rstd
        if HAS_B:
            shift = tl.load(B + c, mask=cm, other=0.0).to(tl.float32)
        else:
            shift = tl.zeros_like(rstd)
        return scale, shift

    @triton.jit
    def _apply_tiles(X, Y, n, c, cm, l0, l1, mean, scale, shift, slope,
                     sxn, sxc, sxl, syn, syc, syl, ACT: tl.constexpr, BLOCK_L: tl.constexpr):
        for s in range(l0, l1, BLOCK_L):
            pos = s + tl.arange(0, BLOCK_L)
            m = cm[:, None] & (pos < l1)[None, :]
            x = tl.load(X + _tile_offsets(n, c, pos, sxn, sxc, sxl), mask=m, other=0.0).to(tl.float32)
            z = (x - mean[:, None]) * scale[:, None] + shift[:, None]
            y = _act(z, slope, ACT)
            tl.store(Y + _tile_offsets(n, c, pos, syn, syc, syl), y.to(Y.dtype.element_ty), mask=m)

    @triton.jit
    def _fwd_stats_kernel(X, Y, W, B, PMEAN, PM2, MEAN, VAR,
                          C, L, sxn, sxc, sxl, syn, syc, syl, chunk, n_chunks, eps, slope,
                          HAS_W: tl.constexpr, HAS_B: tl.constexpr, ACT: tl.constexpr, APPLY: tl.constexpr,
                          BLOCK_C: tl.constexpr, BLOCK_L: tl.constexpr):
        """Program (k, n, cb): Welford statistics of x[n, cb-block, k-th chunk of H*W]. APPLY (instance norm, one chunk
        per sample): the chunk is the whole group, so also write mean/var and normalize right away (one kernel)."""
        k = tl.program_id(0)
        n = tl.program_id(1).to(tl.int64)
        c = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
        cm = c < C
        l0 = k * chunk
        l1 = tl.minimum(l0 + chunk, L)
        mean = tl.zeros([BLOCK_C], dtype=tl.float32)
        m2 = tl.zeros([BLOCK_C], dtype=tl.float32)
        for s in range(l0, l1, BLOCK_L):
            pos = s + tl.arange(0, BLOCK_L)
            lm = pos < l1
            x = tl.load(X + _tile_offsets(n, c, pos, sxn, sxc, sxl), mask=cm[:, None] & lm[None, :],
                        other=0.0).to(tl.float32)
            # Tile statistics two-pass inside the tile, then Chan's merge with the running ones; every tile before
            # this one was full, so the running count is s - l0.
            tc = tl.minimum(l1 - s, BLOCK_L).to(tl.float32)
            cnt = (s - l0).to(tl.float32)
            tmean = tl.sum(x, axis=1) / tc
            d = tl.where(lm[None, :], x - tmean[:, None], 0.0)
            tm2 = tl.sum(d * d, axis=1)
            tot = cnt + tc
            delta = tmean - mean
            mean += delta * (tc / tot)
            m2 += tm2 + delta * delta * (cnt * tc / tot)
        if APPLY:
            var = m2 / (l1 - l0).to(tl.float32)
            tl.store(MEAN + n * C + c, mean, mask=cm)
            tl.store(VAR + n * C + c, var, mask=cm)
            rstd = 1.0 / tl.sqrt_rn(var + eps)
            scale, shift = _scale_shift(W, B, c, cm, rstd, HAS_W, HAS_B)
            _apply_tiles(X, Y, n, c, cm, l0, l1, mean, scale, shift, slope,
                         sxn, sxc, sxl, syn, syc, syl, ACT, BLOCK_L)
        else:
            row = n * n_chunks + tl.program_id(0)  # this program's chunk k
            tl.store(PMEAN + row * C + c, mean, mask=cm)
            tl.store(PM2 + row * C + c, m2, mask=cm)

    @triton.jit
    def _fwd_merge_kernel(PMEAN, PM2, MEAN, VAR, C, L, chunk, n_chunks, P, total, BLOCK_C: tl.constexpr):
        """Program (cb, g): merge the P partial (mean, M2) rows of group g (instance: g = n, P = n_chunks; batch: g = 0,
        P = N * n_chunks). Exact two-level formula: mean = sum(cnt_p mean_p) / M, M2 = sum(M2_p + cnt_p (mean_p -
        mean)^2)."""
        c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
        cm = c < C
        g = tl.program_id(1).to(tl.int64)
        acc = tl.zeros([BLOCK_C], dtype=tl.float32)
        for p in range(0, P):
            cnt = tl.minimum(chunk, L - (p % n_chunks) * chunk).to(tl.float32)
            acc += cnt * tl.load(PMEAN + (g * P + p) * C + c, mask=cm, other=0.0)
        mean = acc / total
        m2 = tl.zeros([BLOCK_C], dtype=tl.float32)
        for p in range(0, P):
            cnt = tl.minimum(chunk, L - (p % n_chunks) * chunk).to(tl.float32)
            d = tl.load(PMEAN + (g * P + p) * C + c, mask=cm, other=0.0) - mean
            m2 += tl.load(PM2 + (g * P + p) * C + c, mask=cm, other=0.0) + cnt * d * d
        tl.store(MEAN + g * C + c, mean, mask=cm)
        tl.store(VAR + g * C + c, m2 / total, mask=cm)

    @triton.jit
    def _fwd_apply_kernel(X, Y, W, B, MEAN, VAR, C, L, sxn, sxc, sxl, syn, syc, syl, chunk, eps, slope,
                          PER_SAMPLE: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr, ACT: tl.constexpr,
                          BLOCK_C: tl.constexpr, BLOCK_L: tl.constexpr):
        n, c, cm, soff, l0, l1, mean, rstd, scale, shift = _apply_program(W, B, MEAN, VAR, C, L, chunk, eps, PER_SAMPLE,
                                                                          HAS_W, HAS_B, BLOCK_C)
        _apply_tiles(X, Y, n, c, cm, l0, l1, mean, scale, shift, slope, sxn, sxc, sxl, syn, syc, syl, ACT, BLOCK_L)

    @triton.jit
    def _dx_tiles(DY, X, DX, n, c, cm, l0, l1, mean, rstd, scale, shift, m_dz, m_dzx, slope,
                  sdn, sdc, sdl, sxn, sxc, sxl, sgn, sgc, sgl, ACT: tl.constexpr, BLOCK_L: tl.constexpr):
        """dx = scale * (dz - m_dz - xhat * m_dzx) over positions [l0, l1)."""
        for s in range(l0, l1, BLOCK_L):
            pos = s + tl.arange(0, BLOCK_L)
            m = cm[:, None] & (pos < l1)[None, :]
            x = tl.load(X + _tile_offsets(n, c, pos, sxn, sxc, sxl), mask=m, other=0.0).to(tl.float32)
            dy = tl.load(DY + _tile_offsets(n, c, pos, sdn, sdc, sdl), mask=m, other=0.0).to(tl.float32)
            xc = x - mean[:, None]
            dz = _act_grad(dy, xc * scale[:, None] + shift[:, None], slope, ACT)
            dx = scale[:, None] * (dz - m_dz[:, None] - xc * rstd[:, None] * m_dzx[:, None])
            tl.store(DX + _tile_offsets(n, c, pos, sgn, sgc, sgl), dx.to(DX.dtype.element_ty), mask=m)

    @triton.jit
    def _bwd_reduce_kernel(DY, X, DX, W, B, MEAN, VAR, PS1, PS2,
                           C, L, sdn, sdc, sdl, sxn, sxc, sxl, sgn, sgc, sgl, chunk, n_chunks, eps, slope,
                           PER_SAMPLE: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr, ACT: tl.constexpr,
                           MODE: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_L: tl.constexpr):
        """Program (k, n, cb): partial sums sum(dz), sum(dz * xhat) over its chunk -> PS1/PS2[n * n_chunks + k, c].
        MODE 0: only that (dx comes from _bwd_apply_kernel); 1 (fixed statistics, "running"): also dx = dz * scale in
        the same pass; 2 (instance norm, one chunk per sample): then dx from the local sums (one kernel)."""
        n, c, cm, soff, l0, l1, mean, rstd, scale, shift = _apply_program(W, B, MEAN, VAR, C, L, chunk, eps, PER_SAMPLE,
                                                                          HAS_W, HAS_B, BLOCK_C)
        s1 = tl.zeros([BLOCK_C], dtype=tl.float32)
        s2 = tl.zeros([BLOCK_C], dtype=tl.float32)
        for s in range(l0, l1, BLOCK_L):
            pos = s + tl.arange(0, BLOCK_L)
            m = cm[:, None] & (pos < l1)[None, :]
            x = tl.load(X + _tile_offsets(n, c, pos, sxn, sxc, sxl), mask=m, other=0.0).to(tl.float32)
            dy = tl.load(DY + _tile_offsets(n, c, pos, sdn, sdc, sdl), mask=m, other=0.0).to(tl.float32)
            xc = x - mean[:, None]
            dz = _act_grad(dy, xc * scale[:, None] + shift[:, None], slope, ACT)  # 0 where masked (dy = 0)
            s1 += tl.sum(dz, axis=1)
            s2 += tl.sum(dz * xc * rstd[:, None], axis=1)
            if MODE == 1:
                tl.store(DX + _tile_offsets(n, c, pos, sgn, sgc, sgl), (dz * scale[:, None]).to(DX.dtype.element_ty),
                         mask=m)
        row = n * n_chunks + tl.program_id(0)  # this program's chunk k
        tl.store(PS1 + row * C + c, s1, mask=cm)
        tl.store(PS2 + row * C + c, s2, mask=cm)
        if MODE == 2:
            cnt = (l1 - l0).to(tl.float32)
            _dx_tiles(DY, X, DX, n, c, cm, l0, l1, mean, rstd, scale, shift, s1 / cnt, s2 / cnt, slope,
                      sdn, sdc, sdl, sxn, sxc, sxl, sgn, sgc, sgl, ACT, BLOCK_L)

    @triton.jit
    def _bwd_apply_kernel(DY, X, DX, W, B, MEAN, VAR, S1, S2,
                          C, L, sdn, sdc, sdl, sxn, sxc, sxl, sgn, sgc, sgl, chunk, total, eps, slope,
                          PER_SAMPLE: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr, ACT: tl.constexpr,
                          BLOCK_C: tl.constexpr, BLOCK_L: tl.constexpr):
        n, c, cm, soff, l0, l1, mean, rstd, scale, shift = _apply_program(W, B, MEAN, VAR, C, L, chunk, eps, PER_SAMPLE,
                                                                          HAS_W, HAS_B, BLOCK_C)
        m_dz = tl.load(S1 + soff + c, mask=cm, other=0.0) / total
        m_dzx = tl.load(S2 + soff + c, mask=cm, other=0.0) / total
        _dx_tiles(DY, X, DX, n, c, cm, l0, l1, mean, rstd, scale, shift, m_dz, m_dzx, slope,
                  sdn, sdc, sdl, sxn, sxc, sxl, sgn, sgc, sgl, ACT, BLOCK_L)

    # -- v2 (the default): the merges run in the statistics / reduction kernel itself ------------------------------
    # Each program of a group (the programs that share a channel block, and for per-sample statistics a sample)
    # stores its partial row, then takes a ticket from the group's counter (atomic add, acq_rel at GPU scope, after a
    # CTA barrier so every thread's stores are ordered before it); the program that draws the last ticket sees every
    # partial row and merges them, tiled [BLOCK_P rows x BLOCK_C channels] and reduced in registers. That removes the
    # merge launch (and the serial walk over ~500 rows of v1's merge kernel) and needs no grid-wide barrier. The
    # counters are a fresh zeroed int32 tensor per call (one memset: safe under CUDA graphs, streams and compile).

    @triton.jit
    def _chunk_moments(X, n, c, cm, l0, l1, sxn, sxc, sxl, BLOCK_C: tl.constexpr, BLOCK_L: tl.constexpr):
        """(mean, M2) of x[n, c, l0:l1]: two-pass inside each tile, Chan's merge across tiles (as _fwd_stats_kernel)."""
        mean = tl.zeros([BLOCK_C], dtype=tl.float32)
        m2 = tl.zeros([BLOCK_C], dtype=tl.float32)
        for s in range(l0, l1, BLOCK_L):
            pos = s + tl.arange(0, BLOCK_L)
            lm = pos < l1
            x = tl.load(X + _tile_offsets(n, c, pos, sxn, sxc, sxl), mask=cm[:, None] & lm[None, :],
                        other=0.0).to(tl.float32)
            tc = tl.minimum(l1 - s, BLOCK_L).to(tl.float32)
            cnt = (s - l0).to(tl.float32)
            tmean = tl.sum(x, axis=1) / tc
            d = tl.where(lm[None, :], x - tmean[:, None], 0.0)
            tm2 = tl.sum(d * d, axis=1)
            tot = cnt + tc
            delta = tmean - mean
            mean += delta * (tc / tot)
            m2 += tm2 + delta * delta * (cnt * tc / tot)
        return mean, m2

    @triton.jit
    def _last_of_group(CNT, g, nprog):
        """True in the one program of group g (of nprog programs) that finishes last; call after storing partials."""
        tl.debug_barrier()  # every thread of this program has issued its partial-row stores
        ticket = tl.atomic_add(CNT + g, 1, sem="acq_rel", scope="gpu")
        return ticket == nprog - 1

    @triton.jit
    def _merge_moments(PMEAN, PM2, r0, P, C, L, chunk, n_chunks, c, cm, total,
                       BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
        """Exact two-level merge of partial rows r0 .. r0 + P - 1 (r0 a multiple of n_chunks; row r counts
        min(chunk, L - (r % n_chunks) * chunk) positions): mean = sum(cnt_r mean_r) / total, M2 = sum(M2_r + cnt_r
        (mean_r - mean)^2), in [BLOCK_P, BLOCK_C] tiles summed over rows in registers."""
        acc = tl.zeros([BLOCK_C], dtype=tl.float32)
        for p0 in range(0, P, BLOCK_P):
            p = p0 + tl.arange(0, BLOCK_P)
            m = (p < P)[:, None] & cm[None, :]
            cnt = tl.minimum(chunk, L - (p % n_chunks) * chunk).to(tl.float32)
            off = (r0 + p).to(tl.int64)[:, None] * C + c[None, :]
            mu = tl.load(PMEAN + off, mask=m, other=0.0, cache_modifier=".cg")
            acc += tl.sum(cnt[:, None] * mu, axis=0)
        mean = acc / total
        m2 = tl.zeros([BLOCK_C], dtype=tl.float32)
        for p0 in range(0, P, BLOCK_P):
            p = p0 + tl.arange(0, BLOCK_P)
            m = (p < P)[:, None] & cm[None, :]
            cnt = tl.minimum(chunk, L - (p % n_chunks) * chunk).to(tl.float32)
            off = (r0 + p).to(tl.int64)[:, None] * C + c[None, :]
            d = tl.where(m, tl.load(PMEAN + off, mask=m, other=0.0, cache_modifier=".cg") - mean[None, :], 0.0)
            m2 += tl.sum(tl.load(PM2 + off, mask=m, other=0.0, cache_modifier=".cg") + cnt[:, None] * d * d, axis=0)
        return mean, m2

    @triton.jit
    def _sum_rows(PS1, PS2, r0, P, C, c, cm, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
        """Column sums of rows r0 .. r0 + P - 1 of PS1 and PS2, tiled [BLOCK_P, BLOCK_C]."""
        a1 = tl.zeros([BLOCK_C], dtype=tl.float32)
        a2 = tl.zeros([BLOCK_C], dtype=tl.float32)
        for p0 in range(0, P, BLOCK_P):
            p = p0 + tl.arange(0, BLOCK_P)
            m = (p < P)[:, None] & cm[None, :]
            off = (r0 + p).to(tl.int64)[:, None] * C + c[None, :]
            a1 += tl.sum(tl.load(PS1 + off, mask=m, other=0.0, cache_modifier=".cg"), axis=0)
            a2 += tl.sum(tl.load(PS2 + off, mask=m, other=0.0, cache_modifier=".cg"), axis=0)
        return a1, a2

    @triton.jit
    def _fwd_stats2_kernel(X, PMEAN, PM2, MEAN, VAR, CNT, RM, RV, NBT,
                           C, L, sxn, sxc, sxl, chunk, n_chunks, N, total, momentum,
                           PER_SAMPLE: tl.constexpr, UPDATE: tl.constexpr, CUMULATIVE: tl.constexpr,
                           BLOCK_C: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_P: tl.constexpr):
        """Program (k, n, cb): partial (mean, M2) of its chunk -> PMEAN/PM2[n * n_chunks + k]; the group's last program
        merges them into MEAN/VAR (biased) and, with UPDATE, moves the running statistics like nn.BatchNorm2d:
        r = (1 - f) r + f stat with the unbiased variance, f = momentum, or (CUMULATIVE, momentum=None) 1 / (the
        num_batches_tracked read here + 1); the count itself is bumped by the apply kernel, after every group read it.
        """
        k = tl.program_id(0)
        n = tl.program_id(1).to(tl.int64)
        cbi = tl.program_id(2)
        c = cbi * BLOCK_C + tl.arange(0, BLOCK_C)
        cm = c < C
        l0 = k * chunk
        l1 = tl.minimum(l0 + chunk, L)
        mean, m2 = _chunk_moments(X, n, c, cm, l0, l1, sxn, sxc, sxl, BLOCK_C, BLOCK_L)
        row = n * n_chunks + k
        tl.store(PMEAN + row * C + c, mean, mask=cm)
        tl.store(PM2 + row * C + c, m2, mask=cm)
        if PER_SAMPLE:
            g = n * tl.num_programs(2) + cbi
            nprog = n_chunks
            r0 = n * n_chunks
            soff = n * C
        else:
            g = n * 0 + cbi
            nprog = N * n_chunks
            r0 = n * 0
            soff = n * 0
        if _last_of_group(CNT, g, nprog):
            gmean, gm2 = _merge_moments(PMEAN, PM2, r0, nprog, C, L, chunk, n_chunks, c, cm, total, BLOCK_P, BLOCK_C)
            gvar = gm2 / total
            tl.store(MEAN + soff + c, gmean, mask=cm)
            tl.store(VAR + soff + c, gvar, mask=cm)
            if UPDATE:
                if CUMULATIVE:
                    f = 1.0 / (tl.load(NBT).to(tl.float32) + 1.0)
                else:
                    f = momentum
                rm = tl.load(RM + c, mask=cm, other=0.0).to(tl.float32)
                rv = tl.load(RV + c, mask=cm, other=0.0).to(tl.float32)
                tl.store(RM + c, (rm * (1.0 - f) + gmean * f).to(RM.dtype.element_ty), mask=cm)
                tl.store(RV + c, (rv * (1.0 - f) + gvar * (f * total / (total - 1.0))).to(RV.dtype.element_ty),
                         mask=cm)

    @triton.jit
    def _fwd_apply2_kernel(X, Y, W, B, MEAN, VAR, MEAN_OUT, VAR_OUT, NBT,
                           C, L, sxn, sxc, sxl, syn, syc, syl, chunk, eps, slope,
                           PER_SAMPLE: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr, ACT: tl.constexpr,
                           COPY_STATS: tl.constexpr, BUMP: tl.constexpr,
                           BLOCK_C: tl.constexpr, BLOCK_L: tl.constexpr):
        """_fwd_apply_kernel, plus: COPY_STATS ("running"): the fp32 copies of the given statistics that the op returns
        (written by the k = n = 0 programs); BUMP: num_batches_tracked += 1 (program (0, 0, 0))."""
        n, c, cm, soff, l0, l1, mean, rstd, scale, shift = _apply_program(W, B, MEAN, VAR, C, L, chunk, eps, PER_SAMPLE,
                                                                          HAS_W, HAS_B, BLOCK_C)
        first = (tl.program_id(0) == 0) & (tl.program_id(1) == 0)
        if COPY_STATS:
            if first:
                tl.store(MEAN_OUT + c, mean, mask=cm)
                tl.store(VAR_OUT + c, tl.load(VAR + c, mask=cm, other=1.0).to(tl.float32), mask=cm)
        if BUMP:
            if first & (tl.program_id(2) == 0):
                tl.store(NBT, tl.load(NBT) + 1)
        _apply_tiles(X, Y, n, c, cm, l0, l1, mean, scale, shift, slope, sxn, sxc, sxl, syn, syc, syl, ACT, BLOCK_L)

    @triton.jit
    def _bwd_reduce2_kernel(DY, X, DX, W, B, MEAN, VAR, PS1, PS2, S1, S2, DW, DB, CNT,
                            C, L, sdn, sdc, sdl, sxn, sxc, sxl, sgn, sgc, sgl, chunk, n_chunks, N, eps, slope,
                            PER_SAMPLE: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr, ACT: tl.constexpr,
                            MODE: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_L: tl.constexpr,
                            BLOCK_P: tl.constexpr):
        """_bwd_reduce_kernel (MODE 0 / 1 / 2 the same), then the channel block's last program sums the partial rows
        once: DB = sum(dz), DW = sum(dz * xhat) over all rows, and for MODE 0 with per-sample statistics the per-sample
        sums S1/S2[n] that _bwd_apply_kernel needs (for batch statistics S1/S2 are DB/DW themselves)."""
        n, c, cm, soff, l0, l1, mean, rstd, scale, shift = _apply_program(W, B, MEAN, VAR, C, L, chunk, eps, PER_SAMPLE,
                                                                          HAS_W, HAS_B, BLOCK_C)
        s1 = tl.zeros([BLOCK_C], dtype=tl.float32)
        s2 = tl.zeros([BLOCK_C], dtype=tl.float32)
        for s in range(l0, l1, BLOCK_L):
            pos = s + tl.arange(0, BLOCK_L)
            m = cm[:, None] & (pos < l1)[None, :]
            x = tl.load(X + _tile_offsets(n, c, pos, sxn, sxc, sxl), mask=m, other=0.0).to(tl.float32)
            dy = tl.load(DY + _tile_offsets(n, c, pos, sdn, sdc, sdl), mask=m, other=0.0).to(tl.float32)
            xc = x - mean[:, None]
            dz = _act_grad(dy, xc * scale[:, None] + shift[:, None], slope, ACT)  # 0 where masked (dy = 0)
            s1 += tl.sum(dz, axis=1)
            s2 += tl.sum(dz * xc * rstd[:, None], axis=1)
            if MODE == 1:
                tl.store(DX + _tile_offsets(n, c, pos, sgn, sgc, sgl), (dz * scale[:, None]).to(DX.dtype.element_ty),
                         mask=m)
        row = n * n_chunks + tl.program_id(0)
        tl.store(PS1 + row * C + c, s1, mask=cm)
        tl.store(PS2 + row * C + c, s2, mask=cm)
        if MODE == 2:
            cnt = (l1 - l0).to(tl.float32)
            _dx_tiles(DY, X, DX, n, c, cm, l0, l1, mean, rstd, scale, shift, s1 / cnt, s2 / cnt, slope,
                      sdn, sdc, sdl, sxn, sxc, sxl, sgn, sgc, sgl, ACT, BLOCK_L)
        if _last_of_group(CNT, tl.program_id(2), N * n_chunks):
            if PER_SAMPLE and MODE == 0:
                t1 = tl.zeros([BLOCK_C], dtype=tl.float32)
                t2 = tl.zeros([BLOCK_C], dtype=tl.float32)
                for i in range(0, N):
                    a1, a2 = _sum_rows(PS1, PS2, i * n_chunks, n_chunks, C, c, cm, BLOCK_P, BLOCK_C)
                    tl.store(S1 + i * C + c, a1, mask=cm)
                    tl.store(S2 + i * C + c, a2, mask=cm)
                    t1 += a1
                    t2 += a2
            else:
                t1, t2 = _sum_rows(PS1, PS2, 0, N * n_chunks, C, c, cm, BLOCK_P, BLOCK_C)
            tl.store(DB + c, t1, mask=cm)
            tl.store(DW + c, t2, mask=cm)


# ---------------------------------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------------------------------
def _dense(t: Tensor) -> Tensor:
    """``t`` as a dense NCHW or NHWC tensor. Both pass through untouched; anything else is copied into the format its
    strides suggest (channels-last stays channels-last), never with a bare ``.contiguous()``."""
    if t.is_contiguous() or t.is_contiguous(memory_format=torch.channels_last):
        return t
    fmt = torch.channels_last if t.dim() == 4 and t.stride(1) < t.stride(-1) else torch.contiguous_format
    return t.contiguous(memory_format=fmt)


def _nlc_addressable(t: Tensor) -> bool:
    """Whether the kernels can address ``t`` through (n, c, l) strides as it is: 4-D, with each channel plane's H*W
    positions one stride apart (l = h * W + w). Dense NCHW / NHWC tensors are, and so is a channel slice of one (the
    U-Net's concatenation buffer: ``buf[:, c0:c1]``)."""
    if t.dim() != 4:
        return False
    H, W = t.shape[2], t.shape[3]
    return H == 1 or W == 1 or t.stride(2) == W * t.stride(3)


def _check_out(out: Tensor, x: Tensor) -> Tensor:
    """``out`` for a forward launcher: x's shape, dtype and device, positions addressable by one stride, no two
    elements at one address (a channel slice of a dense buffer is the case this is for)."""
    if out.shape != x.shape or out.dtype != x.dtype or out.device != x.device:
        raise ValueError(f"norm_act: out= must match x ({tuple(x.shape)}, {x.dtype}, {x.device}), got "
                         f"({tuple(out.shape)}, {out.dtype}, {out.device})")
    if not _nlc_addressable(out) or any(st == 0 and n > 1 for st, n in zip(out.stride(), out.shape, strict=True)):
        raise ValueError(f"norm_act: out= with strides {out.stride()} is not a dense tensor or a channel slice of one")
    return out.fill_(float("nan")) if _POISON else out


def _nlc_strides(t: Tensor) -> tuple[int, int, int]:
    """(n, c, l) strides of a dense 4-D tensor, l = h * W + w. A size-1 dimension's stride is arbitrary in a
    contiguous tensor, so with W == 1 the position stride is H's."""
    sl = t.stride(3) if t.shape[3] > 1 else t.stride(2)
    return t.stride(0), t.stride(1), sl


def _next_pow2(v: int) -> int:
    return 1 << max(0, int(v) - 1).bit_length()


_SM_COUNT: dict = {}


def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 1
    if device not in _SM_COUNT:
        _SM_COUNT[device] = torch.cuda.get_device_properties(device).multi_processor_count
    return _SM_COUNT[device]


def _config(x: Tensor, stats: str) -> tuple[int, int, int, int, int]:
    """(BLOCK_C, BLOCK_L, chunk, n_chunks, num_warps) for dense ``x``.

    Tiles put the unit-stride dimension last in the loop order that coalesces: channels for NHWC (BLOCK_C up to 64),
    positions for NCHW (BLOCK_L up to 1024), ~4096 elements a tile on a GPU (8192 in the interpreter, where fewer,
    larger numpy steps are faster). Chunks split H*W so that about 4 programs per SM run; in the interpreter one chunk
    per sample (fewest programs). Untuned on a GPU so far."""
    N, C, H, W = x.shape
    L = H * W
    tile = 4096 if x.is_cuda else 8192
    if x.stride(1) == 1 and C > 1:  # channels-last
        bc = min(_next_pow2(C), 64)
        bl = max(1, min(_next_pow2(L), tile // bc))
    else:
        bl = min(_next_pow2(L), 1024)
        bc = max(1, min(_next_pow2(C), tile // bl))
    bc = _OVERRIDE.get("block_c", bc)
    bl = _OVERRIDE.get("block_l", bl)
    tiles_per_sample = triton.cdiv(L, bl)
    if "chunk" in _OVERRIDE:
        k_tiles = max(1, triton.cdiv(_OVERRIDE["chunk"], bl))
    elif not x.is_cuda:
        k_tiles = tiles_per_sample
    else:
        groups = N * triton.cdiv(C, bc)
        want_chunks = triton.cdiv(4 * _sm_count(x.device), groups)
        k_tiles = max(1, triton.cdiv(tiles_per_sample, want_chunks))
    chunk = k_tiles * bl
    n_chunks = triton.cdiv(L, chunk)
    num_warps = 8 if bc * bl >= 4096 else 4 if bc * bl >= 1024 else 2
    return bc, bl, chunk, n_chunks, num_warps


def _empty(shape, dtype, device) -> Tensor:
    t = torch.empty(shape, dtype=dtype, device=device)
    return t.fill_(float("nan")) if _POISON else t


def _empty_like(t: Tensor) -> Tensor:
    out = torch.empty_like(t)  # preserve_format: a dense t's strides are kept exactly
    return out.fill_(float("nan")) if _POISON else out


def _stats_shape(x: Tensor, stats: str) -> tuple[int, ...]:
    return (x.shape[0], x.shape[1]) if stats == "instance" else (x.shape[1],)


def _check_args(x: Tensor, stats: str, act: str) -> None:
    if x.dim() != 4:
        raise ValueError(f"norm_act expects a 4-D (N, C, H, W) tensor, got shape {tuple(x.shape)}")
    if stats not in STATS:
        raise ValueError(f"stats must be one of {STATS}, got {stats!r}")
    if act not in ACTS:
        raise ValueError(f"act must be one of {tuple(ACTS)}, got {act!r}")


_LAUNCH_LOG: list | None = None


@contextlib.contextmanager
def counted_launches():
    """Collect the names of the Triton kernels launched (eagerly) inside: benchmarks report launches per layer. Under
    compile with the triton_op registration the launchers run at trace time, so count eager calls only."""
    global _LAUNCH_LOG
    old, _LAUNCH_LOG = _LAUNCH_LOG, []
    try:
        yield _LAUNCH_LOG
    finally:
        _LAUNCH_LOG = old


def _launch(kernel, wrap: bool):
    # Called once per launch, right before kernel[grid](...).
    if _LAUNCH_LOG is not None:
        _LAUNCH_LOG.append(getattr(kernel, "__name__", None) or getattr(kernel.fn, "__name__", "?"))
    return torch.library.wrap_triton(kernel) if wrap else kernel


def _device_ctx(x: Tensor):
    return torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()


def _require_triton(x: Tensor) -> None:
    if not triton_usable(x.device):
        raise RuntimeError(f"the Triton norm_act kernels cannot run on {x.device}: they need CUDA, or, for CPU "
                           "tensors, TRITON_INTERPRET=1 set before fastp2p.kernels is imported (slow: tests only); use "
                           "backend='torch'" + (" (Triton is not installed)" if triton is None else ""))


class _Plan:
    """What every launcher derives from the input the same way: block sizes and chunking (``_config``), the channel
    blocks, stand-ins for an absent weight/bias, and the flags the kernels share."""

    def __init__(self, x: Tensor, weight: Tensor | None, bias: Tensor | None, stats: str, act: str):
        self.N, self.C, H, W = x.shape
        self.L = H * W
        self.bc, self.bl, self.chunk, self.n_chunks, self.nw = _config(x, stats)
        self.cb = triton.cdiv(self.C, self.bc)
        self.w = weight if weight is not None else x
        self.b = bias if bias is not None else x
        self.flags = dict(HAS_W=weight is not None, HAS_B=bias is not None, ACT=ACTS[act], BLOCK_C=self.bc,
                          BLOCK_L=self.bl, num_warps=self.nw)


def _bwd_start(dy: Tensor, x: Tensor, weight: Tensor | None, bias: Tensor | None, stats: str, act: str):
    """The backward launchers' common start: (x, dy, dx) dense, and the plan with the partial-sum buffers (None for
    an empty input, when dx and zero dw/db are the whole answer)."""
    _check_args(x, stats, act)
    _require_triton(x)
    # dy is read through its own strides: a channel slice of the next layer's gradient (unet_skip's join) as it is
    x, dy = _dense(x), (dy if _nlc_addressable(dy) else _dense(dy))
    dx = _empty_like(x)
    if x.numel() == 0:
        return x, dy, dx, None
    plan = _Plan(x, weight, bias, stats, act)
    plan.per_sample = stats == "instance"
    plan.flags["PER_SAMPLE"] = plan.per_sample
    plan.strides = (*_nlc_strides(dy), *_nlc_strides(x), *_nlc_strides(dx))
    rows = (plan.N * plan.n_chunks, plan.C)
    plan.ps1, plan.ps2 = _empty(rows, torch.float32, x.device), _empty(rows, torch.float32, x.device)
    plan.mode = 1 if stats == "running" else 2 if (plan.per_sample and plan.n_chunks == 1) else 0
    return x, dy, dx, plan


def norm_act_forward_triton(x: Tensor, weight: Tensor | None, bias: Tensor | None, mean_in: Tensor | None,
                            var_in: Tensor | None, stats: str, act: str, eps: float, slope: float,
                            _wrap: bool = False, out: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Launch the forward kernels: returns (y, mean, var), mean/var fp32 (biased variance), shaped (N, C) for
    ``"instance"`` and (C,) otherwise; for ``"running"`` they are fp32 copies of ``mean_in`` / ``var_in``. ``out``:
    write y there (x's shape and dtype; may be a channel slice of a larger buffer) and return it as y (eager
    callers only: the custom ops never pass it, since an op cannot return an alias of its input)."""
    _check_args(x, stats, act)
    _require_triton(x)
    x = _dense(x)
    N, C, H, W = x.shape
    L = H * W
    y = _empty_like(x) if out is None else _check_out(out, x)
    if stats == "running":
        mean = mean_in.detach().to(torch.float32, copy=True)
        var = var_in.detach().to(torch.float32, copy=True)
    else:
        mean = _empty(_stats_shape(x, stats), torch.float32, x.device)
        var = _empty(_stats_shape(x, stats), torch.float32, x.device)
    if x.numel() == 0:
        return y, mean, var
    plan = _Plan(x, weight, bias, stats, act)
    chunk, n_chunks, cb, w_, b_, flags = plan.chunk, plan.n_chunks, plan.cb, plan.w, plan.b, plan.flags
    sx, sy = _nlc_strides(x), _nlc_strides(y)
    with _device_ctx(x):
        if stats == "running":
            _launch(_fwd_apply_kernel, _wrap)[(n_chunks, N, cb)](
                x, y, w_, b_, mean, var, C, L, *sx, *sy, chunk, eps, slope, PER_SAMPLE=False, **flags)
        elif stats == "instance" and n_chunks == 1:
            _launch(_fwd_stats_kernel, _wrap)[(1, N, cb)](
                x, y, w_, b_, mean, mean, mean, var, C, L, *sx, *sy, chunk, 1, eps, slope, APPLY=True, **flags)
        else:
            pmean = _empty((N * n_chunks, C), torch.float32, x.device)
            pm2 = _empty((N * n_chunks, C), torch.float32, x.device)
            _launch(_fwd_stats_kernel, _wrap)[(n_chunks, N, cb)](
                x, y, w_, b_, pmean, pm2, mean, var, C, L, *sx, *sy, chunk, n_chunks, eps, slope, APPLY=False,
                **flags)
            per_sample = stats == "instance"
            P = n_chunks if per_sample else N * n_chunks
            total = float(L if per_sample else N * L)
            mbc = min(_next_pow2(C), 128)
            _launch(_fwd_merge_kernel, _wrap)[(triton.cdiv(C, mbc), N if per_sample else 1)](
                pmean, pm2, mean, var, C, L, chunk, n_chunks, P, total, BLOCK_C=mbc)
            _launch(_fwd_apply_kernel, _wrap)[(n_chunks, N, cb)](
                x, y, w_, b_, mean, var, C, L, *sx, *sy, chunk, eps, slope, PER_SAMPLE=per_sample, **flags)
    return y, mean, var


def norm_act_backward_triton(dy: Tensor, x: Tensor, weight: Tensor | None, bias: Tensor | None, mean: Tensor,
                             var: Tensor, stats: str, act: str, eps: float, slope: float,
                             _wrap: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """Launch the backward kernels: returns (dx, dweight, dbias); dweight/dbias are fp32 (C,) sums computed whether or
    not there is an affine (they fall out of the reduction that dx needs anyway)."""
    x, dy, dx, plan = _bwd_start(dy, x, weight, bias, stats, act)
    if plan is None:
        z = torch.zeros(x.shape[1], dtype=torch.float32, device=x.device)
        return dx, z, z.clone()
    N, C, L, chunk, n_chunks, cb = plan.N, plan.C, plan.L, plan.chunk, plan.n_chunks, plan.cb
    w_, b_, flags, strides, per_sample = plan.w, plan.b, plan.flags, plan.strides, plan.per_sample
    ps1, ps2, mode = plan.ps1, plan.ps2, plan.mode
    with _device_ctx(x):
        _launch(_bwd_reduce_kernel, _wrap)[(n_chunks, N, cb)](
            dy, x, dx, w_, b_, mean, var, ps1, ps2, C, L, *strides, chunk, n_chunks, eps, slope, MODE=mode, **flags)
        if mode == 0:
            if per_sample:
                s1, s2 = ps1.view(N, n_chunks, C).sum(1), ps2.view(N, n_chunks, C).sum(1)
            else:
                s1, s2 = ps1.sum(0), ps2.sum(0)
            total = float(L if per_sample else N * L)
            _launch(_bwd_apply_kernel, _wrap)[(n_chunks, N, cb)](
                dy, x, dx, w_, b_, mean, var, s1, s2, C, L, *strides, chunk, total, eps, slope, **flags)
    return dx, ps2.sum(0), ps1.sum(0)


def _block_p(rows: int, bc: int) -> int:
    """Rows per merge tile: [BLOCK_P, BLOCK_C] of about 4096 fp32 values, no more rows than there are."""
    return max(1, min(_next_pow2(rows), max(1, 4096 // bc)))


def norm_act_forward_v2(x: Tensor, weight: Tensor | None, bias: Tensor | None, mean_in: Tensor | None,
                        var_in: Tensor | None, running_mean: Tensor | None, running_var: Tensor | None,
                        num_batches_tracked: Tensor | None, stats: str, act: str, eps: float, slope: float,
                        momentum: float, cumulative: bool, _wrap: bool = False,
                        out: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """``norm_act_forward_triton`` in at most 2 launches, which also update ``running_mean`` / ``running_var`` (given
    for ``"batch"``: momentum ``momentum``, or the cumulative average when ``cumulative``) and bump
    ``num_batches_tracked`` (when given) in place, on the device: nothing is read back to the host. ``out`` as in
    ``norm_act_forward_triton``."""
    _check_args(x, stats, act)
    _require_triton(x)
    x = _dense(x)
    N, C, H, W = x.shape
    L = H * W
    y = _empty_like(x) if out is None else _check_out(out, x)
    mean = _empty(_stats_shape(x, stats), torch.float32, x.device)
    var = _empty(_stats_shape(x, stats), torch.float32, x.device)
    if x.numel() == 0:
        if stats == "running":
            mean.copy_(mean_in)
            var.copy_(var_in)
        return y, mean, var
    plan = _Plan(x, weight, bias, stats, act)
    bc, bl, chunk, n_chunks, nw, cb, w_, b_, flags = (plan.bc, plan.bl, plan.chunk, plan.n_chunks, plan.nw, plan.cb,
                                                      plan.w, plan.b, plan.flags)
    update = stats == "batch" and running_mean is not None and running_var is not None
    bump = stats == "batch" and num_batches_tracked is not None
    nbt = num_batches_tracked if bump else mean
    sx, sy = _nlc_strides(x), _nlc_strides(y)
    with _device_ctx(x):
        if stats == "running":
            _launch(_fwd_apply2_kernel, _wrap)[(n_chunks, N, cb)](
                x, y, w_, b_, mean_in, var_in, mean, var, nbt, C, L, *sx, *sy, chunk, eps, slope, PER_SAMPLE=False,
                COPY_STATS=True, BUMP=False, **flags)
        elif stats == "instance" and n_chunks == 1:
            _launch(_fwd_stats_kernel, _wrap)[(1, N, cb)](
                x, y, w_, b_, mean, mean, mean, var, C, L, *sx, *sy, chunk, 1, eps, slope, APPLY=True, **flags)
        else:
            per_sample = stats == "instance"
            pmean = _empty((N * n_chunks, C), torch.float32, x.device)
            pm2 = _empty((N * n_chunks, C), torch.float32, x.device)
            counters = torch.zeros(N * cb if per_sample else cb, dtype=torch.int32, device=x.device)
            total = float(L if per_sample else N * L)
            rm, rv = (running_mean, running_var) if update else (mean, var)
            _launch(_fwd_stats2_kernel, _wrap)[(n_chunks, N, cb)](
                x, pmean, pm2, mean, var, counters, rm, rv, nbt, C, L, *sx, chunk, n_chunks, N, total,
                float(momentum), PER_SAMPLE=per_sample, UPDATE=update, CUMULATIVE=bool(cumulative) and bump,
                BLOCK_C=bc, BLOCK_L=bl, BLOCK_P=_block_p(n_chunks if per_sample else N * n_chunks, bc),
                num_warps=nw)
            _launch(_fwd_apply2_kernel, _wrap)[(n_chunks, N, cb)](
                x, y, w_, b_, mean, var, mean, var, nbt, C, L, *sx, *sy, chunk, eps, slope, PER_SAMPLE=per_sample,
                COPY_STATS=False, BUMP=bump, **flags)
    return y, mean, var


def norm_act_backward_v2(dy: Tensor, x: Tensor, weight: Tensor | None, bias: Tensor | None, mean: Tensor,
                         var: Tensor, stats: str, act: str, eps: float, slope: float,
                         _wrap: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """``norm_act_backward_triton`` in at most 2 launches: sum(dz) and sum(dz * xhat) are reduced once (partials +
    the in-kernel merge) and give db, dw and dx's two mean terms."""
    x, dy, dx, plan = _bwd_start(dy, x, weight, bias, stats, act)
    if plan is None:
        z = torch.zeros(x.shape[1], dtype=torch.float32, device=x.device)
        return dx, z, z.clone()
    N, C, L, chunk, n_chunks, bc, cb = plan.N, plan.C, plan.L, plan.chunk, plan.n_chunks, plan.bc, plan.cb
    w_, b_, flags, strides, per_sample = plan.w, plan.b, plan.flags, plan.strides, plan.per_sample
    ps1, ps2, mode = plan.ps1, plan.ps2, plan.mode
    dw = _empty((C,), torch.float32, x.device)
    db = _empty((C,), torch.float32, x.device)
    if per_sample and mode == 0:
        s1, s2 = _empty((N, C), torch.float32, x.device), _empty((N, C), torch.float32, x.device)
    else:
        s1, s2 = db, dw
    counters = torch.zeros(cb, dtype=torch.int32, device=x.device)
    with _device_ctx(x):
        _launch(_bwd_reduce2_kernel, _wrap)[(n_chunks, N, cb)](
            dy, x, dx, w_, b_, mean, var, ps1, ps2, s1, s2, dw, db, counters, C, L, *strides, chunk, n_chunks, N, eps,
            slope, MODE=mode, BLOCK_P=_block_p(n_chunks if mode == 0 and per_sample else N * n_chunks, bc), **flags)
        if mode == 0:
            total = float(L if per_sample else N * L)
            _launch(_bwd_apply_kernel, _wrap)[(n_chunks, N, cb)](
                dy, x, dx, w_, b_, mean, var, s1, s2, C, L, *strides, chunk, total, eps, slope, **flags)
    return dx, dw, db


# ---------------------------------------------------------------------------------------------------------------------
# Custom ops: fastp2p::norm_act_fwd / fastp2p::norm_act_bwd (opaque custom_op; default) and the triton_op variants
# ---------------------------------------------------------------------------------------------------------------------
def _fwd_fake(x, weight, bias, mean_in, var_in, stats, act, eps, slope):
    _check_args(x, stats, act)
    x = _dense(x)
    shape = _stats_shape(x, stats)
    return (torch.empty_like(x), x.new_empty(shape, dtype=torch.float32), x.new_empty(shape, dtype=torch.float32))


def _bwd_fake(dy, x, weight, bias, mean, var, stats, act, eps, slope):
    x = _dense(x)
    C = x.shape[1]
    return torch.empty_like(x), x.new_empty((C,), dtype=torch.float32), x.new_empty((C,), dtype=torch.float32)


@torch.library.custom_op("fastp2p::norm_act_fwd", mutates_args=())
def norm_act_fwd(x: Tensor, weight: Tensor | None, bias: Tensor | None, mean_in: Tensor | None,
                 var_in: Tensor | None, stats: str, act: str, eps: float, slope: float
                 ) -> tuple[Tensor, Tensor, Tensor]:
    return norm_act_forward_triton(x, weight, bias, mean_in, var_in, stats, act, eps, slope)


@torch.library.custom_op("fastp2p::norm_act_bwd", mutates_args=())
def norm_act_bwd(dy: Tensor, x: Tensor, weight: Tensor | None, bias: Tensor | None, mean: Tensor, var: Tensor,
                 stats: str, act: str, eps: float, slope: float) -> tuple[Tensor, Tensor, Tensor]:
    return norm_act_backward_triton(dy, x, weight, bias, mean, var, stats, act, eps, slope)


norm_act_fwd.register_fake(_fwd_fake)
norm_act_bwd.register_fake(_bwd_fake)


if triton is not None:  # (the triton_op variants need Triton at registration)

    @torch.library.triton_op("fastp2p::norm_act_fwd_t", mutates_args=())
    def norm_act_fwd_t(x: Tensor, weight: Tensor | None, bias: Tensor | None, mean_in: Tensor | None,
                       var_in: Tensor | None, stats: str, act: str, eps: float, slope: float
                       ) -> tuple[Tensor, Tensor, Tensor]:
        return norm_act_forward_triton(x, weight, bias, mean_in, var_in, stats, act, eps, slope, _wrap=True)

    @torch.library.triton_op("fastp2p::norm_act_bwd_t", mutates_args=())
    def norm_act_bwd_t(dy: Tensor, x: Tensor, weight: Tensor | None, bias: Tensor | None, mean: Tensor, var: Tensor,
                       stats: str, act: str, eps: float, slope: float) -> tuple[Tensor, Tensor, Tensor]:
        return norm_act_backward_triton(dy, x, weight, bias, mean, var, stats, act, eps, slope, _wrap=True)


def _make_autograd(bwd_op):
    def setup_context(ctx, inputs, output):
        x, weight, bias, _mean_in, _var_in, stats, act, eps, slope = inputs
        _y, mean, var = output
        ctx.save_for_backward(x, weight, bias, mean, var)
        ctx.conf = (stats, act, eps, slope)
        ctx.mark_non_differentiable(mean, var)

    def backward(ctx, dy, _dmean, _dvar):
        x, weight, bias, mean, var = ctx.saved_tensors
        dx, dw, db = bwd_op(dy, x, weight, bias, mean, var, *ctx.conf)
        dw = dw.to(weight.dtype) if weight is not None and ctx.needs_input_grad[1] else None
        db = db.to(bias.dtype) if bias is not None and ctx.needs_input_grad[2] else None
        return dx if ctx.needs_input_grad[0] else None, dw, db, None, None, None, None, None, None

    return backward, setup_context


REGISTRATIONS = {"custom_op": torch.ops.fastp2p.norm_act_fwd}
_backward, _setup = _make_autograd(torch.ops.fastp2p.norm_act_bwd)
norm_act_fwd.register_autograd(_backward, setup_context=_setup)
if triton is not None:
    _backward, _setup = _make_autograd(torch.ops.fastp2p.norm_act_bwd_t)
    norm_act_fwd_t.register_autograd(_backward, setup_context=_setup)
    REGISTRATIONS["triton_op"] = torch.ops.fastp2p.norm_act_fwd_t


# v2 ops: fastp2p::norm_act_fwd2 updates the running statistics in place (declared in mutates_args, so compile
# functionalizes it), fastp2p::norm_act_bwd2 has norm_act_bwd's signature. Same outputs as v1.
def _fwd2_fake(x, weight, bias, mean_in, var_in, running_mean, running_var, num_batches_tracked, stats, act, eps,
               slope, momentum, cumulative):
    return _fwd_fake(x, weight, bias, mean_in, var_in, stats, act, eps, slope)


_MUTATED = ("running_mean", "running_var", "num_batches_tracked")


@torch.library.custom_op("fastp2p::norm_act_fwd2", mutates_args=_MUTATED)
def norm_act_fwd2(x: Tensor, weight: Tensor | None, bias: Tensor | None, mean_in: Tensor | None,
                  var_in: Tensor | None, running_mean: Tensor | None, running_var: Tensor | None,
                  num_batches_tracked: Tensor | None, stats: str, act: str, eps: float, slope: float, momentum: float,
                  cumulative: bool) -> tuple[Tensor, Tensor, Tensor]:
    return norm_act_forward_v2(x, weight, bias, mean_in, var_in, running_mean, running_var, num_batches_tracked,
                               stats, act, eps, slope, momentum, cumulative)


@torch.library.custom_op("fastp2p::norm_act_bwd2", mutates_args=())
def norm_act_bwd2(dy: Tensor, x: Tensor, weight: Tensor | None, bias: Tensor | None, mean: Tensor, var: Tensor,
                  stats: str, act: str, eps: float, slope: float) -> tuple[Tensor, Tensor, Tensor]:
    return norm_act_backward_v2(dy, x, weight, bias, mean, var, stats, act, eps, slope)


norm_act_fwd2.register_fake(_fwd2_fake)
norm_act_bwd2.register_fake(_bwd_fake)

if triton is not None:

    @torch.library.triton_op("fastp2p::norm_act_fwd2_t", mutates_args=_MUTATED)
    def norm_act_fwd2_t(x: Tensor, weight: Tensor | None, bias: Tensor | None, mean_in: Tensor | None,
                        var_in: Tensor | None, running_mean: Tensor | None, running_var: Tensor | None,
                        num_batches_tracked: Tensor | None, stats: str, act: str, eps: float, slope: float,
                        momentum: float, cumulative: bool) -> tuple[Tensor, Tensor, Tensor]:
        return norm_act_forward_v2(x, weight, bias, mean_in, var_in, running_mean, running_var, num_batches_tracked,
                                   stats, act, eps, slope, momentum, cumulative, _wrap=True)

    @torch.library.triton_op("fastp2p::norm_act_bwd2_t", mutates_args=())
    def norm_act_bwd2_t(dy: Tensor, x: Tensor, weight: Tensor | None, bias: Tensor | None, mean: Tensor,
                        var: Tensor, stats: str, act: str, eps: float, slope: float) -> tuple[Tensor, Tensor, Tensor]:
        return norm_act_backward_v2(dy, x, weight, bias, mean, var, stats, act, eps, slope, _wrap=True)


def _autograd2(fwd_op, bwd_op, name: str):
    """The differentiable v2 forward: an autograd.Function around the mutating op (torch.library cannot attach a
    formula to a mutating op; dynamo traces a Function whole, so fullgraph compile still holds)."""

    def forward(ctx, x, weight, bias, mean_in, var_in, running_mean, running_var, num_batches_tracked, stats, act,
                eps, slope, momentum, cumulative):
        y, mean, var = fwd_op(x, weight, bias, mean_in, var_in, running_mean, running_var, num_batches_tracked,
                              stats, act, eps, slope, momentum, cumulative)
        ctx.save_for_backward(x, weight, bias, mean, var)
        ctx.conf = (stats, act, eps, slope)
        ctx.mark_non_differentiable(mean, var)
        return y, mean, var

    def backward(ctx, dy, _dmean, _dvar):
        x, weight, bias, mean, var = ctx.saved_tensors
        dx, dw, db = bwd_op(dy, x, weight, bias, mean, var, *ctx.conf)
        dw = dw.to(weight.dtype) if weight is not None and ctx.needs_input_grad[1] else None
        db = db.to(bias.dtype) if bias is not None and ctx.needs_input_grad[2] else None
        return (dx if ctx.needs_input_grad[0] else None, dw, db) + (None,) * 11

    fn = type(name, (torch.autograd.Function,), {"forward": staticmethod(forward), "backward": staticmethod(backward)})
    return fn.apply


# (registration -> differentiable forward) per implementation; FusedNormAct picks by its ``variant``.
REGISTRATIONS_V2 = {"custom_op": _autograd2(torch.ops.fastp2p.norm_act_fwd2, torch.ops.fastp2p.norm_act_bwd2,
                                            "NormAct2")}
if triton is not None:
    REGISTRATIONS_V2["triton_op"] = _autograd2(torch.ops.fastp2p.norm_act_fwd2_t, torch.ops.fastp2p.norm_act_bwd2_t,
                                               "NormAct2TritonOp")
VARIANTS = ("v1", "v2")


def default_variant() -> str:
    """The implementation FusedNormAct uses unless given ``variant=``: ``FASTP2P_NORM_ACT_IMPL`` (read when a module
    is built), else v2 in the Triton interpreter (where its tests run) and v1 on a real GPU. v2 (2 launches each way,
    running statistics updated on the device) relies on a last-program-merges ticket whose memory ordering the
    interpreter, which runs programs one after another, cannot exercise: it becomes the GPU default once bench/gpu.sh's
    exactness rung has passed on one (``FASTP2P_NORM_ACT_IMPL=v2`` selects it before that); bench/kernels.py times
    both."""
    v = os.environ.get("FASTP2P_NORM_ACT_IMPL", "") or ("v2" if _interpreting() else "v1")
    if v not in VARIANTS:
        from fastp2p.errors import UserError

        raise UserError(f"FASTP2P_NORM_ACT_IMPL={v!r}: use v1 or v2 (unset: v2 in the interpreter, v1 on a GPU)")
    return v


# ---------------------------------------------------------------------------------------------------------------------
# Pure-torch implementations
# ---------------------------------------------------------------------------------------------------------------------
def norm_act_reference(x: Tensor, weight: Tensor | None = None, bias: Tensor | None = None,
                       mean_in: Tensor | None = None, var_in: Tensor | None = None, stats: str = "batch",
                       act: str = "none", eps: float = 1e-5, slope: float = 0.2) -> tuple[Tensor, Tensor, Tensor]:
    """The definition, written out (the tests' oracle): same signature and outputs as ``fastp2p::norm_act_fwd``,
    differentiable by autograd. Computes in float64 for float64 input, float32 otherwise; two-pass statistics."""
    _check_args(x, stats, act)
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    xf = x.to(acc)
    C = x.shape[1]
    if stats == "running":
        mean, var = mean_in.to(acc), var_in.to(acc)
        mb, vb = mean.view(1, C, 1, 1), var.view(1, C, 1, 1)
    else:
        dims = (2, 3) if stats == "instance" else (0, 2, 3)
        mb = xf.mean(dims, keepdim=True)
        vb = (xf - mb).square().mean(dims, keepdim=True)
        mean, var = (mb.view(-1, C), vb.view(-1, C)) if stats == "instance" else (mb.view(C), vb.view(C))
    z = (xf - mb) * torch.rsqrt(vb + eps)
    if weight is not None:
        z = z * weight.to(acc).view(1, C, 1, 1)
    if bias is not None:
        z = z + bias.to(acc).view(1, C, 1, 1)
    return _torch_act(z, act, slope).to(x.dtype), mean, var


def _torch_act(z: Tensor, act: str, slope: float) -> Tensor:
    if act == "relu":
        return F.relu(z)
    if act == "leaky_relu":
        return F.leaky_relu(z, slope)
    return z


def _fmt(x: Tensor):
    return torch.channels_last if (x.dim() == 4 and not x.is_contiguous()
                                   and x.is_contiguous(memory_format=torch.channels_last)) else torch.contiguous_format


# ---------------------------------------------------------------------------------------------------------------------
# Module
# ---------------------------------------------------------------------------------------------------------------------
def _per_sample_bn_type():
    try:
        from fastp2p.inference import PerSampleBatchNorm
    except ImportError:  # pragma: no cover - fastp2p.inference always ships with fastp2p
        return ()
    return (PerSampleBatchNorm,)


def norm_kind(m: nn.Module) -> str | None:
    """"batch" | "instance" | "per_sample_batch" for a norm this op can replace, else None. InstanceNorm with running
    statistics (not used by pix2pix) and non-2-D norms are left alone."""
    if type(m) is nn.BatchNorm2d:
        return "batch"
    if type(m) is nn.InstanceNorm2d and not m.track_running_stats:
        return "instance"
    if isinstance(m, _per_sample_bn_type()):
        return "per_sample_batch"
    return None


class FusedNormAct(nn.Module):
    """``act(norm(x))`` for a ``BatchNorm2d`` / ``InstanceNorm2d`` / ``PerSampleBatchNorm`` ``norm``, sharing its
    Parameters and buffers (same tensors, same names: the state_dict keys and values are the norm's), so swapping it in
    for ``norm`` changes no checkpoint. Behaves like ``norm`` followed by the activation in train and eval mode,
    including running-statistics updates (momentum, cumulative average for ``momentum=None``, unbiased variance,
    ``num_batches_tracked``).

    backend: ``"triton"`` (the fused kernels through ``registration``'s op) or ``"torch"`` (PyTorch's own
    ``F.batch_norm`` / ``F.instance_norm`` + activation: bit-identical to the unfused layers, plus channels-last kept).
    variant: the Triton implementation, ``"v1"`` or ``"v2"`` (default: see ``default_variant``).
    """

    _version = 2  # the version of _NormBase's state dict, so checkpoints move freely between fused and unfused

    def __init__(self, norm: nn.Module, act: str = "none", slope: float = 0.2, backend: str = "triton",
                 registration: str = "custom_op", variant: str | None = None):
        super().__init__()
        kind = norm_kind(norm)
        if kind is None:
            raise TypeError(f"FusedNormAct cannot replace {type(norm).__name__}")
        if act not in ACTS:
            raise ValueError(f"act must be one of {tuple(ACTS)}, got {act!r}")
        self.kind = kind
        self.act = act
        self.slope = float(slope)
        self.eps = float(norm.eps)
        self.momentum = getattr(norm, "momentum", None)
        self.track_running_stats = bool(getattr(norm, "track_running_stats", False))
        self.num_features = int(getattr(norm, "num_features", 0) or norm.weight.numel())
        for name, p in norm._parameters.items():
            self.register_parameter(name, p)
        for name, b in norm._buffers.items():
            self.register_buffer(name, b, persistent=name not in norm._non_persistent_buffers_set)
        self.train(norm.training)
        self.set_backend(backend, registration, variant)
        # The replaced modules, kept outside the module tree (no keys) for ``remove_fused_kernels``.
        self._replaced: tuple = (norm, None)

    def set_backend(self, backend: str, registration: str | None = None,
                    variant: str | None = None) -> "FusedNormAct":
        if backend not in ("triton", "torch"):
            raise ValueError(f"backend must be 'triton' or 'torch', got {backend!r}")
        if backend == "triton" and triton is None:
            raise RuntimeError("backend='triton' needs Triton (pip install 'fastp2p[kernels]', Linux)")
        registration = registration or getattr(self, "registration", "custom_op")
        if registration not in ("custom_op", "triton_op"):
            raise ValueError(f"registration must be 'custom_op' or 'triton_op', got {registration!r}")
        variant = variant or getattr(self, "variant", None) or default_variant()
        if variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
        self.backend, self.registration, self.variant = backend, registration, variant
        return self

    def extra_repr(self) -> str:
        return (f"{self.num_features}, kind={self.kind}, act={self.act}" + (f", slope={self.slope}" if
                self.act == "leaky_relu" else "") + f", eps={self.eps}, backend={self.backend}"
                + (f", variant={self.variant}" if self.backend == "triton" else ""))

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # As _NormBase: checkpoints from before num_batches_tracked existed load with a zero count.
        version = local_metadata.get("version", None)
        if (version is None or version < 2) and self.track_running_stats and self.kind == "batch":
            key = prefix + "num_batches_tracked"
            if key not in state_dict:
                state_dict[key] = torch.tensor(0, dtype=torch.long) if self.num_batches_tracked is None \
                    else self.num_batches_tracked
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    # -- statistics mode, mirroring _BatchNorm.forward --
    def _mode(self) -> tuple[str, bool]:
        """(stats, update running statistics)."""
        if self.kind in ("instance", "per_sample_batch"):
            return "instance", False
        use_batch = self.training or (self.running_mean is None and self.running_var is None)
        update = self.training and self.track_running_stats
        return ("batch" if use_batch else "running"), update

    def _momentum(self) -> float:
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        return factor

    def _checked_mode(self, x: Tensor) -> tuple[str, bool]:
        """``_mode()`` after the input checks ``nn.BatchNorm2d`` / ``nn.InstanceNorm2d`` make (same messages)."""
        if x.dim() != 4:
            raise ValueError(f"expected 4D input (got {x.dim()}D input)")
        stats, update = self._mode()
        if stats == "batch" and self.training and x.numel() // x.shape[1] <= 1:
            raise ValueError(f"Expected more than 1 value per channel when training, got input size {tuple(x.shape)}")
        if stats == "instance" and x.shape[2] * x.shape[3] <= 1:
            raise ValueError(f"Expected more than 1 spatial element when training, got input size {tuple(x.shape)}")
        return stats, update

    def forward(self, x: Tensor) -> Tensor:
        stats, update = self._checked_mode(x)
        if self.backend == "torch":
            return self._forward_torch(x, stats)
        if self.variant == "v2":
            return self._forward_v2(x, stats, update)
        factor = self._momentum() if update else 0.0
        y, mean, var = REGISTRATIONS[self.registration](
            x, self.weight, self.bias, self.running_mean if stats == "running" else None,
            self.running_var if stats == "running" else None, stats, self.act, self.eps, self.slope)
        if update:
            self._update_running_v1(x, mean, var, factor)
        return y

    def _update_running_v1(self, x: Tensor, mean: Tensor, var: Tensor, factor: float) -> None:
        # v1: nn.BatchNorm2d's running-statistics update, from the batch statistics the kernels returned
        if self.running_mean is None:
            return
        with torch.no_grad():
            m = x.numel() // x.shape[1]
            rm, rv = self.running_mean, self.running_var
            rm.copy_(mean * factor + rm * (1.0 - factor))
            rv.copy_(var * (factor * m / (m - 1)) + rv * (1.0 - factor))

    # -- eager entry points for callers that place the output themselves (kernels.unet_skip's slice writes) --
    def forward_into(self, x: Tensor, out: Tensor, act: str | None = None) -> tuple[Tensor, Tensor, str]:
        """``act(norm(x))`` written into ``out`` (x's shape and dtype, e.g. a channel slice of a concatenation
        buffer) by the Triton kernels of this module's variant, running statistics moved as ``forward`` moves them.
        ``act`` overrides the module's own (unet_skip applies the join's ReLU here). No autograd: the caller's
        ``autograd.Function`` saves x, the returned fp32 (mean, var) and the stats mode for ``backward_from``."""
        if self.backend != "triton":
            raise RuntimeError("FusedNormAct.forward_into needs backend='triton'")
        act = self.act if act is None else act
        stats, update = self._checked_mode(x)
        running = stats == "running"
        rm_in = self.running_mean if running else None
        rv_in = self.running_var if running else None
        if self.variant == "v2":
            nbt = self.num_batches_tracked if update else None
            _y, mean, var = norm_act_forward_v2(
                x, self.weight, self.bias, rm_in, rv_in, self.running_mean if update else None,
                self.running_var if update else None, nbt, stats, act, self.eps, self.slope,
                0.0 if self.momentum is None else float(self.momentum), self.momentum is None and nbt is not None,
                out=out)
            return mean, var, stats
        factor = self._momentum() if update else 0.0
        _y, mean, var = norm_act_forward_triton(x, self.weight, self.bias, rm_in, rv_in, stats, act, self.eps,
                                                self.slope, out=out)
        if update:
            self._update_running_v1(x, mean, var, factor)
        return mean, var, stats

    def backward_from(self, dy: Tensor, x: Tensor, mean: Tensor, var: Tensor, stats: str,
                      act: str | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """The backward of ``forward_into``: (dx, dweight, dbias), the last two fp32 (C,). ``dy`` may be a channel
        slice of the buffer's gradient: it is read through its strides, not copied."""
        act = self.act if act is None else act
        bwd = norm_act_backward_v2 if self.variant == "v2" else norm_act_backward_triton
        return bwd(dy, x, self.weight, self.bias, mean, var, stats, act, self.eps, self.slope)

    def _forward_v2(self, x: Tensor, stats: str, update: bool) -> Tensor:
        # One op call: the kernels update the running statistics and num_batches_tracked on the device, and
        # momentum=None's factor 1 / num_batches_tracked is read there too (no host sync, no extra torch ops).
        running = stats == "running"
        rm = self.running_mean if update else None
        rv = self.running_var if update else None
        nbt = self.num_batches_tracked if update else None
        momentum = 0.0 if self.momentum is None else float(self.momentum)
        y, _mean, _var = REGISTRATIONS_V2[self.registration](
            x, self.weight, self.bias, self.running_mean if running else None,
            self.running_var if running else None, rm, rv, nbt, stats, self.act, self.eps, self.slope, momentum,
            self.momentum is None and nbt is not None)
        return y

    def _forward_torch(self, x: Tensor, stats: str) -> Tensor:
        if stats == "instance":
            fmt = _fmt(x)
            # F.instance_norm reshapes through .contiguous(): put channels-last back (one copy, as the unfused model
            # would pay at the next conv anyway).
            y = F.instance_norm(x, None, None, self.weight, self.bias, True, 0.1, self.eps).contiguous(
                memory_format=fmt)
        else:
            factor = self._momentum() if (self.training and self.track_running_stats) else 0.0
            y = F.batch_norm(x, self.running_mean if not self.training or self.track_running_stats else None,
                             self.running_var if not self.training or self.track_running_stats else None,
                             self.weight, self.bias, stats == "batch", factor, self.eps)
        return _torch_act(y, self.act, self.slope)

    def unfused(self) -> tuple[nn.Module, nn.Module | None]:
        """The replaced (norm, activation), pointing at this module's current tensors and train flag."""
        norm, act_mod = self._replaced
        for name in list(norm._parameters):
            norm._parameters[name] = self._parameters[name]
        for name in list(norm._buffers):
            norm._buffers[name] = self._buffers[name]
        norm.train(self.training)
        return norm, act_mod


# ---------------------------------------------------------------------------------------------------------------------
# Model transform
# ---------------------------------------------------------------------------------------------------------------------
def _act_of(m: nn.Module) -> tuple[str, float] | None:
    if type(m) is nn.LeakyReLU:
        return "leaky_relu", float(m.negative_slope)
    if type(m) is nn.ReLU:
        return "relu", 0.0
    return None


def _fuse(norm: nn.Module, act_mod: nn.Module | None, backend: str, registration: str,
          variant: str | None = None) -> FusedNormAct:
    act, slope = _act_of(act_mod) if act_mod is not None else ("none", 0.2)
    f = FusedNormAct(norm, act, slope, backend, registration, variant)
    f._replaced = (norm, act_mod)
    return f


# (norm list, activation list) attribute pairs of a parent module, fused element-wise: the U-Net's down path once it
# holds its LeakyReLUs as modules (``down_act``).
PAIRED_LISTS = (("down_norm", "down_act"),)


def apply_fused_kernels(model: nn.Module, backend: str = "triton", *, registration: str = "custom_op",
                        norms_alone: bool = True, variant: str | None = None) -> nn.Module:
    """Swap norm + activation pairs for ``FusedNormAct`` in place; returns ``model``. State-dict keys do not change.

    - ``nn.Sequential`` ``[..., norm, LeakyReLU | ReLU, ...]`` -> ``[..., FusedNormAct(act), Identity, ...]`` (indices
      kept: PatchGAN's ``model.3``, ``net.3`` ...).
    - A parent with ModuleLists ``down_norm`` and ``down_act`` (see ``PAIRED_LISTS``): ``down_norm[i]`` fused with
      ``down_act[i]``, which becomes ``Identity``.
    - ``norms_alone``: every other supported norm becomes ``FusedNormAct(act="none")`` (the U-Net's ``up_norm`` and,
      while its LeakyReLU is functional, ``down_norm``).
    - Already fused modules switch to ``backend``/``registration`` (so calling it again is how to switch backends),
      and to ``variant`` when given (``None``: new modules take ``default_variant()``, fused ones keep theirs).

    Apply it after ``fastp2p.models.init_weights`` and after ``fastp2p.inference.with_mode`` (both look for
    ``nn.BatchNorm2d``), before ``torch.compile``; undo it with ``remove_fused_kernels`` (e.g. before ONNX export).
    """
    if backend not in ("triton", "torch"):
        raise ValueError(f"backend must be 'triton' or 'torch', got {backend!r}")
    if backend == "triton" and triton is None:
        raise RuntimeError("backend='triton' needs Triton (pip install 'fastp2p[kernels]', Linux); use backend='torch'")
    for parent in list(model.modules()):
        if isinstance(parent, nn.Sequential):
            mods = list(parent)
            for i in range(len(mods) - 1):
                if norm_kind(mods[i]) and _act_of(mods[i + 1]):
                    parent[i] = _fuse(mods[i], mods[i + 1], backend, registration, variant)
                    parent[i + 1] = nn.Identity()
        for norm_name, act_name in PAIRED_LISTS:
            norms, acts = getattr(parent, norm_name, None), getattr(parent, act_name, None)
            if isinstance(norms, nn.ModuleList) and isinstance(acts, nn.ModuleList) and len(norms) == len(acts):
                for i in range(len(norms)):
                    if norm_kind(norms[i]) and _act_of(acts[i]):
                        norms[i] = _fuse(norms[i], acts[i], backend, registration, variant)
                        acts[i] = nn.Identity()
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, FusedNormAct):
                child.set_backend(backend, registration, variant)
            elif norms_alone and norm_kind(child):
                setattr(parent, name, _fuse(child, None, backend, registration, variant))
    return model


def remove_fused_kernels(model: nn.Module) -> nn.Module:
    """Undo ``apply_fused_kernels`` in place (the original norm and activation modules come back, holding the current
    Parameters and buffers); returns ``model``."""
    for parent in list(model.modules()):
        children = list(parent.named_children())
        for idx, (name, child) in enumerate(children):
            if not isinstance(child, FusedNormAct):
                continue
            norm, act_mod = child.unfused()
            setattr(parent, name, norm)
            if act_mod is None:
                continue
            if isinstance(parent, nn.Sequential):
                parent[idx + 1] = act_mod
            else:
                grand = [p for p in model.modules() if any(c is parent for c in p.children())]
                for g in grand:
                    for norm_name, act_name in PAIRED_LISTS:
                        if getattr(g, norm_name, None) is parent:
                            getattr(g, act_name)[int(name)] = act_mod
    return model


def default_backend() -> str:
    """``"triton"`` when the kernels can run here on a GPU, else ``"torch"``."""
    return "triton" if triton is not None and torch.cuda.is_available() else "torch"

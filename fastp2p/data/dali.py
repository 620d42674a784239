"""NVIDIA DALI loader: the reference pix2pix preprocessing as a DALI graph, on the GPU (``device='mixed'`` decode,
nvJPEG with the hardware decoder) or on CPU threads (``device_id=None``), behind the ``PairLoader`` contract.

Graph (one pipeline for every epoch, see "Epochs"):

    fn.external_source (one callable, per batch): file path(s) as UTF-8 bytes, the per-sample plan (resize h, w, crop
      y, x, h, w, flip: ONE vector per pair feeding both halves) and the file index as a label
    path -> fn.io.file.read -> fn.decoders.image (mixed on CUDA, cpu otherwise) -> exact halves (aligned A|B: fn.slice
      at rel 0 / 0.5 of an even width; two folders: a second path, read and decoded the same way) -> [grayscale] ->
      fn.resize (cubic, antialiased) -> fn.slice (crop, zero padding past the border) -> fn.crop_mirror_normalize
      (mirror, [-1, 1], fp32/fp16, HWC or CHW)

The per-pair numbers come from the torch path's own ``get_params`` draw (``random.Random(derive_seed(seed, epoch,
index))``) through ``plan.item_plan``, so for a (seed, epoch) this loader yields the same pairs, crops and flips as
``make_loader``, batch for batch; pixels differ only by the resampler (DALI's cubic vs PIL's bicubic: at most a few
uint8 levels, see tests/test_dali.py). Crop and flip are not drawn with DALI's random operators on purpose: a draw
from (seed, epoch, index) makes ``--resume`` exact and the backends interchangeable.

Output. ``channels_last=True``: HWC batches viewed as channels-last NCHW tensors (``permute``, no copy); otherwise the
graph writes CHW and the tensor is plain NCHW (also no copy). dtype: fp32 or fp16 straight from the graph; bf16
(which DALI does not produce) is one conversion from fp32.

Stream handover (GPU). ``pipe.run(torch.cuda.current_stream())`` binds the outputs to torch's stream (DALI orders
them on it; without a stream ``run`` host-synchronizes every batch), and each output is then copied into a tensor
torch allocated, on that same stream, with DALI's ``feed_ndarray(..., cuda_stream=torch.cuda.current_stream())`` (the
pattern of DALI's own PyTorch iterator; DALI keeps the source buffer until that non-blocking copy has run). Chosen
over a zero-copy DLPack view because the view's memory belongs to DALI: when torch drops it, DALI can hand the
buffer to a later iteration on its own stream while torch kernels reading it are still queued on torch's stream,
and torch cannot ``record_stream`` foreign memory; a copy makes the batch torch's, freed in torch's stream order.
Cost: one device copy of A and B (batch 64 at 256x256 fp32: 2 x 50 MB, an estimated ~50 us on an H100/H200 against
a training step of several ms; not measured: no DALI on the GPU machine so far). On the CPU there are no streams and
the batch stays a zero-copy DLPack view of DALI's buffer.

**On the CPU a batch is only guaranteed valid until the next one is requested** (DALI may recycle its buffers): use
it within the step, and ``.clone()`` anything kept longer. (With DALI's default dynamic executor the DLPack view
keeps the buffer alive, but that is DALI's implementation, not this contract.) On the GPU batches are torch's own
tensors (valid indefinitely). ``fastp2p.train.fit`` keeps no batch across steps.

Epochs. The shard's pairs of epoch ``e`` are ``plan.epoch_slice`` (the torch loader's order; with several shards
each gets ``ceil(n / num_shards)`` pairs). ``len(loader)`` = ``ceil(pairs / batch_size)``; the last batch is partial
(the external source feeds a smaller batch), unless ``drop_last``, where ``floor`` batches are yielded and the
remainder is not read. The pipeline is built once and reused by every epoch (building it initializes nvJPEG and the
decoders): the order lives in what the external source is fed, not in a reader, so an epoch ends when its inputs
run out (StopIteration from the source) and ``pipe.reset()`` rearms the pipeline for the next one. The graph has no
random operators and no state across iterations, so each epoch is still a pure function of (files, config, seed,
epoch), equal to what a freshly built pipeline gives (tested); ``epoch(e, start=k)`` feeds batches ``k..`` only and
reads nothing before them. An epoch abandoned midway (``max_steps``, an exception in the step) leaves at most
``prefetch`` batches scheduled in DALI: the next ``batches()`` call runs and drops them before starting its own.

Bad input. DALI fails a whole pipeline on an undecodable file, sometimes naming it and sometimes not ("nvImageCodec
failure"). On a failure the files of the batches in flight are decoded with PIL to name the culprit: a one-line
``DataError`` naming the file, or with ``skip_bad`` the file is recorded in ``bad_files`` (warning, logger
``fastp2p.data``) and replaced by the next good pair (as the torch dataset does), and a new pipeline (the only
rebuild: DALI's pipeline is unusable after a failure) continues the epoch at the same batch. Never a hang: the
failure is raised by ``run()``. Unlike PIL, DALI's decoders accept some corrupt JPEGs with only a warning (e.g.
damaged entropy-coded data decodes to gray blocks); those are not caught.
"""

from __future__ import annotations

import logging
import random
import re
from collections.abc import Iterator

import numpy as np
import torch

from ..errors import DataError, UserError
from .datasets import BadFile, PairDataset, TwoFolderDataset, derive_seed, load_rgb, probe_size
from .loader import Batch, EpochLoader
from .plan import batches_per_epoch, epoch_slice, item_plan, next_good
from .transforms import get_params

log = logging.getLogger("fastp2p.data")

# Share of JPEG decoding sent to the hardware decoder (A100/H100 nvJPEG engine) with device='mixed'; the rest runs
# on CUDA cores. 0.65 is DALI's recommended setting for A100/H100-class GPUs (RN50 training).
HW_DECODER_LOAD = 0.65
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def decode(paths: list[str], device: str = "cpu", num_threads: int = 1) -> list[np.ndarray]:
    """Decode files to RGB uint8 HWC arrays with DALI alone (``fn.decoders.image``); for tests and the benchmark."""
    from nvidia.dali import fn, types
    from nvidia.dali.pipeline import Pipeline

    gpu = device != "cpu"
    pipe = Pipeline(batch_size=len(paths), num_threads=num_threads, device_id=0 if gpu else None)
    with pipe:
        jpegs, _ = fn.readers.file(files=list(paths))
        pipe.set_outputs(fn.decoders.image(jpegs, device="mixed" if gpu else "cpu", output_type=types.RGB))
    pipe.build()
    (out,) = pipe.run()
    if gpu:
        out = out.as_cpu()
    return [np.array(out[i]) for i in range(len(paths))]


class _PipelineFailed(Exception):
    def __init__(self, cause: BaseException):
        self.cause = cause


class _Feed:
    """The external source's callable: each call hands DALI the next batch of the epoch in flight; StopIteration
    (the epoch's inputs exhausted, or ``stop()``) ends the epoch on DALI's side."""

    def __init__(self):
        self._inputs = iter(())
        self.active = False  # an epoch started and not yet ended with reset()

    def start(self, inputs) -> None:
        self._inputs, self.active = iter(inputs), True

    def stop(self) -> None:
        self._inputs = iter(())

    def __call__(self):
        return next(self._inputs)


class DaliLoader(EpochLoader):
    """DALI-backed loader with the ``PairLoader`` contract (module docstring: output, epochs, bad input)."""

    def __init__(self, dataset: PairDataset, batch_size: int, seed: int, *, device: str | torch.device = "cpu",
                 num_threads: int = 2, shard_id: int = 0, num_shards: int = 1, drop_last: bool = False,
                 shuffle: bool = True, dtype: torch.dtype = torch.float32, channels_last: bool = True,
                 prefetch: int = 2):
        from .plan import file_backed

        if batch_size < 1:
            raise UserError(f"--batch_size must be >= 1 (got {batch_size})")
        if not file_backed(dataset):
            raise UserError("--loader dali: the built-in synthetic dataset has no image files for DALI to read; "
                            "pass --data, or use --loader torch / gpu-cache")
        if dtype not in _DTYPES:
            raise ValueError(f"dtype {dtype} not supported; use one of {_DTYPES}")
        if not 0 <= shard_id < num_shards:
            raise ValueError(f"shard_id {shard_id} outside 0..{num_shards - 1}")
        self.dataset = dataset
        self.cfg = dataset.cfg
        self.batch_size, self.seed = batch_size, int(seed)
        self.device = torch.device(device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise UserError("--device cuda: no CUDA device is available here; use --device cpu")
        self.num_threads = max(1, int(num_threads))
        self.shard_id, self.num_shards = shard_id, num_shards
        self.drop_last, self.shuffle = drop_last, shuffle
        self.dtype, self.channels_last, self.prefetch = dtype, channels_last, prefetch
        self.folders = isinstance(dataset, TwoFolderDataset)
        self.next_epoch = 0
        self._bad: dict[int, BadFile] = {}  # dataset index -> (path, problem), found by this loader
        self._sizes: dict[int, tuple[int, int]] = {}
        self._pipe = None
        self._feed = _Feed()
        self._names: dict[tuple[int, int], np.ndarray] = {}
        n = len(dataset)
        self._per_shard = len(epoch_slice(n, 0, 0, False, shard_id, num_shards))

    # -- contract ------------------------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return batches_per_epoch(self._per_shard, self.batch_size, self.drop_last)

    def set_epoch(self, epoch: int) -> None:
        self.next_epoch = int(epoch)

    def close(self) -> None:
        """Drop the DALI pipeline (stops its threads and frees its buffers)."""
        self._pipe = None
        self._feed.active = False

    # -- one pipeline, many epochs -------------------------------------------------------------------------------------
    def _idle_pipeline(self):
        """The pipeline, built on first use, with no epoch in flight (an epoch abandoned midway is drained first)."""
        if self._pipe is not None and self._feed.active:
            self._end_epoch()
        if self._pipe is None:
            self._pipe = self._build()
        return self._pipe

    def _end_epoch(self) -> None:
        """End the epoch in flight: the feed stops, the batches DALI already scheduled (at most ``prefetch``) are
        run and dropped, and ``reset()`` rearms the pipeline (its next ``run`` prefetches the next epoch)."""
        self._feed.stop()
        try:
            while True:
                self._run(self._pipe)
        except StopIteration:
            self._pipe.reset()
        except RuntimeError:  # a bad file among the dropped batches: the next epoch builds a fresh pipeline
            self._pipe = None
        self._feed.active = False

    def _run(self, pipe):
        if self.device.type == "cuda":
            # Outputs bound to torch's current stream: DALI orders them on it, and the host does not wait for the GPU
            # (without a stream, run() returns host-synchronized outputs: one full GPU sync per batch).
            return pipe.run(torch.cuda.current_stream(self.device))
        return pipe.run()

    def _epoch_inputs(self, files_idx: list[tuple[int, int]], plans: list[np.ndarray], k: int, nb: int):
        """Per batch ``k..nb-1``: the external source's outputs (file names [A], [B], plans, labels)."""
        bs = self.batch_size
        for b in range(k, nb):
            files = [j for _, j in files_idx[b * bs:(b + 1) * bs]]
            names = [[self._name(j, side) for j in files] for side in ((0, 1) if self.folders else (0,))]
            yield (*names, plans[b * bs:b * bs + len(files)], [np.array([j], dtype=np.int32) for j in files])

    def _name(self, j: int, side: int) -> np.ndarray:
        """File ``j``'s path (side 1: the B file of two folders) as the UTF-8 bytes ``fn.io.file.read`` takes."""
        if (j, side) not in self._names:
            path = self.dataset.pairs[j][side] if self.folders else self.dataset.paths[j]
            self._names[(j, side)] = np.frombuffer(str(path).encode("utf-8"), dtype=np.uint8)
        return self._names[(j, side)]

    def batches(self, epoch: int | None = None, start: int = 0) -> Iterator[Batch]:
        epoch = self.next_epoch if epoch is None else int(epoch)
        nb = len(self)
        if not 0 <= start <= nb:
            raise ValueError(f"start batch {start} outside 0..{nb} (batches per epoch)")
        bs, k = self.batch_size, start
        while k < nb:
            files_idx = self._files(epoch)
            plans = self._plans(epoch, files_idx)
            try:
                pipe = self._idle_pipeline()
                self._feed.start(self._epoch_inputs(files_idx, plans, k, nb))
                while k < nb:
                    try:
                        outs = self._run(pipe)
                    except StopIteration:  # the feed holds exactly nb - start batches: never before the end
                        raise RuntimeError("DALI ended the epoch early: fewer batches than planned") from None
                    except RuntimeError as e:  # DALI's pipeline failure (the pipeline is unusable after it)
                        raise _PipelineFailed(e) from e
                    chunk = [j for _, j in files_idx[k * bs:(k + 1) * bs]]
                    yield self._to_batch(outs, chunk, len(chunk))
                    k += 1
            except _PipelineFailed as f:
                self._pipe = None
                self._on_failure(f.cause, files_idx, k)  # raises DataError, or records the bad file(s)
        if self._pipe is not None:
            self._end_epoch()  # nothing in flight: StopIteration at once, then reset for the next epoch

    # -- epoch content -------------------------------------------------------------------------------------------------
    def _files(self, epoch: int) -> list[tuple[int, int]]:
        """(index, file) per position of this shard's epoch: the file is the index's pair, or the next good one."""
        n = len(self.dataset)
        idx = epoch_slice(n, self.seed, epoch, self.shuffle, self.shard_id, self.num_shards)
        return [(i, next_good(i, self._bad, n) if self._bad else i) for i in idx]

    def _size(self, j: int) -> tuple[int, int]:
        if j not in self._sizes:
            w, h = probe_size(self.dataset.paths[j], self.dataset.cfg.max_pixels)
            self._sizes[j] = (w, h) if self.folders else (w // 2, h)
        return self._sizes[j]

    def _plans(self, epoch: int, files_idx: list[tuple[int, int]]) -> list[np.ndarray]:
        out = []
        for i, j in files_idx:
            size = self._size(j)
            params = get_params(self.cfg, size, random.Random(derive_seed(self.seed, epoch, i)))
            out.append(np.array(item_plan(self.cfg, size, params), dtype=np.int32))
        return out

    # -- the DALI graph ----------------------------------------------------------------------------------------------
    def _build(self):
        """The DALI graph, for every epoch: file names, plans and labels come from ``self._feed`` per batch."""
        from nvidia.dali import fn, types
        from nvidia.dali.pipeline import Pipeline

        gpu = self.device.type == "cuda"
        cfg = self.cfg
        # exec_dynamic (DALI's default execution model, named here because run(stream) and DLPack lifetimes need it).
        pipe = Pipeline(batch_size=self.batch_size, num_threads=self.num_threads,
                        device_id=(self.device.index or 0) if gpu else None, exec_dynamic=True,
                        prefetch_queue_depth=self.prefetch, seed=derive_seed(self.seed, -2))
        sides = 2 if self.folders else 1
        with pipe:
            *names, plan, label = fn.external_source(
                source=self._feed, num_outputs=sides + 2, batch=True, dtype=[types.UINT8] * sides + [types.INT32] * 2,
                ndim=[1] * (sides + 2))
            decode = {"device": "mixed" if gpu else "cpu", "output_type": types.RGB}
            if gpu:
                decode["hw_decoder_load"] = HW_DECODER_LOAD
            imgs = [fn.decoders.image(fn.io.file.read(name), **decode) for name in names]
            if self.folders:
                a, b = imgs
            else:  # the reference's split at int(w / 2) of an even width (odd widths are rejected by the dataset)
                a = fn.slice(imgs[0], rel_start=[0.0, 0.0], rel_shape=[1.0, 0.5], axis_names="HW")
                b = fn.slice(imgs[0], rel_start=[0.0, 0.5], rel_shape=[1.0, 0.5], axis_names="HW")
            src, tgt = (b, a) if cfg.direction == "BtoA" else (a, b)
            outs = [self._augment(x, plan, nc, fn, types)
                    for x, nc in ((src, self.dataset.input_nc), (tgt, self.dataset.output_nc))]
            pipe.set_outputs(*outs, label)
        pipe.build()
        return pipe

    def _augment(self, x, plan, nc: int, fn, types):
        cfg = self.cfg
        if nc == 1:  # before the resize, like the reference (Grayscale is the first transform)
            x = fn.color_space_conversion(x, image_type=types.RGB, output_type=types.GRAY)
        if cfg.preprocess != "crop":  # to the image's own size is the identity (tested)
            x = fn.resize(x, resize_y=fn.cast(plan[0], dtype=types.FLOAT), resize_x=fn.cast(plan[1], dtype=types.FLOAT),
                          interp_type=types.INTERP_CUBIC, antialias=True)
        if "crop" in cfg.preprocess:
            x = fn.slice(x, start=plan[2:4], shape=plan[4:6], axis_names="HW", out_of_bounds_policy="pad",
                         fill_values=0)
        # (v - 127.5) / 127.5 == (v / 255 - 0.5) / 0.5 to within an ulp
        return fn.crop_mirror_normalize(x, mirror=plan[6], mean=[127.5] * nc, std=[127.5] * nc,
                                        dtype=types.FLOAT16 if self.dtype == torch.float16 else types.FLOAT,
                                        output_layout="HWC" if self.channels_last else "CHW")

    # -- DALI -> torch -------------------------------------------------------------------------------------------------
    def _to_batch(self, outs, expected: list[int], m: int) -> Batch:
        # The labels travel through the graph with the images (CPU outputs: reading them syncs nothing): a check
        # that this output is the batch planned for this step.
        label = np.asarray(outs[2].as_tensor()).ravel()
        if not np.array_equal(label, np.asarray(expected)):
            raise RuntimeError(f"DALI output order differs from the planned epoch order: {label} != {expected}")
        A, B = (self._tensor(o)[:m] for o in outs[:2])
        paths = [self.dataset.paths[j] for j in expected[:m]]
        return Batch(A, B, paths, ())

    def _tensor(self, tl) -> torch.Tensor:
        try:
            t = tl.as_tensor()
        except RuntimeError:
            shapes = sorted({tuple(s) for s in tl.shape()})
            raise UserError(f"--batch_size: pairs in one batch have different sizes after preprocessing ({shapes}); "
                            f"use a fixed-size --preprocess (e.g. resize_and_crop) or --batch_size 1") from None
        if self.device.type == "cuda":
            # A copy on torch's current stream into torch's own memory (module docstring: "Stream handover").
            from nvidia.dali.plugin.pytorch import feed_ndarray

            x = torch.empty(t.shape(), dtype=torch.float16 if self.dtype == torch.float16 else torch.float32,
                            device=self.device)
            feed_ndarray(t, x, cuda_stream=torch.cuda.current_stream(self.device))
        else:
            x = torch.from_dlpack(t)  # zero-copy: the DALI buffer itself (host memory, no streams to order)
        if self.channels_last:
            x = x.permute(0, 3, 1, 2)  # NHWC memory viewed as NCHW: channels-last strides, no copy
        if self.dtype == torch.bfloat16:
            x = x.to(torch.bfloat16)  # keeps the memory format
        return x

    # -- failures ------------------------------------------------------------------------------------------------------
    def _on_failure(self, cause: BaseException, files_idx: list[tuple[int, int]], k: int) -> None:
        """Name the file DALI failed on (PIL decode of the batches in flight), then raise it as a ``DataError`` or,
        with skip_bad, record it so the next pipeline skips it."""
        bs = self.batch_size
        window = files_idx[k * bs:(k + 1 + self.prefetch) * bs]
        found: list[tuple[int, DataError]] = []
        for _, j in dict.fromkeys(window):
            for path in (self.dataset.pairs[j] if self.folders else (self.dataset.paths[j],)):
                try:
                    load_rgb(path, self.dataset.cfg.max_pixels)
                except DataError as e:
                    found.append((j, e))
                    break
        msg = " ".join(str(cause).split())
        if not found:
            named = re.search(r"Failed to decode sample #\d+ : (\S+)", msg)
            detail = msg.split("encountered:")[-1].split("Current pipeline")[0].strip()[:200]
            path = named.group(1) if named else (self.dataset.paths[window[0][1]] if window else "?")
            err = DataError(path, f"DALI cannot decode {'it' if named else 'a file in the batch holding it'} "
                                  f"({detail}); check the file or use --loader torch")
            if not self.cfg.skip_bad or not named:
                raise err from None
            j = next(j for _, j in window if path in (self.dataset.pairs[j] if self.folders
                                                       else (self.dataset.paths[j],)))
            found.append((j, err))
        if not self.cfg.skip_bad:
            raise found[0][1] from None
        for j, e in found:
            self._bad[j] = (e.path, e.problem)
            self.dataset.record_bad(e.path, e.problem)
        if len(self._bad) >= len(self.dataset):
            raise DataError(self.dataset.paths[0], "no readable image left in the dataset: every file failed to decode")

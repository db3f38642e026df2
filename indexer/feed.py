"""Feeding decoded crops to an encoder: the encode loop's side of the pipeline.

Decode workers send HWC uint8 crops (:func:`t2c.indexer.pipeline.decode_crop`). How they reach the model depends
on where it runs:

- **CPU** (and any encoder not computed by torch, e.g. OpenVINO): each batch's crops are normalised straight into
  one reused float32 buffer (:func:`normalised`) just before its forward pass, so the buffer stays in cache.
- **GPU** (a torch encoder on ``cuda``): the crops are stacked into page-locked (pinned) uint8 buffers, copied to
  the device without blocking (a quarter of float32's bytes), and normalised there through the same per-channel
  table, so the features are those of the CPU's preprocessing. Two buffers take turns: the next batch is stacked
  while the GPU computes the last, and the features come back through pinned memory too.

Either way the features are, to the bit, those of normalising each crop on its own and encoding the batch.

:func:`steady_allocator` keeps the C allocator from handing a CPU forward pass's freed activations back to the
system after every layer (then each batch faults its pages in again); processes that own their encode loop (the
CLI's `t2c index`, Ray's encode actors) call it first.
"""
from __future__ import annotations

import itertools
import time

import numpy as np


def normalised(crops: list, cfg: dict, out: np.ndarray | None = None) -> np.ndarray:
    """(N, 3, H, W) float32 of HWC uint8 crops, normalised per ``cfg`` (into ``out[:N]`` when given)."""
    from t2c.indexer.preprocess import normalise

    if out is None:
        s = int(cfg["image_size"])
        out = np.empty((len(crops), 3, s, s), np.float32)
    for j, c in enumerate(crops):
        normalise(c, cfg["mean"], cfg["std"], out=out[j])
    return out[: len(crops)]


def on_device(encoder) -> bool:
    """Whether ``encoder`` computes with torch on an accelerator (its crops go through :func:`_encode_staged`)."""
    return getattr(encoder, "runtime", "torch") == "torch" and str(getattr(encoder, "device", "cpu")) != "cpu"


def encode_crops(encoder, crops, *, staged: bool | None = None, clock: list | None = None) -> np.ndarray:
    """Features (N, dim) float32 of equal-shaped HWC uint8 crops, in order, one batch at a time.

    ``crops`` may be any iterable, e.g. a generator over decode results: each batch is encoded as soon as its
    crops have arrived, so the encoder starts on the first batch while the decoder still works on the rest.

    Args:
        encoder: a :class:`t2c.indexer.encoders.Encoder`.
        crops: HWC uint8 arrays of the encoder's input size (what decode workers send).
        staged: feed through uint8 buffers normalised on the encoder's device (the GPU path); default: when the
            encoder runs on an accelerator (:func:`on_device`). On the CPU it gives the same features, and tests
            use it there.
        clock: a list to append each batch's seconds in the encoder to (the forward pass, the copies to and from
            the device included; not the waits for crops, nor their normalisation on the CPU).

    Returns:
        The features, bit for bit those of ``encoder.encode_images`` on the crops normalised one by one.

    Example:
        >>> encode_crops(make_encoder("world:clip"), crops).shape  # doctest: +SKIP
        (64, 128)
    """
    bs = max(1, int(getattr(encoder, "batch_size", 0) or 64))
    batches = _batches(crops, bs)
    first = next(batches, None)
    if first is None:
        return np.zeros((0, encoder.dim), np.float32)
    batches = itertools.chain([first], batches)
    clock = [] if clock is None else clock
    if staged if staged is not None else on_device(encoder):
        return _encode_staged(encoder, batches, len(first), first[0].shape[:2], clock)
    cfg = encoder.preprocess_config()
    buf = np.empty((len(first), 3, *first[0].shape[:2]), np.float32)  # the first batch is the largest
    out = []
    for batch in batches:
        x = normalised(batch, cfg, out=buf)
        t0 = time.perf_counter()
        out.append(encoder.encode_images(x))
        clock.append(time.perf_counter() - t0)
    return np.concatenate(out) if len(out) > 1 else out[0]


def _batches(crops, n: int):
    """Lists of up to ``n`` crops, taken from ``crops`` as they come."""
    it = iter(crops)
    while batch := list(itertools.islice(it, n)):
        yield batch


def device_normalise(x, lut):
    """(N, H, W, 3) uint8 tensor -> (N, 3, H, W) float32 through ``lut`` ((3, 256) float32, on x's device)."""
    import torch

    idx = x.permute(0, 3, 1, 2).long() + torch.arange(0, 3 * 256, 256, device=x.device).view(1, 3, 1, 1)
    return torch.take(lut, idx)


def _encode_staged(encoder, batches, n: int, hw: tuple, clock: list) -> np.ndarray:
    """The GPU path of :func:`encode_crops` over ``batches`` (lists of at most ``n`` crops of ``hw`` pixels): pinned
    uint8 buffers in turn, asynchronous copies, normalised on the device; the next batch is gathered and stacked
    while the device computes this one."""
    import torch
    from t2c.indexer.preprocess import channel_table

    cfg = encoder.preprocess_config()
    dev = torch.device(encoder.device)
    cuda = dev.type == "cuda"
    bufs = [torch.empty((n, *hw, 3), dtype=torch.uint8, pin_memory=cuda) for _ in range(2)]
    lut = torch.from_numpy(channel_table(cfg["mean"], cfg["std"])).to(dev)
    out, pending = [], None
    with torch.inference_mode():
        for k, chunk in enumerate(batches):
            host = bufs[k % 2][: len(chunk)]
            # this buffer's last copy to the device was done: its batch's features were collected (below) one
            # batch ago, after an event recorded behind that copy
            np.stack(chunk, out=host.numpy())
            t0 = time.perf_counter()
            y = encoder._forward_images(device_normalise(host.to(dev, non_blocking=cuda), lut)).float()
            back = torch.empty(y.shape, dtype=torch.float32, pin_memory=cuda)
            back.copy_(y, non_blocking=cuda)
            done = None
            if cuda:
                done = torch.cuda.Event()
                done.record()
            if pending is not None:
                out.append(_collect(*pending))
            pending = (back, done)
            clock.append(time.perf_counter() - t0)  # launching this batch and collecting the last
        t0 = time.perf_counter()
        out.append(_collect(*pending))
        clock.append(time.perf_counter() - t0)
    return np.ascontiguousarray(np.concatenate(out) if len(out) > 1 else out[0], dtype=np.float32)


def _collect(back, done) -> np.ndarray:
    """A batch's features once its copy back to the host has finished."""
    if done is not None:
        done.synchronize()
    return back.numpy().copy()


#: glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
MMAP_THRESHOLD = 32 << 20  # glibc's largest: blocks up to this size come from the heap and are reused
TRIM_THRESHOLD = 512 << 20  # free memory kept at the heap's top before it is handed back to the system


def steady_allocator() -> bool:
    """Keep freed memory in this process for reuse (glibc's malloc; elsewhere nothing is done): returns whether
    it was set.

    A CPU forward pass allocates and frees its activations (up to ~20 MB each for a ViT-B at batch 32) layer
    after layer. With glibc's adaptive defaults such blocks may be mapped and unmapped, or trimmed off the heap,
    each time, so each batch touches fresh pages: measured in a fresh `t2c index` process, 0.7-1.4 million page
    faults per 400 images and a forward pass 5-10% slower than the same model's in a process whose allocator
    had settled. With blocks up to 32 MB served from the heap and up to 512 MB of free memory kept at its top,
    that fell to 20-40 thousand. The cost: the process holds on to up to 512 MB of freed memory instead of
    returning it. It is process-wide, so only processes that exist to index call it.
    """
    import ctypes
    import ctypes.util
    import platform

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(
            libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    except (OSError, AttributeError):
        return False

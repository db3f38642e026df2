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
"""
from __future__ import annotations

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
    return getattr(encoder, "runtime", "torch") == "torch" and str(getattr(encoder, "device", "cpu")) != "cpu" \
        and hasattr(encoder, "_forward_images")


def encode_crops(encoder, crops: list, *, staged: bool | None = None) -> np.ndarray:
    """Features (N, dim) float32 of equal-shaped HWC uint8 crops, in order, one batch at a time.

    Args:
        encoder: a :class:`t2c.indexer.encoders.Encoder`.
        crops: HWC uint8 arrays of the encoder's input size (what decode workers send).
        staged: feed through uint8 buffers normalised on the encoder's device (the GPU path); default: when the
            encoder runs on an accelerator (:func:`on_device`). On the CPU it gives the same features, and tests
            use it there.

    Returns:
        The features, bit for bit those of ``encoder.encode_images`` on the crops normalised one by one.

    Example:
        >>> encode_crops(make_encoder("world:clip"), crops).shape  # doctest: +SKIP
        (64, 128)
    """
    if not crops:
        return np.zeros((0, encoder.dim), np.float32)
    if staged if staged is not None else on_device(encoder):
        return _encode_staged(encoder, crops)
    cfg = encoder.preprocess_config()
    bs = _batch_size(encoder, crops)
    h, w = crops[0].shape[:2]
    buf = np.empty((min(bs, len(crops)), 3, h, w), np.float32)
    out = [encoder.encode_images(normalised(crops[i : i + bs], cfg, out=buf)) for i in range(0, len(crops), bs)]
    return np.concatenate(out) if len(out) > 1 else out[0]


def _batch_size(encoder, crops: list) -> int:
    return max(1, int(getattr(encoder, "batch_size", 0) or len(crops)))


def device_normalise(x, lut):
    """(N, H, W, 3) uint8 tensor -> (N, 3, H, W) float32 through ``lut`` ((3, 256) float32, on x's device)."""
    import torch

    idx = x.permute(0, 3, 1, 2).long() + torch.arange(0, 3 * 256, 256, device=x.device).view(1, 3, 1, 1)
    return torch.take(lut, idx)


def _encode_staged(encoder, crops: list) -> np.ndarray:
    """The GPU path of :func:`encode_crops`: pinned uint8 buffers in turn, asynchronous copies, normalised on the
    device; the next batch is stacked while the device computes this one."""
    import torch
    from t2c.indexer.preprocess import channel_table

    cfg = encoder.preprocess_config()
    dev = torch.device(encoder.device)
    cuda = dev.type == "cuda"
    bs = _batch_size(encoder, crops)
    h, w = crops[0].shape[:2]
    n = min(bs, len(crops))
    bufs = [torch.empty((n, h, w, 3), dtype=torch.uint8, pin_memory=cuda) for _ in range(2)]
    lut = torch.from_numpy(channel_table(cfg["mean"], cfg["std"])).to(dev)
    out, pending = [], None
    with torch.inference_mode():
        for k, i in enumerate(range(0, len(crops), bs)):
            chunk = crops[i : i + bs]
            host = bufs[k % 2][: len(chunk)]
            # this buffer's last copy to the device was done: its batch's features were collected (below) one
            # batch ago, after an event recorded behind that copy
            np.stack(chunk, out=host.numpy())
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
        out.append(_collect(*pending))
    return np.ascontiguousarray(np.concatenate(out) if len(out) > 1 else out[0], dtype=np.float32)


def _collect(back, done) -> np.ndarray:
    """A batch's features once its copy back to the host has finished."""
    if done is not None:
        done.synchronize()
    return back.numpy().copy()

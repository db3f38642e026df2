"""Image preprocessing shared by encoders and decode workers (numpy + PIL only, no torch)."""
from __future__ import annotations

from functools import lru_cache

import numpy as np


def preprocess_image(img, cfg: dict) -> np.ndarray:
    """Resize/crop an RGB PIL image per ``cfg`` and normalise it into a CHW float32 array.

    ``cfg`` holds ``image_size``, ``mean``, ``std``, ``resize_mode`` ("shorter": resize the shorter side
    then centre-crop; "squash": resize to a square) and optionally ``crop_pct`` (with "shorter": resize the
    shorter side to ``image_size / crop_pct`` first, so the centre crop keeps that fraction; default 1).

    The whole image is resized before the crop (resampling only the crop's box would be cheaper, but PIL then
    may run its two passes in the other order, and the 8-bit rounding between them moves pixels by up to 20
    grey levels); normalisation goes through a table, bit for bit the float arithmetic.
    """
    return normalise(crop_array(img, cfg), cfg["mean"], cfg["std"])


def crop_array(img, cfg: dict) -> np.ndarray:
    """The HWC uint8 RGB array ``preprocess_image`` normalises (what decode workers hand over: 4x smaller)."""
    return np.asarray(resize_crop(img, cfg))


def resize_crop(img, cfg: dict):
    """The RGB PIL image ``preprocess_image`` normalises: resized and centre-cropped per ``cfg``."""
    from PIL import Image

    if img.mode != "RGB":
        img = img.convert("RGB")
    s = int(cfg["image_size"])
    if cfg.get("resize_mode", "shorter") == "squash":
        if img.size != (s, s):
            img = img.resize((s, s), Image.BICUBIC)
    else:
        w, h = img.size
        scale = s / float(cfg.get("crop_pct") or 1.0) / min(w, h)
        nw, nh = max(s, round(w * scale)), max(s, round(h * scale))
        if (nw, nh) != (w, h):
            img = img.resize((nw, nh), Image.BICUBIC, reducing_gap=3.0)
        left, top = (nw - s) // 2, (nh - s) // 2
        if (nw, nh) != (s, s):
            img = img.crop((left, top, left + s, top + s))
    return img


def normalise(rgb: np.ndarray, mean, std, out: np.ndarray | None = None) -> np.ndarray:
    """HWC uint8 RGB -> CHW float32 ``(x / 255 - mean) / std``, through a 256-entry table per channel.

    The table holds exactly what the float32 arithmetic gives for each byte value, so the result is bit-for-bit
    that of computing it pixel by pixel, in one pass instead of five. ``out``: a (3, H, W) float32 array to fill
    (a slot of a batch buffer) instead of a new one.
    """
    lut = channel_table(mean, std)
    if out is None:
        out = np.empty((3, *rgb.shape[:2]), np.float32)
    for c in range(3):
        np.take(lut[c], rgb[:, :, c], out=out[c])
    return out


def channel_table(mean, std) -> np.ndarray:
    """(3, 256) float32: channel c's normalised value ``(v / 255 - mean[c]) / std[c]`` of each byte value v."""
    return _table(tuple(float(m) for m in mean), tuple(float(v) for v in std))


@lru_cache(maxsize=16)
def _table(mean: tuple, std: tuple) -> np.ndarray:
    """(3, 256) float32: channel c's normalised value of each byte value."""
    v = np.arange(256, dtype=np.float32)[:, None] * (1.0 / 255.0)
    t = (v - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return np.ascontiguousarray(t.T)

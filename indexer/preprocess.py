"""Image preprocessing shared by encoders and decode workers (numpy + PIL only, no torch)."""
from __future__ import annotations

import numpy as np


def preprocess_image(img, cfg: dict) -> np.ndarray:
    """Resize/crop an RGB PIL image per ``cfg`` and normalise it into a CHW float32 array.

    ``cfg`` holds ``image_size``, ``mean``, ``std``, ``resize_mode`` ("shorter": resize the shorter side
    then centre-crop; "squash": resize to a square) and optionally ``crop_pct`` (with "shorter": resize the
    shorter side to ``image_size / crop_pct`` first, so the centre crop keeps that fraction; default 1).
    """
    from PIL import Image

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
    arr = np.asarray(img, dtype=np.float32) * (1.0 / 255.0)
    arr = (arr - np.asarray(cfg["mean"], np.float32)) / np.asarray(cfg["std"], np.float32)
    return np.ascontiguousarray(arr.transpose(2, 0, 1))

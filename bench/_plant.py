"""Planted duplicates for bench/duplicates.py: copies of generated world images, one transformation each."""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

KINDS = ("reencoded", "resized", "cropped", "flipped", "colour_shifted")


def transform(img: Image.Image, kind: str, rng: np.random.Generator) -> tuple[Image.Image, str]:
    """(copy of img changed one way, file suffix)."""
    w, h = img.size
    if kind == "reencoded":
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=int(rng.integers(70, 95)))
        return Image.open(io.BytesIO(buf.getvalue())).convert("RGB"), ".jpg"
    if kind == "resized":
        f = float(rng.choice([0.5, 0.75, 1.5, 2.0]))
        return img.resize((max(8, round(w * f)), max(8, round(h * f))), Image.BICUBIC), ".png"
    if kind == "cropped":
        keep = 1.0 - float(rng.uniform(0.05, 0.20))  # up to 20% of each side removed
        cw, ch = max(8, round(w * keep)), max(8, round(h * keep))
        x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        return img.crop((x, y, x + cw, y + ch)), ".png"
    if kind == "flipped":
        return ImageOps.mirror(img), ".png"
    if kind == "colour_shifted":
        arr = np.asarray(img, np.float32)
        gain = rng.uniform(0.92, 1.08, size=3)
        shift = rng.uniform(-8, 8, size=3)
        return Image.fromarray(np.clip(arr * gain + shift, 0, 255).astype(np.uint8)), ".png"
    raise ValueError(kind)


def plant(folder: Path, n_per_kind: int, seed: int) -> list[dict]:
    """Copy ``n_per_kind`` distinct random images per kind into ``folder/dups``; returns the planted pairs."""
    rng = np.random.default_rng(seed)
    files = sorted(p for p in (folder / "images").rglob("*.png"))
    picks = rng.choice(len(files), size=n_per_kind * len(KINDS), replace=False)
    out_dir = folder / "images" / "dups"
    out_dir.mkdir(parents=True, exist_ok=True)
    pairs = []
    for j, i in enumerate(picks):
        kind = KINDS[j % len(KINDS)]
        img = Image.open(files[i]).convert("RGB")
        new, suffix = transform(img, kind, rng)
        dst = out_dir / f"{kind}-{j:05d}{suffix}"
        if kind == "reencoded":
            new.save(dst, quality=90)  # the JPEG bytes already carry the loss; save keeps them close
        else:
            new.save(dst)
        pairs.append({"kind": kind, "original": str(files[i]), "copy": str(dst)})
    return pairs

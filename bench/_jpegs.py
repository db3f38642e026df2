"""Generated JPEGs for the throughput benchmarks (index_throughput.py, gpu_throughput.py)."""
from __future__ import annotations

from pathlib import Path

import numpy as np


def make_jpegs(folder: Path, n: int, seed: int = 0, min_side: int = 480, max_side: int = 800) -> None:
    """n JPEGs with sides in [min_side, max_side] and varied content (photo-like noise over shapes)."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        w, h = (int(x) for x in rng.integers(min_side, max_side + 1, 2))
        base = rng.integers(0, 255, 3)
        img = Image.new("RGB", (w, h), tuple(int(c) for c in base))
        d = ImageDraw.Draw(img)
        for _ in range(8):
            x0, y0 = int(rng.integers(0, w - 40)), int(rng.integers(0, h - 40))
            d.ellipse([x0, y0, x0 + int(rng.integers(20, 200)), y0 + int(rng.integers(20, 200))],
                      fill=tuple(int(c) for c in rng.integers(0, 255, 3)))
        noise = rng.integers(0, 24, (h, w, 3), dtype=np.uint8)
        img = Image.fromarray(np.clip(np.asarray(img, np.int16) + noise, 0, 255).astype(np.uint8))
        img.save(folder / f"img_{i:05d}.jpg", quality=90)

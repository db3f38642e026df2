"""Tiny deterministic encoders for tests (loaded through the real `python:` spec path)."""
from __future__ import annotations

import hashlib
import os
import time

import numpy as np
import torch

from t2c.indexer.encoders import CLIP_MEAN, CLIP_STD, Encoder


class TinyCNN(torch.nn.Module):
    """A seeded 2-layer CNN mapping (N,3,S,S) images to (N, dim) features."""

    def __init__(self, dim: int = 24, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.conv = torch.nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.fc = torch.nn.Linear(8 * 4, dim)
        for p in self.parameters():
            with torch.no_grad():
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)

    def forward(self, x):
        h = torch.relu(self.conv(x))
        h = torch.nn.functional.adaptive_avg_pool2d(h, 2).flatten(1)
        return self.fc(h)


def tiny_cnn(dim: str = "24", seed: str = "0"):
    """Factory used as `python:tests.tiny_encoders:tiny_cnn`."""
    return TinyCNN(int(dim), int(seed))


class TinyClip(Encoder):
    """A CLIP-like encoder: a seeded CNN image tower and a hashed bag-of-words text tower."""

    has_text = True
    image_size = 32
    mean, std = CLIP_MEAN, CLIP_STD

    def __init__(self, dim: int = 16, **kw):
        super().__init__(**kw)
        self.dim = dim
        self.net = TinyCNN(dim, seed=1).eval()

    def _forward_images(self, x):
        delay = float(os.environ.get("T2C_TEST_ENCODE_DELAY", "0"))
        if delay:
            time.sleep(delay)
        return self.net(x)

    def _forward_texts(self, texts):
        out = []
        for t in texts:
            v = np.zeros(self.dim, np.float32)
            for w in t.lower().split():
                h = int.from_bytes(hashlib.blake2b(w.encode(), digest_size=4).digest(), "little")
                v[h % self.dim] += 1.0
            out.append(v)
        return torch.from_numpy(np.stack(out))


def tiny_clip(dim: str = "16"):
    """Factory used as `python:tests.tiny_encoders:tiny_clip`."""
    return TinyClip(int(dim))

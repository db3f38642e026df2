"""Scale benchmark: local vs Ray engine throughput, and FAISS index builds at 1M / 10M vectors. Prints JSON.

    .venv/bin/python bench/scale.py                       # everything (throughput, 1M full, 10M streamed)
    .venv/bin/python bench/scale.py --skip-throughput --vectors 1000000

Throughput: the same generated folder of small JPEGs indexed with ``index_folder`` (decode workers + encoder
in-process) and with ``index_folder_ray`` (decode tasks + encoder actor), plus encoder-only and decode-only
rates (the per-node figures the README projection is built from).

Index: clustered synthetic unit vectors (a mixture of Gaussians, like real embeddings), generated in chunks.
- n whose raw vectors fit ``--max-ram-gb``: a full ``build_index`` under a memory budget of
  ``--bytes-per-vector`` × n, which forces IVF-PQ; build time, index bytes per vector, tuned nprobe and
  recall@10 (measured by build_index against exact search) are reported.
- larger n (10M × 512 float32 is 20 GB): the configuration ``choose_index_type`` picks for n is built with a
  coarse quantizer of the right size, and *measured* on a chunk: add throughput and bytes per vector; the
  coarse k-means training time is measured at a smaller (nlist, ntrain) and projected (cost ∝ ntrain·nlist·d).
  Everything projected is labelled ``projected_*``.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def rss_gb() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)


# ------------------------------------------------------------------------------------------------
# throughput
# ------------------------------------------------------------------------------------------------
def make_jpegs(folder: Path, n: int, size: int = 160, seed: int = 0) -> None:
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        img = Image.new("RGB", (size + i % 7 * 8, size), tuple(int(c) for c in rng.integers(0, 255, 3)))
        d = ImageDraw.Draw(img)
        for _ in range(4):
            x, y = rng.integers(0, size - 20, 2)
            r = int(rng.integers(8, 40))
            d.ellipse([int(x), int(y), int(x) + r, int(y) + r], fill=tuple(int(c) for c in rng.integers(0, 255, 3)))
        sub = folder / f"d{i % 10}"
        sub.mkdir(exist_ok=True)
        img.save(sub / f"im{i:05d}.jpg", quality=90)


def seeded_weights(spec: str, tmp: Path) -> str:
    """``timm:X?weights=random`` → the same random weights in a file, so every process builds the same model."""
    if not (spec.startswith("timm:") and "weights=random" in spec):
        return spec
    import timm
    import torch
    from safetensors.torch import save_file

    name = spec.split(":", 1)[1].split("?")[0]
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=0)
    path = tmp / f"{name}-seed0.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return spec.replace("weights=random", f"weights={path}")


def no_polysemous() -> None:
    """Build IVF-PQ without polysemous training (unused at search time; 5x the training time here)."""
    import faiss

    orig = faiss.index_factory

    def factory(d, desc, *a):
        if ",PQ" in desc and not desc.endswith("np"):
            desc += "np"
        return orig(d, desc, *a)

    faiss.index_factory = factory


def throughput(n_images: int, encoder_spec: str, batch_size: int) -> dict:
    import torch

    from data.sources import walk_folder
    from indexer.aligner import Aligner
    from indexer.encoders import make_encoder
    from indexer.pipeline import index_folder
    from indexer.ray_engine import decode_batch, index_folder_ray

    out = {"images": n_images, "encoder": encoder_spec, "cores": os.cpu_count(), "batch_size": batch_size}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        make_jpegs(tmp / "imgs", n_images)
        encoder_spec = seeded_weights(encoder_spec, tmp)
        out["encoder_weights"] = "random, seeded, saved to a file (weights=random is not seeded per process)"
        enc = make_encoder(encoder_spec, batch_size=batch_size)
        al_path = tmp / "al.safetensors"
        rng = np.random.default_rng(0)
        Aligner(rng.normal(size=(enc.dim, 512)).astype(np.float32) / np.sqrt(enc.dim), np.zeros(512, np.float32),
                {"encoder": enc.spec, "clip": "open_clip:ViT-B-32/openai", "dx": enc.dim, "dy": 512,
                 "r2_heldout": 0.0}).save(al_path)
        paths = [f.path for f in walk_folder(tmp / "imgs").files]
        cfg = dict(enc.preprocess_config(), max_pixels=89_478_485)
        t = time.perf_counter()
        dec = decode_batch({"idx": np.arange(len(paths)), "path": np.array(paths, object)}, cfg)
        out["decode_only_images_per_s_1core"] = round(len(paths) / (time.perf_counter() - t), 1)
        x = dec["arr"][:64]
        enc.encode_images(x[:8])
        for th in (1, 2):
            torch.set_num_threads(th)
            t = time.perf_counter()
            enc.encode_images(x)
            out[f"encode_only_images_per_s_{th}thread"] = round(len(x) / (time.perf_counter() - t), 1)
        torch.set_num_threads(os.cpu_count() or 2)
        del enc

        t = time.perf_counter()
        rep = index_folder(tmp / "imgs", tmp / "local", encoder_spec, aligner=al_path, workers=1,
                           batch_size=batch_size, part_size=64)
        out["local"] = {"wall_s": round(time.perf_counter() - t, 2),
                        "pipeline_images_per_s": round(rep.images_per_second, 1), "added": rep.added,
                        "settings": "1 decode process + encoder in-process (torch 2 threads)"}
        t = time.perf_counter()
        rep = index_folder_ray(tmp / "imgs", tmp / "ray", encoder_spec, aligner=al_path, num_cpus=2,
                               encoder_actors=1, cpus_per_actor=1, threads=2, batch_size=batch_size, part_size=64)
        out["ray"] = {"wall_s": round(time.perf_counter() - t, 2),
                      "pipeline_images_per_s": round(rep.images_per_second, 1), "added": rep.added,
                      "settings": "ray.init(num_cpus=2): decode tasks + 1 encoder actor (torch 2 threads); "
                                  "wall includes Ray start-up"}
        from data.store import open_store

        a, b = open_store(tmp / "local"), open_store(tmp / "ray")
        out["stores_equal"] = bool(np.array_equal(np.asarray(a.ids), np.asarray(b.ids)) and
                                   np.allclose(np.asarray(a.vectors), np.asarray(b.vectors), atol=1e-4))
    return out


# ------------------------------------------------------------------------------------------------
# synthetic vectors
# ------------------------------------------------------------------------------------------------
class Synth:
    """Clustered unit vectors, reproducible chunk by chunk."""

    def __init__(self, d: int, n_clusters: int = 2048, spread: float = 0.6, seed: int = 0):
        rng = np.random.default_rng(seed)
        self.centers = rng.normal(size=(n_clusters, d)).astype(np.float32)
        self.centers /= np.linalg.norm(self.centers, axis=1, keepdims=True)
        self.d, self.spread, self.seed = d, spread, seed

    def chunk(self, start: int, n: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, start])
        c = self.centers[rng.integers(0, len(self.centers), n)]
        x = c + rng.normal(scale=self.spread / np.sqrt(self.d), size=(n, self.d)).astype(np.float32) * np.sqrt(2)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        return x.astype(np.float32)


def index_full(n: int, d: int, bpv: int, chunk: int = 250_000) -> dict:
    import faiss

    from indexer.index_build import build_index

    syn = Synth(d)
    t = time.perf_counter()
    v = np.empty((n, d), np.float32)
    for s in range(0, n, chunk):
        v[s : s + chunk] = syn.chunk(s, min(chunk, n - s))
    gen_s = time.perf_counter() - t
    ids = np.arange(n, dtype=np.int64)
    budget = n * bpv
    t = time.perf_counter()
    index, info = build_index(v, ids, memory_budget=budget)
    build_s = time.perf_counter() - t
    nbytes = len(faiss.serialize_index(index))
    return {"n": n, "d": d, "mode": "measured (full build_index)", "memory_budget_bytes": budget,
            "raw_float32_bytes": n * d * 4, "index": {k: info[k] for k in info if k != "n"},
            "build_seconds": round(build_s, 1), "generate_seconds": round(gen_s, 1),
            "index_bytes": nbytes, "bytes_per_vector": round(nbytes / n, 2),
            "recall_at_10": info.get("recall_at_10"), "nprobe": info.get("nprobe"), "peak_rss_gb": rss_gb()}


def index_streamed(n: int, d: int, bpv: int, sample_add: int = 100_000) -> dict:
    """Measure the 10M-scale configuration on a chunk; project train/add time to n."""
    import faiss

    from indexer.index_build import choose_index_type

    choice = choose_index_type(n, d, memory_budget=n * bpv)
    nlist, m = choice["nlist"], choice.get("m")
    syn = Synth(d)
    out = {"n": n, "d": d, "mode": "streamed: add rate and bytes/vector measured on a chunk, totals projected",
           "memory_budget_bytes": n * bpv, "raw_float32_bytes": n * d * 4, "index": choice}
    # coarse training measured small, projected (k-means cost ∝ ntrain · nlist · d · iterations)
    small_nlist = 512
    xt = syn.chunk(10**12, small_nlist * 40)
    t = time.perf_counter()
    km = faiss.Kmeans(d, small_nlist, niter=20, seed=1, spherical=True)
    km.train(xt)
    small_s = time.perf_counter() - t
    ntrain_full = min(n, max(nlist * 40, 10_000))
    factor = (ntrain_full * nlist) / (len(xt) * small_nlist)
    out["train_measured"] = {"nlist": small_nlist, "ntrain": len(xt), "seconds": round(small_s, 2)}
    out["projected_train_seconds"] = round(small_s * factor, 0)
    # the real-size IVF-PQ: nlist centroids (sampled points stand in for trained ones: same assignment cost)
    quant = faiss.IndexFlatIP(d)
    quant.add(syn.chunk(2 * 10**12, nlist))
    index = faiss.IndexIVFPQ(quant, d, nlist, m, 8, faiss.METRIC_INNER_PRODUCT)
    t = time.perf_counter()
    index.train(syn.chunk(3 * 10**12, 65_536))  # PQ codebooks only (the quantizer is already full)
    out["pq_train_seconds_65k"] = round(time.perf_counter() - t, 2)
    empty = len(faiss.serialize_index(index))
    add_s = 0.0
    for s in range(0, sample_add, 50_000):
        x = syn.chunk(s, min(50_000, sample_add - s))
        t = time.perf_counter()
        index.add_with_ids(x, np.arange(s, s + len(x), dtype=np.int64))
        add_s += time.perf_counter() - t
    full = len(faiss.serialize_index(index))
    rate = sample_add / add_s
    out["add_measured"] = {"vectors": sample_add, "seconds": round(add_s, 2), "vectors_per_s": round(rate, 0)}
    out["bytes_per_vector"] = round((full - empty) / sample_add, 2)
    out["projected_add_seconds"] = round(n / rate, 0)
    out["projected_index_bytes"] = int(empty + out["bytes_per_vector"] * n)
    out["projected_build_seconds"] = round(out["projected_train_seconds"] + out["projected_add_seconds"], 0)
    out["recall_at_10"] = None
    out["recall_note"] = ("not measured at this n (exact ground truth needs the 20 GB of vectors); "
                          "see the 1M row for the same PQ code size")
    out["peak_rss_gb"] = rss_gb()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=300)
    ap.add_argument("--encoder", default="timm:resnet18?weights=random")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--vectors", default="1000000,10000000")
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--bytes-per-vector", type=int, default=64, help="memory budget per vector (forces IVF-PQ)")
    ap.add_argument("--max-ram-gb", type=float, default=6.0, help="largest raw float32 set built in full")
    ap.add_argument("--skip-throughput", action="store_true")
    ap.add_argument("--polysemous", action="store_true", help="keep faiss' default polysemous PQ training")
    ap.add_argument("--threads", type=int, default=None, help="FAISS OpenMP threads")
    args = ap.parse_args()
    import faiss

    if args.threads:
        faiss.omp_set_num_threads(args.threads)
    res = {"machine": {"cores": os.cpu_count(), "faiss": faiss.__version__}}
    if not args.polysemous:
        no_polysemous()
        res["note"] = "IVF-PQ factory strings get 'np' (no polysemous training): the proposed index_build fix"
    if not args.skip_throughput:
        res["throughput"] = throughput(args.images, args.encoder, args.batch_size)
        print(json.dumps(res["throughput"]), file=sys.stderr, flush=True)
    res["index"] = []
    for n in [int(x) for x in args.vectors.split(",") if x]:
        if n * args.dim * 4 <= args.max_ram_gb * 2**30:
            r = index_full(n, args.dim, args.bytes_per_vector)
        else:
            r = index_streamed(n, args.dim, args.bytes_per_vector)
        res["index"].append(r)
        print(json.dumps(r), file=sys.stderr, flush=True)
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()

"""Recall at scale: IVF-PQ + exact refinement from a memory-mapped float16 file, up to 10M x 512. Prints JSON.

For each data set (``--data synthetic,reallike``) it writes n vectors chunk by chunk to a float16 ``.npy`` in
``--work`` (the data set *is* those float16 values: exact ground truth and refinement read the same file, the
copy a store keeps as ``vectors16.npy``), builds the index with the library's ``build_index`` (IVF-PQ, codes in
RAM; nprobe / re-rank depth tuned against exact search), then measures, per (nprobe, rerank) setting:
recall@10 against exact search and p50/p95 latency of single-query top-10 searches
(``search_reranked``: PQ candidates, exact re-scoring of the top ``rerank`` from the float16 map, rows read in
order, ``madvise(MADV_RANDOM)``). Index RAM: serialized bytes, and the anonymous RSS that reading the index
back adds.

Data sets:
- ``synthetic``: bench/scale.py's mixture of isotropic Gaussian clusters (``--clusters``, default 2048: at 10M
  ~4,900 points a cluster, whose near neighbours 64-byte codes cannot order).
- ``reallike``: a Gaussian mixture fitted to real EfficientNet-Lite0 features (the final 1280-d pooled
  features of Fashion-MNIST images cached by bench/real_weights.py): the features are projected on their top
  512 principal axes and L2-normalised, clustered (k-means, ``--real-clusters``), and each new vector is a
  cluster centre plus Gaussian noise with the pooled within-cluster covariance (its full 512-d spectrum:
  low-rank structure plus a noise floor), L2-normalised.

Queries (``--queries`` of each kind): ``perturbed`` (a stored vector plus N(0, 0.05^2) noise per dimension,
re-normalised: the queries build_index tunes on) and ``fresh`` (new draws from the same generator).

Usage (one FAISS/BLAS thread; the 10M synthetic file is 10 GB):
    OMP_NUM_THREADS=1 nice -n 5 .venv/bin/python bench/recall_10m.py --n 1000000 --data synthetic,reallike
    OMP_NUM_THREADS=1 nice -n 5 .venv/bin/python bench/recall_10m.py --n 10000000 --factory IVF4096,PQ64np \\
        --work /work/scratch --data synthetic
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", os.environ["OMP_NUM_THREADS"])
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def rss_anon_kb() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1])
    return 0


# ------------------------------------------------------------------------------------------------
# data sets
# ------------------------------------------------------------------------------------------------
class RealLike:
    """Gaussian mixture fitted to real EfficientNet-Lite0 features (see the module docstring)."""

    def __init__(self, feats: np.ndarray, d: int = 512, n_clusters: int = 128, seed: int = 0):
        from sklearn.cluster import KMeans

        f = np.asarray(feats, np.float64)
        mu = f.mean(0)
        _, s, vt = np.linalg.svd(f - mu, full_matrices=False)
        y = f @ vt[:d].T  # coordinates on the top-d principal axes (the mean's projection kept)
        y /= np.linalg.norm(y, axis=1, keepdims=True)
        km = KMeans(n_clusters, n_init=3, random_state=seed).fit(y)
        self.centers = km.cluster_centers_.astype(np.float32)
        self.weights = np.bincount(km.labels_, minlength=n_clusters) / len(y)
        r = y - km.cluster_centers_[km.labels_]
        _, rs, rvt = np.linalg.svd(r, full_matrices=False)
        lam = rs**2 / max(len(y) - n_clusters, 1)
        self.noise = (np.sqrt(lam)[:, None] * rvt).astype(np.float32)  # z @ noise ~ N(0, within-cluster cov)
        self.d, self.seed = d, seed
        lam_all = s[:d] ** 2
        self.fit_info = {
            "source_rows": int(len(f)), "source_dim": int(f.shape[1]), "clusters": n_clusters,
            "feature_effective_dim": round(float(lam_all.sum() ** 2 / (lam_all**2).sum()), 1),
            "noise_effective_dim": round(float(lam.sum() ** 2 / (lam**2).sum()), 1),
            "noise_rank": int(len(lam)),
            "within_cluster_share_of_variance": round(float((r**2).sum() / ((y - y.mean(0)) ** 2).sum()), 3),
        }

    def chunk(self, start: int, n: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, start])
        c = self.centers[rng.choice(len(self.centers), n, p=self.weights)]
        z = rng.standard_normal(size=(n, self.noise.shape[0]), dtype=np.float32)
        x = c + z @ self.noise
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        return x.astype(np.float32)


def lite0_features(cache: Path) -> np.ndarray:
    files = sorted(glob.glob(str(cache / "effnet-lite0-*.npy")))
    if not files:
        raise SystemExit(f"no cached EfficientNet-Lite0 features in {cache}: run bench/real_weights.py "
                         "--encode-only first (needs the `real` extra)")
    f = np.concatenate([np.load(p)[:, :1280] for p in files])
    return np.unique(f, axis=0)  # the image sets may overlap


def make_generator(kind: str, d: int, n: int, args):
    if kind == "synthetic":
        from bench.scale import Synth

        clusters = args.clusters or 2048
        return Synth(d, n_clusters=clusters), {"model": "bench/scale.py Synth: isotropic Gaussian clusters",
                                               "clusters": clusters, "points_per_cluster": round(n / clusters)}
    gen = RealLike(lite0_features(args.real_cache), d=d, n_clusters=args.real_clusters)
    return gen, {"model": "Gaussian mixture fitted to EfficientNet-Lite0 features (Fashion-MNIST images)",
                 **gen.fit_info}


def write_f16(gen, n: int, d: int, path: Path, chunk: int = 250_000) -> float:
    t = time.perf_counter()
    tmp = path.with_suffix(".tmp.npy")
    v = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float16, shape=(n, d))
    for s in range(0, n, chunk):
        v[s : s + chunk] = gen.chunk(s, min(chunk, n - s))
        if s and s % (20 * chunk) == 0:
            log(f"  generated {s:,}")
    v.flush()
    del v
    os.replace(tmp, path)
    return time.perf_counter() - t


# ------------------------------------------------------------------------------------------------
# measurements
# ------------------------------------------------------------------------------------------------
def make_queries(gen, v16, n_q: int, seed: int = 11):
    rng = np.random.default_rng(seed)
    pert = np.asarray(v16[np.sort(rng.choice(len(v16), n_q, replace=False))], np.float32)
    pert = pert + rng.normal(scale=0.05, size=pert.shape).astype(np.float32)
    pert /= np.linalg.norm(pert, axis=1, keepdims=True)
    fresh = gen.chunk(10**12 + 7, n_q)  # a chunk start no stored vector used
    return {"perturbed": pert, "fresh": fresh}


def index_rss_bytes(path: Path) -> int:
    """Anonymous RSS that ``faiss.read_index`` adds, measured in a fresh process (freed memory of this one's
    builds would otherwise be reused and hide it)."""
    import subprocess

    code = ("import faiss, pathlib\n"
            "def r():\n"
            "    return next(int(l.split()[1]) for l in pathlib.Path('/proc/self/status').read_text().splitlines()"
            " if l.startswith('RssAnon:'))\n"
            f"a = r(); ix = faiss.read_index({str(path)!r}); print((r() - a) * 1024)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return int(out.stdout.strip())


def recall(got: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(a.tolist()) & set(b.tolist())) / len(b) for a, b in zip(got, truth)]))


def measure_grid(index, v16, ids, queries, truth, nprobes, reranks, k: int = 10, timed: int = 100) -> list:
    from t2c.indexer.index_build import ivf_params, search_reranked

    out = []
    for nprobe in nprobes:
        params = ivf_params(index, nprobe)  # an HNSW coarse quantizer searches deep enough for nprobe lists
        # codes alone (no refinement), for reference
        row = {"nprobe": nprobe, "rerank": 0}
        for name, q in queries.items():
            _, got = index.search(q, k, params=params)
            row[f"recall_{name}"] = round(recall(got, truth[name]), 4)
        out.append(row)
        for rr in reranks:
            row = {"nprobe": nprobe, "rerank": rr}
            for name, q in queries.items():
                lat, got = [], []
                for i in range(len(q)):
                    t = time.perf_counter()
                    got.append(search_reranked(index, v16, ids, q[i : i + 1], k, rr, params=params)[0])
                    if i < timed:
                        lat.append((time.perf_counter() - t) * 1000)
                row[f"recall_{name}"] = round(recall(np.array(got), truth[name]), 4)
                row[f"ms_{name}"] = {"p50": round(float(np.percentile(lat, 50)), 2),
                                     "p95": round(float(np.percentile(lat, 95)), 2)}
            out.append(row)
            log(f"  {row}")
    return out


def run_one(kind: str, args) -> dict:
    import faiss

    from t2c.indexer.index_build import advise_random, build_index, exact_topk

    n, d = args.n, args.dim
    gen, data_info = make_generator(kind, d, n, args)
    args.work.mkdir(parents=True, exist_ok=True)
    path = args.work / f"{kind}-{n}x{d}-c{data_info.get('clusters')}.f16.npy"
    gen_s = None
    if not path.exists():
        log(f"{kind}: writing {n:,} x {d} float16 to {path}")
        gen_s = round(write_f16(gen, n, d, path), 1)
        log(f"{kind}: written in {gen_s} s")
    if args.generate_only:
        return {"data": kind, "n": n, "file": str(path), "generate_seconds": gen_s}
    v16 = np.load(path, mmap_mode="r")
    ids = np.arange(n, dtype=np.int64)
    queries = make_queries(gen, v16, args.queries)
    log(f"{kind}: exact ground truth for {sum(len(q) for q in queries.values())} queries")
    t = time.perf_counter()
    allq = np.concatenate(list(queries.values()))
    tr = exact_topk(v16, allq, 10, block=65536)
    truth = {"perturbed": tr[: args.queries], "fresh": tr[args.queries :]}
    truth_s = time.perf_counter() - t

    factory = args.factory
    log(f"{kind}: build_index ({factory or 'chosen by budget'}, budget {args.bytes_per_vector} B/vector)")
    rss0 = rss_anon_kb()
    index, info = build_index(v16, ids, memory_budget=n * args.bytes_per_vector, exact_max=0,
                              refine_vectors=v16, factory=factory, n_eval=args.tune_queries)
    log(f"{kind}: built in {info['build_seconds']} s: {json.dumps({k: v for k, v in info.items() if k != 'tried'})}")
    ipath = args.work / f"{kind}-{n}.faiss"
    faiss.write_index(index, str(ipath))
    nbytes = os.path.getsize(ipath)
    rss_build = rss_anon_kb() - rss0
    del index
    rss_index = index_rss_bytes(ipath)
    index = faiss.read_index(str(ipath))
    if not args.keep:
        ipath.unlink()
    advised = advise_random(v16)

    nprobes = [int(x) for x in args.nprobes.split(",")]
    reranks = [int(x) for x in args.reranks.split(",")]
    if info.get("nprobe") and info["nprobe"] not in nprobes:
        nprobes.append(int(info["nprobe"]))
    log(f"{kind}: grid nprobe {nprobes} x rerank {reranks}")
    grid = measure_grid(index, v16, ids, queries, truth, sorted(nprobes), reranks, timed=args.timed)
    ok = [g for g in grid if g["rerank"] and g["recall_perturbed"] >= 0.95 and g["recall_fresh"] >= 0.95]
    best = min(ok, key=lambda g: g["ms_perturbed"]["p50"]) if ok else None
    return {
        "data": kind, "n": n, "dim": d, "data_model": data_info, "storage": "float16 .npy, memory-mapped",
        "index_type": info["type"], "factory": info["factory"], "nlist": info.get("nlist"),
        "code_bytes_per_vector": info.get("m"),
        "index_ram": {"serialized_bytes": nbytes, "bytes_per_vector": round(nbytes / n, 1),
                      "rss_anon_delta_on_read_in_fresh_process_bytes": rss_index,
                      "rss_anon_delta_during_build_bytes": rss_build * 1024},
        "refine_file_bytes": os.path.getsize(path), "madvise_random": advised,
        "build_seconds": info["build_seconds"], "generate_seconds": gen_s,
        "ground_truth_seconds": round(truth_s, 1),
        "tuned": {k: info.get(k) for k in ("nprobe", "rerank", "recall_at_10", "target_reached", "tried",
                                           "score_error")},
        "grid": grid, "best_setting_reaching_0.95_both": best,
        "targets": {"recall_at_10_ge_0.95": best is not None, "index_ram_le_2GB": nbytes <= 2 * 2**30,
                    "knn_p50_le_50ms": bool(best and best["ms_perturbed"]["p50"] <= 50)},
    }


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--data", default="synthetic,reallike")
    ap.add_argument("--clusters", type=int, default=None, help="synthetic clusters (default 2048)")
    ap.add_argument("--real-clusters", type=int, default=128)
    ap.add_argument("--real-cache", type=Path,
                    default=Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "t2c" / "bench-real")
    ap.add_argument("--bytes-per-vector", type=int, default=64, help="memory budget per vector (codes)")
    ap.add_argument("--factory", default=None, help="FAISS factory overriding the budget's choice")
    ap.add_argument("--nprobes", default="8,16,32,64")
    ap.add_argument("--reranks", default="1000,2000,4000,8000,16000")
    ap.add_argument("--queries", type=int, default=200, help="queries of each kind for recall")
    ap.add_argument("--timed", type=int, default=100, help="queries of each kind timed")
    ap.add_argument("--tune-queries", type=int, default=200)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--work", type=Path, default=Path("/tmp/t2c-recall"))
    ap.add_argument("--keep", action="store_true", help="keep the float16 files (and the index) for a rerun")
    ap.add_argument("--generate-only", action="store_true", help="write the float16 files (kept) and stop")
    args = ap.parse_args(argv)
    import faiss

    faiss.omp_set_num_threads(args.threads)
    res = {"machine": {"cores": os.cpu_count(), "faiss": faiss.__version__, "threads": args.threads,
                       "note": "shared 2-core machine, other jobs running"}, "runs": []}
    for kind in args.data.split(","):
        r = run_one(kind, args)
        res["runs"].append(r)
        print(json.dumps({k: v for k, v in r.items() if k != "grid"}), file=sys.stderr, flush=True)
        if not (args.keep or args.generate_only):
            for p in args.work.glob(f"{kind}-{args.n}x*.f16.npy"):
                p.unlink()
    res["machine"]["load_avg_1m_at_end"] = round(os.getloadavg()[0], 2)
    print(json.dumps(res, indent=2))
    return res


if __name__ == "__main__":
    main()

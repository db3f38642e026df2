"""Scale benchmark: local vs Ray engine throughput, and FAISS index builds at 1M / 10M vectors. Prints JSON.

    .venv/bin/python bench/scale.py                       # everything (throughput, 1M in RAM, 10M memory-mapped)
    .venv/bin/python bench/scale.py --skip-throughput --vectors 1000000

Throughput: the same generated folder of small JPEGs indexed with ``index_folder`` (decode workers + encoder
in-process) and with ``index_folder_ray`` (decode tasks + encoder actor), plus encoder-only and decode-only
rates (the per-node figures the README projection is built from).

Index: clustered synthetic unit vectors (a mixture of Gaussians, like real embeddings), generated in chunks.
- n whose raw vectors fit ``--max-ram-gb``: a full ``build_index`` under a memory budget of
  ``--bytes-per-vector`` × n, which forces IVF-PQ; build time, index bytes per vector, tuned nprobe and
  recall@10 (measured by build_index against exact search) are reported.
- larger n (10M × 512 float32 is 20 GB): the vectors are written chunk by chunk to a memory-mapped
  ``.npy`` in ``--work`` and the same full ``build_index`` runs over the memory map, so build time, bytes per
  vector and recall@10 (exact ground truth streamed from the map) are all measured, not projected. Peak
  anonymous memory is sampled separately from mapped file pages.

Plan + commit (``--plan-rows 100000,1000000,10000000``): a parquet list of N distinct paths that exist is planned
and committed in a fresh process (stat every path, catalog lookups, ids, work list; every part staged with
synthetic features, no decoding and no model; catalog insert, vectors, index). The N paths cost about
N / 1000 inodes: 1000 hard links to one small JPEG, reached through N / 1000 symlinks to their folder. Peak
RSS (total, anonymous, file pages) is sampled per phase and per commit step; a line through the sizes run
gives a projection to 100M rows, labelled as one.

    .venv/bin/python bench/scale.py --skip-throughput --vectors "" --plan-rows 100000,300000,1000000,10000000
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

    from t2c.data.sources import walk_folder
    from t2c.indexer.aligner import Aligner
    from t2c.indexer.encoders import make_encoder
    from t2c.indexer.pipeline import index_folder
    from t2c.indexer.ray_engine import decode_batch, index_folder_ray

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
        from t2c.data.store import open_store

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

    from t2c.indexer.index_build import build_index

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


class _Sampler:
    """A daemon thread calling ``_run`` from ``with`` entry until exit (``_stop`` tells it to end)."""

    def __init__(self):
        import threading

        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        raise NotImplementedError

    def __enter__(self):
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()


class AnonPeak(_Sampler):
    """Peak anonymous (heap) resident memory, sampled from /proc every 0.2 s; file pages are not counted."""

    def __init__(self):
        super().__init__()
        self.peak_kb = 0

    def _run(self):
        while not self._stop.is_set():
            try:
                for line in Path("/proc/self/status").read_text().splitlines():
                    if line.startswith("RssAnon:"):
                        self.peak_kb = max(self.peak_kb, int(line.split()[1]))
            except OSError:
                return
            self._stop.wait(0.2)

    @property
    def gb(self) -> float:
        return round(self.peak_kb / 2**20, 2)


class PhasePeaks(_Sampler):
    """Peak resident memory per phase, sampled from /proc/self/status every ``every`` s by a thread: total RSS
    (VmRSS), anonymous (RssAnon: heap, the index, DuckDB's buffers) and file pages mapped in (RssFile: the
    interpreter's libraries, memory-mapped arrays). ``phase()`` names the phase running now."""

    def __init__(self, phase, every: float = 0.05):
        super().__init__()
        self.phase, self.every, self.peaks = phase, every, {}

    def sample(self) -> None:
        try:
            kb = {k: int(v.split()[0]) for k, v in (ln.split(":", 1) for ln in
                                                     Path("/proc/self/status").read_text().splitlines())
                  if k in ("VmRSS", "RssAnon", "RssFile")}
        except OSError:
            return
        p = self.peaks.setdefault(self.phase() or "other", {"rss_gb": 0.0, "anon_gb": 0.0, "file_gb": 0.0})
        for key, k in (("rss_gb", "VmRSS"), ("anon_gb", "RssAnon"), ("file_gb", "RssFile")):
            p[key] = max(p[key], round(kb.get(k, 0) / 2**20, 3))

    def _run(self):
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.every)


def index_on_disk(n: int, d: int, bpv: int, work: Path, chunk: int = 250_000) -> dict:
    """The full ``build_index`` over a memory-mapped ``vectors.npy`` written chunk by chunk (the raw vectors,
    20 GB at 10M × 512, exceed RAM): the same path a store takes when its vectors are memory-mapped."""
    import faiss

    from t2c.indexer.index_build import build_index

    syn = Synth(d)
    work.mkdir(parents=True, exist_ok=True)
    path = work / f"vectors-{n}x{d}.npy"
    t = time.perf_counter()
    v = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(n, d))
    for s in range(0, n, chunk):
        v[s : s + chunk] = syn.chunk(s, min(chunk, n - s))
    v.flush()
    del v
    gen_s = time.perf_counter() - t
    try:
        v = np.load(path, mmap_mode="r")
        ids = np.arange(n, dtype=np.int64)
        with AnonPeak() as mem:
            t = time.perf_counter()
            index, info = build_index(v, ids, memory_budget=n * bpv)
            build_s = time.perf_counter() - t
        nbytes = len(faiss.serialize_index(index))
    finally:
        path.unlink(missing_ok=True)
    return {"n": n, "d": d, "mode": "measured (full build_index over memory-mapped vectors on disk)",
            "memory_budget_bytes": n * bpv, "raw_float32_bytes": n * d * 4,
            "index": {k: info[k] for k in info if k != "n"}, "build_seconds": round(build_s, 1),
            "generate_seconds": round(gen_s, 1), "index_bytes": nbytes, "bytes_per_vector": round(nbytes / n, 2),
            "recall_at_10": info.get("recall_at_10"), "nprobe": info.get("nprobe"),
            "peak_anon_rss_gb": mem.gb, "peak_rss_gb_incl_mapped_pages": rss_gb()}


# ------------------------------------------------------------------------------------------------
# planning + committing a large parquet list (driver memory)
# ------------------------------------------------------------------------------------------------
def make_path_list(work: Path, n: int, files_per_dir: int = 1000) -> Path:
    """A parquet list of ``n`` distinct paths that all exist, written in chunks: ``files_per_dir`` hard links to
    one small JPEG in ``work/real``, reached through ``ceil(n / files_per_dir)`` symlinks to that folder
    (``work/s{j}/f{i}.jpg``), so the filesystem holds thousands of entries, not millions."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    real = work / "real"
    real.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (32, 24), (200, 30, 30)).save(real / "f0.jpg", quality=90)
    for i in range(1, files_per_dir):
        os.link(real / "f0.jpg", real / f"f{i}.jpg")
    for j in range(-(-n // files_per_dir)):
        os.symlink("real", work / f"s{j}")
    out = work / "list.parquet"
    with pq.ParquetWriter(out, pa.schema([("path", pa.string())])) as w:
        for s in range(0, n, 1_000_000):
            k = np.arange(s, min(n, s + 1_000_000))
            w.write_table(pa.table({"path": [f"s{a}/f{b}.jpg" for a, b in zip(k // files_per_dir, k % files_per_dir)]}))
    return out


def _plan_commit_child(lst: str, store: str, part_size: int, q) -> None:
    """In a fresh process: plan the list, stage every part with synthetic features (no decoding or model: the
    driver-side work only), commit; put timings, peak memory per phase and this process's peak RSS on ``q``."""
    import faiss

    faiss.omp_set_num_threads(1)
    from t2c.data.sources import iter_path_list, iter_stat_paths
    from t2c.data.store import StoreWriter
    from t2c.indexer.encoders import parse_spec
    from t2c.indexer.pipeline import finish_run, plan_entries, start_run
    from t2c.indexer.staging import ItemResult
    import t2c.indexer.aligner  # noqa: F401 - imported up front (not lazily mid-run), so the measured code is
    import t2c.indexer.index_build  # noqa: F401 - the code as it was when the run started

    out = {"rss_gb_after_imports": rss_gb()}
    state = {"phase": "plan", "writer": None}

    def phase():
        w = state["writer"]
        return f"commit:{w.phase}" if state["phase"] == "commit" and w is not None and w.phase else state["phase"]

    t0 = time.perf_counter()
    with PhasePeaks(phase) as mem, StoreWriter(store) as writer:
        state["writer"] = writer
        plan = plan_entries(writer, iter_stat_paths(iter_path_list(lst), base=Path(lst).parent))
        out["plan_seconds"] = round(time.perf_counter() - t0, 1)
        out["rss_gb_after_plan"] = rss_gb()
        state["phase"] = "start"
        run = start_run(writer, parse_spec("python:tests.tiny_encoders:tiny_clip"), plan, t0, aligner=None,
                        fit_aligner=None, clip=None, fit_workers=0, progress=False, max_pixels=1 << 26,
                        batch_size=32, device=None, threads=1, part_size=part_size)
        state["phase"] = "stage"
        t1 = time.perf_counter()
        rng = np.random.default_rng(0)
        for i, part in enumerate(run.parts):
            feats = rng.normal(size=(len(part), run.encoder.dim)).astype(np.float32)
            run.staging.write_part(i, list(part), (ItemResult(True, f, 32, 24, "h") for f in feats),
                                   run.encoder.dim, {})
        out["stage_seconds"] = round(time.perf_counter() - t1, 1)
        out["rss_gb_after_staging"] = rss_gb()
        state["phase"] = "commit"
        t2 = time.perf_counter()
        rep = finish_run(writer, run, plan, lst, None, 0, 0.0, t0)
        out["commit_seconds"] = round(time.perf_counter() - t2, 1)
        out["commit_step_seconds"] = dict(writer.commit_seconds)
        state["phase"] = "end"
        mem.sample()
    snap = writer.current
    out["index"] = {k: snap.manifest["index"].get(k) for k in ("type", "factory", "nlist", "nprobe", "recall_at_10")}
    out["index_bytes"] = os.path.getsize(snap.path / "index.faiss")
    out.update(added=rep.added, errors=rep.errors, peak_rss_gb=rss_gb(),
               peak_anon_rss_gb=max(p["anon_gb"] for p in mem.peaks.values()), peak_by_phase=mem.peaks)
    q.put(out)


def plan_commit(n: int, work: Path, part_size: int) -> dict:
    """Peak driver RSS for planning + committing an ``n``-row parquet list (measured in a child process)."""
    import multiprocessing as mp
    import shutil

    work = work / f"plan-{n}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    try:
        t = time.perf_counter()
        lst = make_path_list(work / "files", n)
        gen_s = time.perf_counter() - t
        ctx = mp.get_context("spawn")
        q = ctx.Queue()
        p = ctx.Process(target=_plan_commit_child, args=(str(lst), str(work / "store"), part_size, q))
        p.start()
        import queue

        while True:
            try:
                res = q.get(timeout=5)
                break
            except queue.Empty:
                if not p.is_alive():
                    raise RuntimeError(f"the plan + commit process died (exit code {p.exitcode})") from None
        p.join()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return {"rows": n, "part_size": part_size, "list_seconds": round(gen_s, 1), **res,
            "mode": "measured: plan (stat every path, catalog lookups, ids) + stage synthetic 16-d features + "
                    "commit (catalog insert, vectors, index) in a fresh process; no decoding, no model"}


def project(points: list[dict], targets=(10_000_000, 100_000_000), dim: int = 16) -> dict:
    """Least-squares line through (rows, peak RSS) and (rows, seconds), evaluated at ``targets``: a projection.

    The index's own bytes are projected apart (``index_bytes``): its type changes with size under the default
    memory budget (IVF-Flat: ``4·dim + 8`` bytes a vector with its id; past the budget IVF-PQ: ``m + 8``), which a
    line through IVF-Flat points cannot know.
    """
    if len(points) < 2:
        return {}
    from t2c.indexer.index_build import DEFAULT_BUDGET, choose_index_type

    x = np.array([p["rows"] for p in points], float)
    out = {}
    for key in ("peak_rss_gb", "peak_anon_rss_gb", "plan_seconds", "stage_seconds", "commit_seconds"):
        y = np.array([p[key] for p in points], float)
        slope, icpt = np.polyfit(x, y, 1)
        out[key] = {"per_million_rows": round(float(slope) * 1e6, 3), "intercept": round(float(icpt), 3),
                    **{f"at_{t:.0e}": round(float(icpt + slope * t), 2) for t in targets}}
    idx = {}
    for t in targets:
        c = choose_index_type(t, dim, memory_budget=DEFAULT_BUDGET)
        per = 4 * dim + 8 if c["type"] != "ivf_pq" else c["m"] + 8
        idx[f"at_{t:.0e}"] = {"type": c["type"], "factory": c["factory"], "gb": round(t * per / 2**30, 2)}
    out["index_bytes"] = idx
    # the index phase holds the driver's peak: what it adds over the commit's start is the index plus a share of
    # it (list growth, tuning), measured at the largest size run; the other phases are flat in rows
    big = max(points, key=lambda p: p["rows"])
    ph = big.get("peak_by_phase", {})
    if "commit:index" in ph and "commit" in ph:
        index_gb = big["index_bytes"] / 2**30
        extra = (ph["commit:index"]["rss_gb"] - ph["commit"]["rss_gb"]) / index_gb - 1
        others = max(v["rss_gb"] for k, v in ph.items() if k != "commit:index")
        out["peak_rss_gb_by_index"] = {
            "model": "max(other phases at the largest size, commit RSS + index GB x (1 + overhead))",
            "overhead_of_index": round(extra, 3), "others_gb": others,
            **{k: round(max(others, ph["commit"]["rss_gb"] + v["gb"] * (1 + extra)), 2) for k, v in idx.items()}}
    out["note"] = "PROJECTION from a line through the measured sizes, not a measurement"
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=300)
    ap.add_argument("--encoder", default="timm:resnet18?weights=random")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--vectors", default="1000000,10000000")
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--bytes-per-vector", type=int, default=64, help="memory budget per vector (forces IVF-PQ)")
    ap.add_argument("--max-ram-gb", type=float, default=6.0,
                    help="largest raw float32 set held in RAM; larger sets are memory-mapped from --work")
    ap.add_argument("--work", type=Path, default=None, help="scratch folder for memory-mapped vectors (default: temp)")
    ap.add_argument("--skip-throughput", action="store_true")
    ap.add_argument("--polysemous", action="store_true", help="keep faiss' default polysemous PQ training")
    ap.add_argument("--threads", type=int, default=None, help="FAISS OpenMP threads")
    ap.add_argument("--plan-rows", default="", help="comma-separated parquet list sizes to plan + commit "
                    "(peak driver RSS), e.g. 100000,1000000,10000000")
    ap.add_argument("--part-size", type=int, default=16384, help="images per staged part in --plan-rows runs")
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
    if args.plan_rows:
        pts = []
        for n in [int(x) for x in args.plan_rows.split(",") if x]:
            pts.append(plan_commit(n, args.work or Path(tempfile.mkdtemp(prefix="t2c-plan-")), args.part_size))
            print(json.dumps(pts[-1]), file=sys.stderr, flush=True)
        res["plan_commit"] = {"runs": pts, "projection": project(pts)}
    res["index"] = []
    for n in [int(x) for x in args.vectors.split(",") if x]:
        if n * args.dim * 4 <= args.max_ram_gb * 2**30:
            r = index_full(n, args.dim, args.bytes_per_vector)
        else:
            r = index_on_disk(n, args.dim, args.bytes_per_vector, args.work or Path(tempfile.mkdtemp(prefix="t2c-scale-")))
        res["index"].append(r)
        print(json.dumps(r), file=sys.stderr, flush=True)
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()

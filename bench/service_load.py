"""Load benchmark of `t2c serve`: concurrent clients on loopback against a 100,000-image store.

Builds a synthetic store (random unit vectors written through StoreWriter + build_index, with a catalog;
no image files: search needs only vectors and metadata), starts uvicorn in a subprocess, warms the
concept cache, then runs N concurrent httpx clients issuing search queries (bounded by a request count
and a time limit). Prints JSON: throughput, p50/p99 latency, error count (must be 0).

Usage: .venv/bin/python bench/service_load.py [--n 100000] [--clients 8] [--requests 2000] [--seconds 60]
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
CLIP = "python:tests.tiny_encoders:tiny_clip"
DIM = 16
QUERIES = [
    "red", "blue circle", "red AND NOT green", "sunset AND width>=512", '2*"dog"@0.2 OR cat',
    "(red OR blue) AND square", "tree AND height<400", "green triangle", 'path:"*/d1/*" AND car', "NOT sky",
    "yellow@0.1", "boat OR ship OR harbour", "small red circle AND width>100", "night city", "purple",
]


def build_store(path: Path, n: int, seed: int = 0) -> dict:
    """A synthetic store of n images (random unit vectors) with a full catalog."""
    from t2c.data.store import Changes, StoreWriter, atomic_save_npz, new_feature_shard_name, utcnow
    from t2c.indexer.index_build import build_index

    rng = np.random.default_rng(seed)
    feats = rng.normal(size=(n, DIM)).astype(np.float32)
    ids = np.arange(n, dtype=np.int64)
    t0 = time.perf_counter()
    with StoreWriter(path) as w:
        run_id = "bench"
        shards = []
        for s in range(0, n, 50_000):
            rel = new_feature_shard_name(run_id, s // 50_000)
            atomic_save_npz(path / rel, ids=ids[s:s + 50_000], feats=feats[s:s + 50_000])
            shards.append(rel)
        widths = rng.integers(64, 2048, n)
        heights = rng.integers(64, 2048, n)
        rows = [{"id": int(i), "path": f"/synthetic/d{i % 3}/img{i:06d}.jpg", "relpath": f"d{i % 3}/img{i:06d}.jpg",
                 "content_hash": f"{i:032x}", "size": 1000 + int(i), "width": int(widths[i]),
                 "height": int(heights[i]), "mtime_ns": 1_700_000_000_000_000_000 + int(i)} for i in ids]
        changes = Changes(rows=rows, feature_shards=shards, removed_ids=[], errors=[], cleared_error_paths=[],
                          run={"run_id": run_id, "command": "bench", "settings": {}, "started_at": utcnow(),
                               "added": n, "updated": 0, "removed": 0})
        fields = {"encoder": CLIP, "clip": CLIP, "dim": DIM, "feature_dim": DIM, "roots": ["/synthetic"],
                  "aligner": {"digest": "identity", "r2_heldout": None, "identity": True, "file": None}}

        def unit(_ids, f):
            return (f / np.linalg.norm(f, axis=1, keepdims=True)).astype(np.float32)

        snap = w.commit(changes, manifest_fields=fields, vectors_for=unit, build_index=lambda v, i: build_index(v, i),
                        next_id=n)
        info = dict(snap.manifest["index"])
    return {"build_seconds": round(time.perf_counter() - t0, 2), "index": info.get("type"),
            "index_factory": info.get("factory")}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(store: Path, port: int) -> subprocess.Popen:
    code = ("import uvicorn; from service.app import create_app; "
            f"uvicorn.run(create_app({str(store)!r}), host='127.0.0.1', port={port}, log_level='warning')")
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"))
    return subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env=env)


async def run_load(base: str, clients: int, requests: int, seconds: float, k: int) -> dict:
    import httpx

    lat, server_ms, errors, statuses = [], [], [], {}
    counter = {"next": 0}
    deadline = time.perf_counter() + seconds

    async def worker(c: httpx.AsyncClient, wid: int):
        while time.perf_counter() < deadline:
            i = counter["next"]
            if i >= requests:
                return
            counter["next"] = i + 1
            q = QUERIES[(i * 7 + wid) % len(QUERIES)]
            t = time.perf_counter()
            try:
                r = await c.get("/api/search", params={"q": q, "k": k, "offset": (i % 3) * k, "explain": i % 2 == 0})
                dt = time.perf_counter() - t
                statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
                if r.status_code != 200:
                    errors.append(f"{r.status_code}: {r.text[:200]}")
                else:
                    lat.append(dt)
                    server_ms.append(r.json()["took_ms"])
            except httpx.HTTPError as e:
                errors.append(repr(e))

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=base, timeout=60, limits=limits) as c:
        t0 = time.perf_counter()
        await asyncio.gather(*(worker(c, w) for w in range(clients)))
        wall = time.perf_counter() - t0
    a = np.array(lat) * 1000 if lat else np.array([np.nan])
    return {"clients": clients, "requests": len(lat) + len(errors), "ok": len(lat), "errors": len(errors),
            "error_samples": errors[:3], "statuses": {str(k): v for k, v in statuses.items()},
            "seconds": round(wall, 2), "throughput_rps": round(len(lat) / wall, 1),
            "latency_ms": {"p50": round(float(np.percentile(a, 50)), 2), "p90": round(float(np.percentile(a, 90)), 2),
                           "p99": round(float(np.percentile(a, 99)), 2), "max": round(float(np.max(a)), 2)},
            "server_took_ms_p50": round(float(np.median(server_ms)), 2) if server_ms else None}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--k", type=int, default=20)
    ap.add_argument("--store", type=Path, default=None, help="reuse/create the store here (default: a temp dir)")
    args = ap.parse_args()
    import httpx

    tmp = None
    if args.store is None:
        tmp = tempfile.TemporaryDirectory(prefix="t2c-bench-")
        store = Path(tmp.name) / "store"
    else:
        store = args.store
    build = build_store(store, args.n) if not (store / "CURRENT").exists() else {"reused": True}
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    proc = start_server(store, port)
    try:
        t0 = time.perf_counter()
        while True:
            try:
                if httpx.get(base + "/api/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None or time.perf_counter() - t0 > 120:
                raise SystemExit("server did not start")
            time.sleep(0.2)
        startup = time.perf_counter() - t0
        t1 = time.perf_counter()
        cold = []
        for q in QUERIES:  # cold: text encoding + calibration of each concept over all n images
            t = time.perf_counter()
            r = httpx.get(base + "/api/search", params={"q": q, "k": args.k}, timeout=120)
            r.raise_for_status()
            cold.append((time.perf_counter() - t) * 1000)
        warm_seconds = time.perf_counter() - t1
        load = asyncio.run(run_load(base, args.clients, args.requests, args.seconds, args.k))
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
        if tmp is not None:
            tmp.cleanup()
    out = {"bench": "service_load", "n_images": args.n, "store": build, "startup_seconds": round(startup, 2),
           "cold_queries": len(QUERIES), "cold_ms_p50": round(float(np.median(cold)), 1),
           "cold_ms_max": round(float(np.max(cold)), 1), "warmup_seconds": round(warm_seconds, 2), **load,
           "cpu_count": os.cpu_count()}
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()

"""TEMPORARY tuning sweep for the world models (runs jobs pinned to 2 cores each). Not part of the product."""
import json
import os
import subprocess
import sys
import time

import numpy as np

OUT = os.environ.get("OUT", "/tmp/sweep_out")
TMP = "/tmp/sweep"
JOBS = {
    "clipA": ("clip", dict(steps=900, lr=2e-3)),
    "clipB": ("clip", dict(steps=900, lr=1e-3)),
    "clipM": ("clip", dict(steps=900, lr=2e-3, multi_positive=True)),
    "clipL": ("clip", dict(steps=1100, lr=2e-3)),
    "clipM6": ("clip", dict(steps=600, lr=2e-3, multi_positive=True)),
    "pairnet": ("pairnet", dict(steps=500, lr=2e-3)),
    "autoenc": ("autoenc", dict(steps=300, lr=2e-3)),
}

SMALL = bool(os.environ.get("SMALL"))
NT, NS, NA = (600, 200, 300) if SMALL else (20000, 2000, 5000)
if SMALL:
    JOBS = {k: (n, {**kw, "steps": 3}) for k, (n, kw) in list(JOBS.items())[:2] + list(JOBS.items())[-3:]}


def _chunk(args):
    from data.world.generator import sample_dataset
    n, seed, start, n_obj = args
    return sample_dataset(n, seed, start=start, n_objects=n_obj)[1]


def render(n, seed, n_obj=None, procs=14 if not SMALL else 2):
    from multiprocessing import Pool
    step = (n + procs - 1) // procs
    parts = [(min(step, n - s), seed, s, n_obj) for s in range(0, n, step)]
    with Pool(procs) as p:
        return np.concatenate(p.map(_chunk, parts))


def scenes(n, seed, n_obj=None):
    from data.world.generator import parse_weights, sample_scene, scene_rng
    p = parse_weights(None)
    return [sample_scene(scene_rng(seed, i), p, n_objects=n_obj) for i in range(n)]


def main():
    mode = sys.argv[1]
    os.makedirs(OUT, exist_ok=True)
    os.makedirs(TMP, exist_ok=True)
    if mode == "all":
        t = time.time()
        np.save(f"{TMP}/train.npy", render(NT, 0))
        np.save(f"{TMP}/single.npy", render(NS, 7_000_001, 1))
        np.save(f"{TMP}/align.npy", render(NA, 7_000_002))
        print("prep", time.time() - t, flush=True)
        procs = []
        for k, tag in enumerate(JOBS):
            cores = f"{2 * k},{2 * k + 1}" if not SMALL else "0,1"
            log = open(f"{OUT}/{tag}.log", "w")
            procs.append(subprocess.Popen(["timeout", sys.argv[2], "taskset", "-c", cores, sys.executable,
                                           __file__, "job", tag], stdout=log, stderr=subprocess.STDOUT))
        for p in procs:
            p.wait()
        print("jobs done", time.time() - t, flush=True)
        evaluate()
    elif mode == "job":
        import torch
        torch.set_num_threads(2)
        from data.world.models import save_world_model
        from data.world.train import train_model
        tag = sys.argv[2]
        name, kw = JOBS[tag]
        sc = scenes(NT, 0)
        px = np.load(f"{TMP}/train.npy")
        t = time.time()
        model, hist = train_model(name, sc, px, batch=256, seed=0, **kw)
        secs = time.time() - t
        save_world_model(model, f"{OUT}/{tag}.safetensors")
        json.dump({"seconds": secs, "hist": hist[::10]}, open(f"{OUT}/{tag}.json", "w"))
        print("done", secs, flush=True)
    elif mode == "eval":
        evaluate()


def evaluate():
    import torch
    torch.set_num_threads(2)
    from data.world.models import load_world_model
    from data.world.train import _encode, zero_shot_accuracy
    single_sc, single_px = scenes(NS, 7_000_001, 1), np.load(f"{TMP}/single.npy")
    align_px = np.load(f"{TMP}/align.npy")
    res = {}
    clips = {}
    for tag, (name, _) in JOBS.items():
        path = f"{OUT}/{tag}.safetensors"
        if name != "clip" or not os.path.exists(path):
            continue
        m = load_world_model("clip", path)
        clips[tag] = m

        def et(texts, m=m):
            with torch.inference_mode():
                return m.encode_text(texts).numpy()
        res[tag] = {"zs": zero_shot_accuracy(_encode(m, single_px), et, single_sc)}
        print(tag, res[tag], flush=True)
    for tag in ("pairnet", "autoenc"):
        path = f"{OUT}/{tag}.safetensors"
        if not os.path.exists(path):
            continue
        enc = load_world_model(tag, path)
        fa, fs = _encode(enc, align_px), _encode(enc, single_px)
        for ct, m in clips.items():
            ca = _encode(m, align_px)
            n_tr = int(0.8 * len(fa))
            X = np.hstack([fa, np.ones((len(fa), 1))])
            W = np.linalg.lstsq(X[:n_tr], ca[:n_tr], rcond=None)[0]
            pred = X[n_tr:] @ W
            r2 = 1 - ((pred - ca[n_tr:]) ** 2).sum() / ((ca[n_tr:] - ca[:n_tr].mean(0)) ** 2).sum()
            al = np.hstack([fs, np.ones((len(fs), 1))]) @ W

            def et(texts, m=m):
                with torch.inference_mode():
                    return m.encode_text(texts).numpy()
            r = {"r2": float(r2), "zs": zero_shot_accuracy(al, et, single_sc)}
            res[f"{tag}->{ct}"] = r
            print(tag, ct, r, flush=True)
    json.dump(res, open(f"{OUT}/eval.json", "w"), indent=1)


if __name__ == "__main__":
    main()

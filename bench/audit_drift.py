"""Benchmark: concept-audit prevalence accuracy and drift detection on generated concept-world collections.

Prevalence: one collection (default 2000 images, 1-3 objects), indexed with ENCODER (aligned into world:clip
when it is not a CLIP); for every single-attribute concept (8 colours, 6 shapes; plus sizes and backgrounds
reported separately) the estimate is compared with the true fraction of images (``concept_truth``), for the
mixture estimator and the count-above-threshold estimator.

Drift: PAIRS pairs of collections (default 10 pairs of 500 images); in pair i collection B is generated with
one value's weight set to 3 (cycling through colours and shapes). Target: the changed concept ranks first
(|Cohen's h|) in >= 9 of 10 pairs and no concept of an unchanged category is significant after BH.

    .venv/bin/python bench/audit_drift.py [--encoder world:clip] [--n 2000] [--pairs 10] [--pair-n 500]

Prints one JSON object.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from t2c.data.world import vocab  # noqa: E402
from t2c.data.world.generator import concept_truth, generate  # noqa: E402

COLOURS = list(vocab.COLORS)
SHAPES = list(vocab.SHAPES)
SIZES = list(vocab.SIZES)
BACKGROUNDS = [f"{b} background" if b != "striped" else "striped background" for b in vocab.BACKGROUNDS]


def world_store(work: Path, name: str, n: int, seed: int, encoder: str, weights=None, n_objects=None,
                fit: int | None = None, columns: bool = False):
    """Generate a collection and index it; returns (snapshot, labels table, relpath order)."""
    import pyarrow.parquet as pq

    from t2c.data.store import open_store
    from t2c.indexer.pipeline import index_folder

    folder = work / f"{name}_imgs"
    labels = generate(folder, n=n, seed=seed, weights=weights, n_objects=n_objects)
    table = pq.read_table(labels)
    user = None
    if columns:
        user = {}
        for row in table.to_pylist():
            o = row["objects"][0]
            user[row["path"]] = {"shape": o["shape"], "color": o["color"], "pair": f"{o['color']} {o['shape']}",
                                 "background": row["background"]}
    clip = None if encoder.startswith("world:clip") else os.environ.get("T2C_BENCH_CLIP", "world:clip")
    fit_n = None if clip is None else (fit or min(n, 2000))
    index_folder(folder, work / name, encoder, clip=clip, fit_aligner=fit_n, workers=0, user_columns=user)
    return open_store(work / name), table


def truth_of(snapshot, table, concept: str) -> np.ndarray:
    """Ground truth of a concept in store row order."""
    t = concept_truth(table, concept)
    by_rel = dict(zip(table.column("path").to_pylist(), t))
    rel = dict(snapshot.catalog().execute("SELECT id, relpath FROM images").fetchall())
    return np.array([by_rel[rel[int(i)]] for i in snapshot.ids], bool)


def prevalence_bench(work: Path, encoder: str, n: int, seed: int = 1, n_objects: int | None = None) -> dict:
    from t2c.query.audit import audit

    snap, table = world_store(work, "prev", n, seed, encoder, n_objects=n_objects)
    concepts = COLOURS + SHAPES + SIZES + BACKGROUNDS
    out = {"n": n, "objects_per_image": n_objects or "1-3", "encoder": encoder, "aligner_r2": snap.manifest["aligner"].get("r2_heldout"), "concepts": {}}
    reps = {m: audit(snap, concepts, top=0, method=m).to_dict() for m in ("mixture", "count")}
    for j, c in enumerate(concepts):
        true = float(truth_of(snap, table, c).mean())
        row = {"true": round(true, 4)}
        for m, rep in reps.items():
            r = rep["concepts"][j]
            row[m] = round(r["prevalence"], 4)
            row[f"{m}_err"] = round(r["prevalence"] - true, 4)
            row[f"{m}_covers"] = bool(r["ci_low"] <= true <= r["ci_high"])
            row[f"{m}_used"] = r["method"]
        out["concepts"][c] = row

    def summ(group, m):
        errs = [abs(out["concepts"][c][f"{m}_err"]) for c in group]
        return {"mean_abs_err": round(float(np.mean(errs)), 4), "max_abs_err": round(float(np.max(errs)), 4),
                "within_3pt": int(sum(e <= 0.03 for e in errs)), "of": len(errs),
                "ci_coverage": round(float(np.mean([out["concepts"][c][f"{m}_covers"] for c in group])), 3)}

    out["summary"] = {g: {m: summ(grp, m) for m in reps} for g, grp in
                      {"single_object(colour+shape)": COLOURS + SHAPES, "sizes": SIZES, "backgrounds": BACKGROUNDS}.items()}
    return out


def drift_bench(work: Path, encoder: str, pairs: int, pair_n: int) -> dict:
    from t2c.query.audit import drift

    concepts = COLOURS + SHAPES + SIZES + BACKGROUNDS
    results = []
    for i in range(pairs):
        if i % 2 == 0:
            cat, val = "color", COLOURS[(i // 2) % len(COLOURS)]
        else:
            cat, val = "shape", SHAPES[(i // 2) % len(SHAPES)]
        a, _ = world_store(work, f"a{i}", pair_n, 100 + i, encoder)
        b, _ = world_store(work, f"b{i}", pair_n, 200 + i, encoder, weights=[f"{cat}.{val}=3"])
        rep = drift(a, b, concepts, top=0).to_dict()
        same_cat = COLOURS if cat == "color" else SHAPES
        unchanged = [c for c in concepts if c not in same_cat]
        rows = {r["concept"]: r for r in rep["concepts"]}
        results.append({"changed": f"{cat}.{val}=3", "concept": val, "rank": rows[val]["rank"],
                        "h": round(rows[val]["cohens_h"], 3), "p_adj": rows[val]["p_adj"],
                        "significant": rows[val]["significant"],
                        "top3": [r["concept"] for r in rep["concepts"][:3]],
                        "false_positives_unchanged": [c for c in unchanged if rows[c]["significant"]],
                        "same_category_flagged": [c for c in same_cat if c != val and rows[c]["significant"]]})
        for p in (work / f"a{i}", work / f"b{i}", work / f"a{i}_imgs", work / f"b{i}_imgs"):
            shutil.rmtree(p, ignore_errors=True)
    return {"pairs": pairs, "n_per_collection": pair_n, "ranked_first": sum(r["rank"] == 1 for r in results),
            "pairs_with_false_positive": sum(bool(r["false_positives_unchanged"]) for r in results),
            "target": "ranked_first >= 9 of 10 and pairs_with_false_positive == 0", "per_pair": results}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--encoder", default="world:clip")
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--pairs", type=int, default=10)
    ap.add_argument("--pair-n", type=int, default=500)
    ap.add_argument("--objects", type=int, default=None, help="prevalence collection: force 1, 2 or 3 objects")
    ap.add_argument("--skip-prevalence", action="store_true")
    ap.add_argument("--skip-drift", action="store_true")
    args = ap.parse_args()
    import torch

    torch.set_num_threads(1)
    t0 = time.time()
    work = Path(tempfile.mkdtemp(prefix="t2c-bench-audit-"))
    try:
        out = {"bench": "audit_drift", "encoder": args.encoder}
        if not args.skip_prevalence:
            out["prevalence"] = prevalence_bench(work, args.encoder, args.n, n_objects=args.objects)
        if not args.skip_drift:
            out["drift"] = drift_bench(work, args.encoder, args.pairs, args.pair_n)
        out["seconds"] = round(time.time() - t0, 1)
        print(json.dumps(out, indent=1))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

"""Calibration benchmark on the concept world: F1 of calibrated thresholds vs the reference mean + 1·std.

Generates a held-out collection of multi-object world images (seed not used in training), indexes it with
world:clip and with aligned non-CLIP world encoders, and measures, against exact ground truth from
``t2c.data.world.generator.concept_truth``:

  * single-concept presence: each colour, each shape, and colour-shape pairs ("red circle");
  * 2- and 3-constraint AND / NOT queries over those concepts (run through ``Engine.search``),

for our calibration (``t2c.query.calibrate.calibrate``: 1-4 component mixture by BIC, the present/absent gap
chosen by the CLIP model's own cut when it has one, posteriors cross) and the reference recipe (mean + 1·std
per concept), in the same run; and, as a ceiling, thresholds chosen per concept *using the labels*
(``label_chosen``: the best-F1 quantile of each concept's scores), which no rule without labels can beat by
much. Prints JSON.

The aligned encoders are world:pairnet with its pooled output (the paper's recipe), with
``features=stages`` (the pooled output plus each stage's pooled feature maps) and with
``features=stages+probs`` (plus its own 48 colour-shape pair probabilities, the sigmoid of its head).
Their ridge aligners are fitted, as in the paper (which fits on ImageNet's training set), on a separate set
of world images as large as the world models' training set (``--fit-set 20000``, another seed; no labels are
used), or with ``--fit-set 0`` on N images of the collection itself (``--fit-aligner N``).

Usage:
    .venv/bin/python bench/calibration.py                      # n = 2000; world:clip and three aligned pairnets
    .venv/bin/python bench/calibration.py --n 300 --clip 'world:clip?weights=random'   # smoke test
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

os.environ.setdefault("OMP_NUM_THREADS", "2")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402


def f1(pred: np.ndarray, truth: np.ndarray) -> float:
    """F1 of boolean predictions (1.0 when both are empty)."""
    tp = int((pred & truth).sum())
    denom = int(pred.sum()) + int(truth.sum())
    return 1.0 if denom == 0 else 2 * tp / denom


def make_queries(concepts: list[str], n: int, n_terms: int, rng, truth_of, min_pos: int) -> list[str]:
    """Random AND / NOT queries with ``n_terms`` constraints, at least ``min_pos`` true matches each."""
    forms2 = ["{a} AND {b}", "{a} AND NOT {b}"]
    forms3 = ["{a} AND {b} AND NOT {c}", "{a} AND NOT {b} AND NOT {c}", "{a} AND {b} AND {c}"]
    forms = forms2 if n_terms == 2 else forms3
    out, tries = [], 0
    while len(out) < n and tries < 50 * n:
        tries += 1
        a, b, c = rng.choice(concepts, 3, replace=False)
        q = forms[len(out) % len(forms)].format(a=f'"{a}"', b=f'"{b}"', c=f'"{c}"')
        words = [set(x.split()) for x in (a, b, c)[:n_terms]]
        if q in out or any(words[i] & words[j] for i in range(n_terms) for j in range(i + 1, n_terms)):
            continue
        if truth_of(q).sum() >= min_pos:
            out.append(q)
    return out


def run_store(name: str, store: Path, labels_by_id, concepts, queries2, queries3, truth_tree) -> dict:
    """Per-concept and per-query F1 on one store, ours vs reference."""
    from t2c.query.calibrate import concept_scores, reference_threshold, thresholds_for
    from t2c.query.engine import Engine, evaluate_tree
    from t2c.data.world.generator import concept_truth

    eng = Engine.for_store(store, verify=False)
    snap = eng.snapshot
    ids = np.asarray(snap.ids)
    truth_rows = labels_by_id(ids)
    t0 = time.perf_counter()
    cals = {c: cal.for_search() for c, cal in thresholds_for(snap, concepts, bank=eng.bank).items()}  # as searches
    V = eng.bank.vectors(concepts)
    S = concept_scores(snap, V)
    col = {c: j for j, c in enumerate(concepts)}
    truths = {c: concept_truth(truth_rows, c) for c in concepts}
    best_thr = {}  # the ceiling: per-concept thresholds chosen with the labels
    for c in concepts:
        x = S[:, col[c]]
        best_thr[c] = max(np.quantile(x, np.linspace(0.3, 0.999, 400)), key=lambda q: f1(x >= q, truths[c]))
    thresholds = {"ours": {c: cals[c].threshold for c in concepts},
                  "reference": {c: reference_threshold(S[:, col[c]]) for c in concepts},
                  "label_chosen": best_thr}
    single = {m: {c: f1(S[:, col[c]] >= thr[c], truths[c]) for c in concepts} for m, thr in thresholds.items()}

    def by_thresholds(node, thr):
        return evaluate_tree(node, lambda c: S[:, col[c.text]] >= thr[c.text], lambda f: np.ones(len(ids), bool),
                             len(ids))

    def query_f1(qs):
        scores, agree = {m: [] for m in thresholds}, 0
        for q in qs:
            truth = truth_tree(q, truth_rows)
            res = eng.search(q, k=10_000)
            pred = np.isin(ids, res.all_ids)
            node = eng.parse_query(q)
            agree += int(np.array_equal(pred, by_thresholds(node, thresholds["ours"])))
            scores["ours"].append(f1(pred, truth))  # the engine's own answer
            for m in ("reference", "label_chosen"):
                scores[m].append(f1(by_thresholds(node, thresholds[m]), truth))
        return {**{m: round(float(np.mean(v)), 4) for m, v in scores.items()},
                "ours_min": round(float(np.min(scores["ours"])), 4), "n": len(qs), "engine_equals_direct": agree}

    groups = {"colors": [], "shapes": [], "pairs": []}
    from t2c.data.world import vocab

    for c in concepts:
        key = "colors" if c in vocab.COLORS else "shapes" if c in vocab.SHAPES else "pairs"
        groups[key].append(c)
    summary = {}
    for g, cs in groups.items():
        if cs:
            summary[g] = {m: round(float(np.mean([single[m][c] for c in cs])), 4) for m in single}
    summary["all_single"] = {m: round(float(np.mean(list(single[m].values()))), 4) for m in single}
    out = {
        "store": name, "encoder": snap.encoder, "clip": snap.clip, "n": int(len(ids)),
        "aligner_r2_heldout": (snap.manifest.get("aligner") or {}).get("r2_heldout"),
        "single_concept_f1": summary,
        "query_f1": {"2_constraints": query_f1(queries2), "3_constraints": query_f1(queries3)},
        "methods": {m: sum(1 for c in concepts if cals[c].method == m) for m in {c.method for c in cals.values()}},
        "worst_concepts_ours": sorted(((round(v, 3), c) for c, v in single["ours"].items()))[:5],
        "seconds": round(time.perf_counter() - t0, 1),
    }
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=424242, help="collection seed (training uses 0 and 7000001)")
    ap.add_argument("--clip", default="world:clip")
    ap.add_argument("--encoders", default="world:pairnet,world:pairnet?features=stages,"
                                          "world:pairnet?features=stages+probs",
                    help="non-CLIP encoders aligned into --clip (comma-separated)")
    ap.add_argument("--fit-set", type=int, default=20000,
                    help="fit each aligner on this many separate world images (0: on the collection itself)")
    ap.add_argument("--fit-aligner", type=int, default=1000,
                    help="with --fit-set 0: images of the collection the aligner is fitted on")
    ap.add_argument("--pairs", type=int, default=16, help="colour-shape pair concepts (evenly chosen)")
    ap.add_argument("--queries", type=int, default=40, help="queries per size (2 and 3 constraints)")
    ap.add_argument("--work", type=Path, default=None, help="work dir (kept); default temporary")
    args = ap.parse_args(argv)

    import torch

    torch.set_num_threads(2)
    work = args.work or Path(tempfile.mkdtemp(prefix="t2c-calib-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        return _run(args, work)
    finally:
        if args.work is None:  # a temporary work dir (tens of thousands of images) is not left behind
            shutil.rmtree(work, ignore_errors=True)


def _run(args, work: Path) -> dict:
    """The benchmark proper, in ``work``."""
    from t2c.data.world import vocab
    from t2c.data.world.generator import concept_truth, generate
    from t2c.indexer.pipeline import index_folder
    from t2c.query.engine import evaluate_tree
    from t2c.query.parse import parse

    t0 = time.perf_counter()
    world = work / "world"
    if not (world / "labels.parquet").exists():
        generate(world, args.n, args.seed)
    import pyarrow.parquet as pq

    labels = pq.read_table(world / "labels.parquet")
    row_of_path = {p: i for i, p in enumerate(labels.column("path").to_pylist())}
    gen_s = time.perf_counter() - t0

    colors, shapes = list(vocab.COLORS), list(vocab.SHAPES)
    all_pairs = [f"{c} {s}" for c in colors for s in shapes]
    pairs = [all_pairs[i] for i in np.linspace(0, len(all_pairs) - 1, args.pairs).round().astype(int)]
    pairs = list(dict.fromkeys(pairs))
    concepts = colors + shapes + pairs

    def truth_tree(q, rows):
        node = parse(q)
        return evaluate_tree(node, lambda c: concept_truth(rows, c.text), lambda f: np.ones(len(rows), bool),
                             len(rows))

    rng = np.random.default_rng(args.seed)
    all_rows = labels
    q2 = make_queries(concepts, args.queries, 2, rng, lambda q: truth_tree(q, all_rows), min_pos=10)
    q3 = make_queries(concepts, args.queries, 3, rng, lambda q: truth_tree(q, all_rows), min_pos=10)

    stores = {"clip": args.clip}
    for k, enc in enumerate(e for e in args.encoders.split(",") if e.strip()):
        stores["aligned" if k == 0 else f"aligned{k + 1}"] = enc.strip()
    fit_paths = []
    if args.fit_set:
        fit_dir = work / "fit-set"
        if not (fit_dir / "labels.parquet").exists():
            generate(fit_dir, args.fit_set, args.seed + 1)
        fit_paths = sorted(str(p) for p in (fit_dir / "images").rglob("*.png"))
    results = []
    for name, enc in stores.items():
        store = work / f"store-{name}"
        t1 = time.perf_counter()
        if not (store / "CURRENT").exists():
            kw = {}
            if name != "clip" and fit_paths:
                from t2c.indexer.encoders import make_encoder
                from t2c.indexer.pipeline import fit_aligner_on_folder

                al = fit_aligner_on_folder(make_encoder(enc), args.clip, fit_paths, workers=0, progress=False)
                kw["aligner"] = str(al.save(work / f"aligner-{name}.safetensors"))
            elif name != "clip":
                kw["fit_aligner"] = args.fit_aligner
            index_folder(world / "images", store, enc, clip=None if name == "clip" else args.clip, workers=0,
                         batch_size=128, **kw)
        index_s = time.perf_counter() - t1
        from t2c.data.store import open_store

        snap = open_store(store, verify=False)
        rel = {int(r[0]): r[1] for r in snap.catalog().execute("SELECT id, relpath FROM images").fetchall()}

        def labels_by_id(ids, rel=rel):
            return labels.take([row_of_path["images/" + rel[int(i)]] for i in ids])

        r = run_store(name, store, labels_by_id, concepts, q2, q3, truth_tree)
        r["index_seconds"] = round(index_s, 1)
        results.append(r)
    fit_how = (f"{args.fit_set} separate world images (seed {args.seed + 1})" if args.fit_set
               else f"{args.fit_aligner} collection images")
    out = {"n": args.n, "seed": args.seed, "aligner_fit": fit_how,
           "concepts": {"colors": len(colors), "shapes": len(shapes), "pairs": len(pairs)},
           "reference_recipe": "mean + 1*std per concept",
           "calibration": "1-4 component GMM by BIC; gap by the model's cut (if any) or the top group; posteriors cross",
           "generate_seconds": round(gen_s, 1), "results": results,
           "example_queries": q3[:3]}
    targets = {}
    for r in results:
        f3 = r["query_f1"]["3_constraints"]
        need = 0.9 if r["store"] == "clip" else 0.85
        targets[r["store"]] = {"encoder": r["encoder"], "f1_3_constraints": f3["ours"], "target": need,
                               "met": f3["ours"] >= need and f3["ours"] > f3["reference"]}
    out["targets"] = targets
    print(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()

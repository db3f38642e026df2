"""Query accuracy the way people query: random queries from named families, several collections and seeds.

For every collection seed, a fresh concept-world collection is generated and indexed with each encoder
(world:clip, world:clip-plain, and world:pairnet aligned into world:clip from its pooled output and with
``features=stages+probs``; the aligners are fitted once, without labels, on separate world images). For every
query seed, queries are drawn at random from these families (each query has at least ``--min-true`` true
images, except the rare family):

  single       one colour, shape, size or background ("red", "star", "small", "teal background")
  pair         one colour-shape pair ("orange star")
  pair_not     a pair AND NOT a colour AND NOT a shape ("orange star AND NOT blue AND NOT circle")
  two_pairs    two pairs ANDed ("blue triangle AND red diamond")
  or_group     OR groups ("(red OR blue) AND circle", "orange star OR green square")
  filters      concepts mixed with metadata filters ('orange star AND path:"*3.png"')
  rare         conjunctions with 1..5 true images: three pairs ANDed (drawn from 3-object images) and two
               pairs ANDed; reported apart

Each query runs through ``Engine.search`` (the product's own answer) and is scored against the generator's
labels: precision, recall and F1, averaged over queries per family and overall (the mean over the non-rare
families). Beside them, the label-chosen ceiling: the same tree evaluated with each concept's threshold on
its cosine score chosen *with the labels* (the best-F1 threshold of that concept alone), which no threshold
rule can beat by much. The engine's own estimate of each answer's precision and recall (from the mixture
fits, no labels) is compared with the truth (``estimate_gap``). Per store, ``binding_rules`` counts the 48
colour-shape pairs by the rule that judges them (own threshold, scene, rivals, words) with the quantiles of their
agreement (``t2c.query.binding.rule_agreement``).

Usage:
    .venv/bin/python bench/query_accuracy.py                                  # report seeds, all encoders
    .venv/bin/python bench/query_accuracy.py --collection-seeds 101 --query-seeds 0   # the tuning seeds
    .venv/bin/python bench/query_accuracy.py --n 300 --per-family 2 --encoders world:clip   # smoke test
"""
from __future__ import annotations

import argparse
import fnmatch
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

FAMILIES = ("single", "pair", "pair_not", "two_pairs", "or_group", "filters", "rare")
TUNING_SEEDS = {"collection": [101, 102], "query": [0, 4]}  # what the binding and calibration settings were tuned on
CLIP = "world:clip"
DEFAULT_ENCODERS = ("world:clip", "world:clip-plain", "world:pairnet", "world:pairnet?features=stages+probs")


# ----------------------------------------------------------------------------------------------- truth
class Truth:
    """Ground truth of query trees over one collection (labels + catalog paths, in the store's row order)."""

    def __init__(self, labels, relpaths: list[str]):
        self.labels, self.relpaths = labels, relpaths
        self._memo: dict[str, np.ndarray] = {}

    def concept(self, text: str) -> np.ndarray:
        from t2c.data.world.generator import concept_truth

        if text not in self._memo:
            self._memo[text] = concept_truth(self.labels, text)
        return self._memo[text]

    def filter(self, f) -> np.ndarray:
        if f.column != "path" or f.op != ":":
            raise ValueError(f"the bench only draws path globs, got {f}")
        return np.array([fnmatch.fnmatchcase(p, str(f.value)) for p in self.relpaths])

    def query(self, q: str) -> np.ndarray:
        from t2c.query.engine import evaluate_tree
        from t2c.query.parse import parse

        return evaluate_tree(parse(q), lambda c: self.concept(c.text), self.filter, len(self.relpaths))


# ------------------------------------------------------------------------------------------- families
def _pair(rng, colors, shapes) -> tuple[str, str]:
    return str(rng.choice(colors)), str(rng.choice(shapes))


def draw_queries(rng, truth: Truth, per_family: int, min_true: int, objects: list[list[dict]]) -> dict:
    """``per_family`` random queries per family (see the module docstring), deterministic for ``rng``."""
    from t2c.data.world import vocab

    colors, shapes = list(vocab.COLORS), list(vocab.SHAPES)
    singles = colors + shapes + list(vocab.SIZES) + [f"{b} background" for b in vocab.BACKGROUNDS]

    def pair_q():
        return '"%s %s"' % _pair(rng, colors, shapes)

    def pair_not():
        c, s = _pair(rng, colors, shapes)
        c2 = rng.choice([x for x in colors if x != c])
        s2 = rng.choice([x for x in shapes if x != s])
        return f'"{c} {s}" AND NOT {c2} AND NOT {s2}'

    def pairs_of_an_image(k: int):  # k distinct pairs of one image (so the conjunction is true somewhere)
        many = [o for o in objects if len({(x["color"], x["shape"]) for x in o}) >= k]
        objs = many[int(rng.integers(len(many)))]
        ps = list(dict.fromkeys(f'"{o["color"]} {o["shape"]}"' for o in objs))
        return " AND ".join(str(p) for p in rng.choice(ps, k, replace=False))

    def two_pairs():
        if rng.random() < 0.5:
            return pairs_of_an_image(2)
        (c1, s1), (c2, s2) = _pair(rng, colors, shapes), _pair(rng, colors, shapes)
        return None if (c1, s1) == (c2, s2) else f'"{c1} {s1}" AND "{c2} {s2}"'

    def or_group():
        if rng.random() < 0.5:
            c1, c2 = rng.choice(colors, 2, replace=False)
            return f"({c1} OR {c2}) AND {rng.choice(shapes)}"
        (c1, s1), (c2, s2) = _pair(rng, colors, shapes), _pair(rng, colors, shapes)
        return None if (c1, s1) == (c2, s2) else f'"{c1} {s1}" OR "{c2} {s2}"'

    def with_filter():
        d1, d2 = rng.choice(10, 2, replace=False)
        glob = f'path:"*{d1}.png"' if rng.random() < 0.5 else f'(path:"*{d1}.png" OR path:"*{d2}.png")'
        concept = rng.choice(singles) if rng.random() < 0.4 else pair_q()
        concept = f'"{concept}"' if " " in concept and not concept.startswith('"') else concept
        return f"{concept} AND {glob}" if rng.random() < 0.7 else f"{concept} AND NOT {glob}"

    def rare():
        return pairs_of_an_image(3 if rng.random() < 0.5 else 2)

    makers = {"single": lambda: _single(rng, singles),
              "pair": pair_q, "pair_not": pair_not, "two_pairs": two_pairs, "or_group": or_group,
              "filters": with_filter, "rare": rare}
    out = {}
    for fam in FAMILIES:
        qs, tries = [], 0
        lo, hi = (1, 5) if fam == "rare" else (min_true, None)
        while len(qs) < per_family and tries < 400 * per_family:
            tries += 1
            q = makers[fam]()
            if q is None or q in qs:
                continue
            t = int(truth.query(q).sum())
            if t >= lo and (hi is None or t <= hi):
                qs.append(q)
        out[fam] = qs
    return out


def _single(rng, singles) -> str:
    s = str(rng.choice(singles))
    return f'"{s}"' if " " in s else s


def binding_rules(eng) -> dict:
    """How a store's colour-shape pairs are judged: pairs per binding rule, and the quantiles (min, 10%, median,
    max) of the agreement between each pair's own threshold and the rule (``binding.rule_agreement``)."""
    from t2c.data.world import vocab
    from t2c.query.calibrate import thresholds_for

    pairs = [f"{c} {s}" for c in vocab.COLORS for s in vocab.SHAPES]
    cals = thresholds_for(eng.snapshot, pairs, bank=eng.bank, binding=eng.binding)
    counts: dict[str, int] = {}
    for c in cals.values():
        rule = (c.params.get("binding") or {}).get("rule", "threshold")
        counts[rule] = counts.get(rule, 0) + 1
    agree = np.sort([c.params["agreement"] for c in cals.values() if c.params.get("agreement") is not None])
    q = [round(float(np.quantile(agree, p)), 3) for p in (0.0, 0.1, 0.5, 1.0)] if len(agree) else None
    return {"rules": counts, "agreement_min_p10_median_max": q}


# --------------------------------------------------------------------------------------------- scoring
def prf(pred: np.ndarray, truth: np.ndarray) -> tuple[float, float, float]:
    """(precision, recall, F1) of boolean arrays; an empty prediction of an empty truth is perfect."""
    tp, npred, ntrue = int((pred & truth).sum()), int(pred.sum()), int(truth.sum())
    p = tp / npred if npred else (1.0 if not ntrue else 0.0)
    r = tp / ntrue if ntrue else 1.0
    f = 2 * tp / (npred + ntrue) if npred + ntrue else 1.0
    return p, r, f


def label_chosen(eng, truth: Truth, texts: list[str]) -> dict:
    """Per concept, the best-F1 threshold on its cosine scores, chosen with the labels (the ceiling)."""
    from t2c.query.calibrate import concept_scores

    S = concept_scores(eng.snapshot, eng.bank.vectors(texts))
    out = {}
    for j, t in enumerate(texts):
        x, y = S[:, j], truth.concept(t)
        qs = np.unique(np.quantile(x, np.linspace(0.0, 0.9995, 500)))
        f1s = [prf(x >= q, y)[2] for q in qs]
        out[t] = (S[:, j], float(qs[int(np.argmax(f1s))]))
    return out


def run_store(eng, truth: Truth, queries: dict) -> dict:
    """Per-family mean P / R / F1 of the engine's answers and of the label-chosen ceiling on one store."""
    from t2c.query import ast as qa
    from t2c.query.engine import evaluate_tree

    ids = np.asarray(eng.snapshot.ids)
    all_q = [q for qs in queries.values() for q in qs]
    texts = sorted({c.text for q in all_q for c in qa.concepts(eng.parse_query(q))})
    best = label_chosen(eng, truth, texts)
    fam_out = {}
    for fam, qs in queries.items():
        rows = []
        for q in qs:
            t = truth.query(q)
            res = eng.search(q, k=10_000)
            pred = np.isin(ids, res.all_ids)
            ceil = evaluate_tree(eng.parse_query(q), lambda c: best[c.text][0] >= best[c.text][1], truth.filter,
                                 len(ids))
            est = res.plan.get("estimate") or {}
            e_p = est.get("precision")
            rows.append(prf(pred, t) + prf(ceil, t)[2:] + (np.nan if e_p is None else e_p, int(t.sum())))
        a = np.array(rows, np.float64) if rows else np.zeros((0, 6))
        fam_out[fam] = {"n": len(rows), "precision": a[:, 0].mean() if rows else None,
                        "recall": a[:, 1].mean() if rows else None, "f1": a[:, 2].mean() if rows else None,
                        "ceiling_f1": a[:, 3].mean() if rows else None,
                        "est_precision": np.nanmean(a[:, 4]) if rows and np.isfinite(a[:, 4]).any() else None,
                        "est_gap": (np.nanmean(np.abs(a[:, 4] - a[:, 0]))
                                    if rows and np.isfinite(a[:, 4]).any() else None),
                        "true_images_median": float(np.median(a[:, 5])) if rows else None,
                        "worst": sorted(((round(r[2], 3), q) for r, q in zip(rows, qs)))[:2]}
    return fam_out


# ------------------------------------------------------------------------------------------ the stores
def build_store(world: Path, store: Path, enc: str, aligner: str | None) -> None:
    """Index one collection with one encoder (a CLIP alone, or an encoder + a fitted aligner)."""
    from t2c.indexer.pipeline import index_folder

    if (store / "CURRENT").exists():
        return
    index_folder(world / "images", store, enc, clip=None if aligner is None else CLIP, aligner=aligner,
                 workers=0, batch_size=256)


def fit_aligners(work: Path, encoders: list[str], n_fit: int, seed: int) -> dict:
    """One ridge aligner per non-CLIP encoder, fitted without labels on ``n_fit`` separate world images."""
    from t2c.data.world.generator import generate
    from t2c.indexer.encoders import make_encoder, parse_spec
    from t2c.indexer.pipeline import fit_aligner_on_folder

    out = {}
    fit_dir = work / f"fit-{seed}-{n_fit}"
    for enc in encoders:
        if make_encoder_has_text(enc):
            out[enc] = None
            continue
        path = work / f"aligner-{parse_spec(enc).identity.replace(':', '_').replace('?', '_')}-{n_fit}.safetensors"
        if not path.exists():
            if not (fit_dir / "labels.parquet").exists():
                generate(fit_dir, n_fit, seed)
            paths = sorted(str(p) for p in (fit_dir / "images").rglob("*.png"))
            al = fit_aligner_on_folder(make_encoder(enc), CLIP, paths, workers=0, progress=False)
            al.save(path)
        out[enc] = str(path)
    return out


def make_encoder_has_text(enc: str) -> bool:
    """Whether a world spec has a text tower (it is then indexed on its own, as its own CLIP)."""
    from t2c.indexer.world.models import WORLD_MODELS
    from t2c.indexer.encoders import parse_spec

    spec = parse_spec(enc)
    return spec.source == "world" and WORLD_MODELS.get(spec.name, {}).get("has_text", False)


def _summary(per_run: list[dict]) -> dict:
    """Mean over runs of each family's figures, and the overall mean over the non-rare families."""
    out = {}
    for fam in FAMILIES:
        vals = [r[fam] for r in per_run if r.get(fam, {}).get("n")]
        if not vals:
            continue
        out[fam] = {k: round(float(np.mean([v[k] for v in vals if v[k] is not None])), 4)
                    for k in ("precision", "recall", "f1", "ceiling_f1", "est_precision", "est_gap")
                    if any(v[k] is not None for v in vals)}
        out[fam]["queries"] = int(sum(v["n"] for v in vals))
    common = [f for f in FAMILIES if f != "rare" and f in out]
    out["overall"] = {k: round(float(np.mean([out[f][k] for f in common if k in out[f]])), 4)
                      for k in ("precision", "recall", "f1", "ceiling_f1", "est_gap") if any(k in out[f] for f in common)}
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=1500, help="images per collection")
    ap.add_argument("--collection-seeds", default="201,202,203")
    ap.add_argument("--query-seeds", default="1,2,3")
    ap.add_argument("--encoders", default=",".join(DEFAULT_ENCODERS),
                    help="';'-separated specs (',' also works when no spec holds one)")
    ap.add_argument("--per-family", type=int, default=8, help="queries per family per query seed")
    ap.add_argument("--min-true", type=int, default=6, help="true images a non-rare query needs")
    ap.add_argument("--fit-set", type=int, default=5000, help="separate images the aligners are fitted on")
    ap.add_argument("--work", type=Path, default=None, help="work folder (kept, reused); default temporary")
    ap.add_argument("--details", action="store_true", help="print every (collection, query seed) run")
    ap.add_argument("--no-binding", action="store_true", help="calibrated thresholds alone (no rival check)")
    ap.add_argument("--own-agreement", type=float, default=None,
                    help="binding.OWN_AGREEMENT for this run (default: the library's; above 1: the binding rule "
                         "judges every pair, as before session 16)")
    args = ap.parse_args(argv)
    import torch

    torch.set_num_threads(2)
    from t2c.query import binding

    if args.own_agreement is not None:
        binding.OWN_AGREEMENT = args.own_agreement
    work = args.work or Path(tempfile.mkdtemp(prefix="t2c-qacc-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        out = _run(args, work)
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(out, indent=1))
    return out


def _run(args, work: Path) -> dict:
    import pyarrow.parquet as pq

    from t2c.data.store import open_store
    from t2c.data.world.generator import generate
    from t2c.query import binding
    from t2c.query.engine import Engine

    sep = ";" if ";" in args.encoders else ","
    encoders = [e.strip() for e in args.encoders.split(sep) if e.strip()]
    cseeds = [int(s) for s in args.collection_seeds.split(",")]
    qseeds = [int(s) for s in args.query_seeds.split(",")]
    t0 = time.perf_counter()
    aligners = fit_aligners(work, encoders, args.fit_set, 9_000_001)
    runs: dict[str, list] = {e: [] for e in encoders}
    rules: dict[str, dict] = {}
    for cs in cseeds:
        world = work / f"world-{cs}-{args.n}"
        if not (world / "labels.parquet").exists():
            generate(world, args.n, cs)
        labels = pq.read_table(world / "labels.parquet")
        row_of = {p: i for i, p in enumerate(labels.column("path").to_pylist())}
        for enc in encoders:
            store = work / f"store-{cs}-{args.n}-{enc.replace(':', '_').replace('?', '_')}"
            build_store(world, store, enc, aligners[enc])
            eng = Engine(open_store(store, verify=False), binding=not args.no_binding)
            rel = dict(eng.snapshot.catalog().execute("SELECT id, relpath FROM images").fetchall())
            relpaths = [rel[int(i)] for i in eng.snapshot.ids]
            lab = labels.take([row_of["images/" + r] for r in relpaths])
            truth = Truth(lab, relpaths)
            rules.setdefault(enc, {})[cs] = binding_rules(eng)
            for qs in qseeds:
                rng = np.random.default_rng([cs, qs])
                queries = draw_queries(rng, truth, args.per_family, args.min_true, lab.column("objects").to_pylist())
                r = run_store(eng, truth, queries)
                runs[enc].append(dict(r, collection_seed=cs, query_seed=qs))
    out = {"n": args.n, "collection_seeds": cseeds, "query_seeds": qseeds, "per_family": args.per_family,
           "tuned_on": TUNING_SEEDS, "binding": not args.no_binding, "own_agreement": binding.OWN_AGREEMENT,
           "aligner_fit": f"{args.fit_set} separate world images, no labels",
           "results": {e: _summary(runs[e]) for e in encoders}, "binding_rules": rules, "seconds": round(time.perf_counter() - t0, 1)}
    if args.details:
        out["runs"] = runs
    return out


if __name__ == "__main__":
    main()

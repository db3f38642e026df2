"""`t2c demo`: offline, end to end on the concept world, with precision against exact ground truth."""
from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Optional

import numpy as np
import typer

DEMO_QUERIES = [
    "red AND teal background",
    "blue AND NOT yellow",
    "(green OR purple) AND striped background",
    "white AND NOT gray background AND n_objects=1",
    "circle AND n_objects=1",
    "red AND circle",
]
#: world CLIP, pairnet's pooled output (the paper's recipe; blind to backgrounds), and pairnet with its pooled
#: stages and its own pair probabilities
DEMO_ENCODERS = ("world:clip", "world:pairnet", "world:pairnet?features=stages+probs")


def store_name(spec: str) -> str:
    """A shell-safe store folder name for an encoder spec: ``store-world-pairnet-features-stages``."""
    return "store-" + re.sub(r"[^A-Za-z0-9._]+", "-", spec).strip("-")


_FILTER_OPS = {"=": np.equal, "!=": np.not_equal, "<": np.less, "<=": np.less_equal, ">": np.greater,
               ">=": np.greater_equal}


def truth_of(node, labels, catalog_rows: dict) -> np.ndarray:
    """Evaluate a query tree on ground truth: concepts from the world labels, filters from catalog rows."""
    from t2c.data.world.generator import concept_truth
    from t2c.query import ast

    class Truth(ast.Visitor):
        def visit_concept(self, n):
            return concept_truth(labels, n.text)

        def visit_not(self, n):
            return ~self.visit(n.child)

        def visit_and(self, n):
            return np.logical_and.reduce([self.visit(c) for c in n.children])

        def visit_or(self, n):
            return np.logical_or.reduce([self.visit(c) for c in n.children])

        def visit_filter(self, n):
            if n.op not in _FILTER_OPS:
                raise ValueError(f"demo truth does not evaluate filter op {n.op}")
            return _FILTER_OPS[n.op](catalog_rows[n.column], n.value)

        def visit_node(self, n):
            raise TypeError(type(n))

    return Truth().visit(node)


def run_demo(out: Path, *, n: int = 1500, seed: int = 7, encoders=DEMO_ENCODERS, fit: int = 1000,
             queries=DEMO_QUERIES, k: int = 10, echo=print) -> dict:
    """Generate a concept-world collection, index it with each encoder (non-CLIP ones aligned into
    world:clip from images alone), run multi-constraint queries and score them against exact labels."""
    import pyarrow.parquet as pq

    import t2c
    from t2c.data.world.generator import generate
    from t2c.query.parse import parse

    t0 = time.perf_counter()
    out = Path(out)
    coll = out / "collection"
    if not (coll / "labels.parquet").exists():
        echo(f"1/4 generating {n} concept-world images (seed {seed}) in {coll} ...")
        generate(coll, n, seed)
    labels = pq.read_table(coll / "labels.parquet")
    rel = labels.column("path").to_pylist()
    user = {r.removeprefix("images/"): {"background": b, "n_objects": int(c)} for r, b, c in
            zip(rel, labels.column("background").to_pylist(), labels.column("n_objects").to_pylist())}
    row_of = {r: i for i, r in enumerate(rel)}
    engines = {}
    for enc in encoders:
        store = out / store_name(enc)
        how = "CLIP itself, no aligner" if enc == "world:clip" else "no text tower: aligner fitted into world:clip"
        echo(f"2/4 indexing with {enc} ({how}) ...")
        rep = t2c.index(coll / "images", store, encoder=enc, fit_aligner=fit, clip="world:clip", columns=user)
        opened = t2c.open(store, refresh_interval=None)
        r2 = opened.info().aligner["r2_heldout"]
        echo(f"    {opened.count} images in {store} ({rep.added} added now, {rep.seconds:.1f} s)"
             + ("" if enc == "world:clip" else f", aligner held-out R² {r2:.3f}"))
        engines[enc] = (opened, r2)
    echo("3/4 queries, scored against the generator's exact labels (P = precision, R = recall):")
    results = []
    width = max(len(e) for e in encoders)
    for q in queries:
        node = parse(q)
        echo(f"  {q!r}")
        row = {"query": q, "by_encoder": {}}
        for enc, (opened, _) in engines.items():
            cat = opened.table(["id", "relpath", "n_objects"])
            ids = np.asarray(cat.column("id").to_numpy())
            lab = labels.take(np.array([row_of["images/" + r] for r in cat.column("relpath").to_pylist()]))
            truth = truth_of(node, lab, {"n_objects": np.asarray(cat.column("n_objects").to_numpy())})
            res = opened.search(q, k=len(ids))
            got = {h.id for h in res.hits}
            true_ids = set(ids[truth].tolist())
            tp = len(got & true_ids)
            prec = tp / len(got) if got else (1.0 if not true_ids else 0.0)
            recall = tp / len(true_ids) if true_ids else 1.0
            f1 = 2 * prec * recall / (prec + recall) if prec + recall else 0.0
            top = [h.id for h in res.hits[:k]]
            p_at_k = float(np.mean([i in true_ids for i in top])) if top else 0.0
            row["truth"] = len(true_ids)
            row["by_encoder"][enc] = {"matches": res.total, "precision": round(prec, 3), "recall": round(recall, 3),
                                      "f1": round(f1, 3), "precision_at_k": round(p_at_k, 3),
                                      "ms": round(res.took_ms, 1)}
            echo(f"      {enc:<{width}} {res.total:4d} matches (truth {len(true_ids)}): P {prec:.2f}  R {recall:.2f}  "
                 f"F1 {f1:.2f}  P@{k} {p_at_k:.2f}  {res.took_ms:.0f} ms")
            for w in res.warnings:
                echo(f"        note: {w}")
            if enc == encoders[0]:
                for h in res.hits[:2]:
                    cap = lab.column("caption")[int(np.nonzero(ids == h.id)[0][0])]
                    echo(f"        {h.score:+.2f}  {Path(h.path).name}: {cap}")
        results.append(row)
    for opened, _ in engines.values():
        opened.close()
    total = time.perf_counter() - t0
    last = out / store_name(encoders[-1])
    echo(f"4/4 done in {total:.0f} s. Try: t2c query {last} \"blue AND NOT yellow\" --explain")
    echo(f"    or look at it in a browser: t2c serve {last}")
    return {"seconds": round(total, 1), "aligner_r2": {e: r for e, (_, r) in engines.items()}, "queries": results}


def demo(
    out: Path = typer.Option(Path("demo_out"), "--out", help="Folder for the demo collection and store."),
    n: int = typer.Option(1500, "--n", min=50, help="Images to generate."),
    seed: int = typer.Option(7, "--seed"),
    encoder: list[str] = typer.Option(list(DEMO_ENCODERS), "--encoder", help="Encoders to compare (repeatable)."),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Run the offline end-to-end demo on the concept world (generate, align, index, query, score)."""
    res = run_demo(out, n=n, seed=seed, encoders=tuple(encoder), fit=min(1000, n),
                   echo=(lambda *_: None) if as_json else typer.echo)
    if as_json:
        typer.echo(json.dumps(res, indent=2))


def register(app: typer.Typer) -> None:
    """Add `t2c demo`."""
    app.command("demo")(demo)

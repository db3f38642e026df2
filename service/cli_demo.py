"""`t2c demo`: offline, end to end on the concept world, with precision against exact ground truth."""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Optional

import numpy as np
import typer

DEMO_QUERIES = [
    "red AND circle",
    '"blue square" AND NOT red',
    "green AND (triangle OR star) AND NOT circle",
    "yellow AND NOT (square OR triangle)",
    "large purple AND n_objects=1",
]


def truth_of(node, labels, catalog_rows: dict) -> np.ndarray:
    """Evaluate a query tree on ground truth: concepts from the world labels, filters from catalog rows."""
    from data.world.generator import concept_truth
    from query import ast

    if isinstance(node, ast.Concept):
        return concept_truth(labels, node.text)
    if isinstance(node, ast.Not):
        return ~truth_of(node.child, labels, catalog_rows)
    if isinstance(node, ast.And):
        return np.logical_and.reduce([truth_of(c, labels, catalog_rows) for c in node.children])
    if isinstance(node, ast.Or):
        return np.logical_or.reduce([truth_of(c, labels, catalog_rows) for c in node.children])
    if isinstance(node, ast.Filter):
        col = catalog_rows[node.column]
        ops = {"=": np.equal, "!=": np.not_equal, "<": np.less, "<=": np.less_equal, ">": np.greater,
               ">=": np.greater_equal}
        if node.op not in ops:
            raise ValueError(f"demo truth does not evaluate filter op {node.op}")
        return ops[node.op](col, node.value)
    raise TypeError(type(node))


def run_demo(out: Path, *, n: int = 1500, seed: int = 7, encoder: str = "world:pairnet", fit: int = 1000,
             queries=DEMO_QUERIES, k: int = 10, echo=print) -> dict:
    """Generate a concept-world collection, align a non-CLIP encoder, index, query, score against truth."""
    import pyarrow.parquet as pq

    from data.world.generator import generate
    from indexer.pipeline import index_folder
    from query.engine import Engine
    from query.parse import parse

    t0 = time.perf_counter()
    out = Path(out)
    coll = out / "collection"
    store = out / "store"
    if not (coll / "labels.parquet").exists():
        echo(f"1/4 generating {n} concept-world images (seed {seed}) in {coll} ...")
        generate(coll, n, seed)
    labels = pq.read_table(coll / "labels.parquet")
    rel = labels.column("path").to_pylist()
    user = {r: {"background": b, "n_objects": int(c)} for r, b, c in
            zip(rel, labels.column("background").to_pylist(), labels.column("n_objects").to_pylist())}
    echo(f"2/4 indexing with {encoder} (no text tower), aligner fitted on {fit} images into world:clip ...")
    rep = index_folder(coll / "images", store, encoder, fit_aligner=fit, clip="world:clip",
                       user_columns={r.removeprefix("images/"): v for r, v in user.items()})
    echo(f"    {rep.added} images indexed, aligner held-out R² {rep.aligner_r2:.3f}, {rep.seconds:.1f} s")
    engine = Engine.for_store(store)
    snap = engine.snapshot
    cur = snap.catalog()
    cat = cur.execute("SELECT id, relpath, n_objects FROM images ORDER BY id").fetchall()
    row_of = {r: i for i, r in enumerate(rel)}
    order = np.array([row_of["images/" + c[1]] for c in cat])
    ids = np.array([c[0] for c in cat])
    lab = labels.take(order)
    catalog_rows = {"n_objects": np.array([c[2] for c in cat])}
    echo("3/4 queries (precision against the generator's exact labels):")
    results = []
    for q in queries:
        node = parse(q)
        truth = truth_of(node, lab, catalog_rows)
        res = engine.search(q, k=max(k, 1), explain=False)
        full = engine.search(q, k=len(ids))
        got = {h.id for h in full.hits}
        true_ids = set(ids[truth].tolist())
        tp = len(got & true_ids)
        prec = tp / len(got) if got else (1.0 if not true_ids else 0.0)
        recall = tp / len(true_ids) if true_ids else 1.0
        f1 = 2 * prec * recall / (prec + recall) if prec + recall else 0.0
        topk = [h.id for h in res.hits[:k]]
        p_at_k = float(np.mean([i in true_ids for i in topk])) if topk else float("nan")
        results.append({"query": q, "matches": full.total, "truth": len(true_ids), "precision_at_k": p_at_k,
                        "precision": round(prec, 3), "recall": round(recall, 3), "f1": round(f1, 3),
                        "ms": round(res.took_ms, 1)})
        echo(f"  {q!r}")
        echo(f"      {full.total} matches (truth {len(true_ids)}): precision {prec:.2f}  recall {recall:.2f}  "
             f"F1 {f1:.2f}  precision@{k} {p_at_k:.2f}  ({res.took_ms:.0f} ms)")
        for h in res.hits[:3]:
            echo(f"      {h.score:+.3f}  {Path(h.path).name}  caption: {lab.column('caption')[int(np.nonzero(ids == h.id)[0][0])]}")
    total = time.perf_counter() - t0
    echo(f"4/4 done in {total:.0f} s. Try: t2c query {store} \"red circle AND NOT square\" --explain")
    echo(f"    or serve it: t2c serve {store}")
    return {"store": str(store), "seconds": round(total, 1), "aligner_r2": rep.aligner_r2, "queries": results}


def demo(
    out: Path = typer.Option(Path("demo_out"), "--out", help="Folder for the demo collection and store."),
    n: int = typer.Option(1500, "--n", min=50, help="Images to generate."),
    seed: int = typer.Option(7, "--seed"),
    encoder: str = typer.Option("world:pairnet", "--encoder", help="Non-CLIP world encoder to align."),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Run the offline end-to-end demo on the concept world (generate, align, index, query, score)."""
    res = run_demo(out, n=n, seed=seed, encoder=encoder, fit=min(1000, n), echo=(lambda *_: None) if as_json else typer.echo)
    if as_json:
        typer.echo(json.dumps(res, indent=2))


def register(app: typer.Typer) -> None:
    """Add `t2c demo`."""
    app.command("demo")(demo)

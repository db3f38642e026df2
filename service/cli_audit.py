"""CLI: audit (prevalence and drift), classify (zero-shot), cbm train/eval (concept bottleneck), describe."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

cbm_app = typer.Typer(help="Concept bottleneck models: sparse linear classifiers over concept scores.",
                      no_args_is_help=True)


def _echo_json(obj) -> None:
    typer.echo(json.dumps(obj, indent=2, default=str))


def _open(path: Path):
    from t2c.data.store import open_store

    return open_store(path)


def audit(
    store: Path = typer.Argument(..., help="Store directory."),
    concepts: Optional[str] = typer.Option(None, "--concepts", "-c",
                                           help='Concepts: "a,b,c" or a file with one per line.'),
    duplicates: bool = typer.Option(False, "--duplicates", help="List groups of exact and near-duplicate images."),
    vectors_only: bool = typer.Option(False, "--vectors-only",
                                      help="Duplicates: decide by vectors alone (no pixel check; for huge stores)."),
    against: Optional[Path] = typer.Option(None, "--against", help="Compare with another store (drift)."),
    html: Optional[Path] = typer.Option(None, "--html", help="Write a self-contained HTML report here."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
    top: int = typer.Option(8, "--top", min=0, help="Example images per concept."),
    method: str = typer.Option("mixture", "--method", help="Prevalence estimator: mixture or count."),
    alpha: float = typer.Option(0.05, "--alpha", min=0.0, max=1.0, help="Drift: significance after correction."),
    correction: str = typer.Option("bh", "--correction", help="Drift: bh (Benjamini-Hochberg) or holm."),
) -> None:
    """How often each concept occurs (prevalence with 95% CI), with --against which concepts shifted, or with
    --duplicates which images appear more than once."""
    import t2c

    if not duplicates and not concepts:
        raise t2c.InvalidInput("give --concepts (or --duplicates)", 'e.g. t2c audit STORE -c "red,circle"')
    with t2c.open(store, refresh_interval=None) as st:
        if duplicates:
            _emit(st.duplicates(verify=not vectors_only), html, as_json, _duplicates_lines)
            return
        if against is None:
            _emit(st.audit(concepts, top=top, method=method), html, as_json, _audit_lines)
            return
        with t2c.open(against, refresh_interval=None) as other:
            rep = st.drift(other, concepts, top=min(top, 4), alpha=alpha, correction=correction)
            _emit(rep, html, as_json, lambda d: [f"A={store} ({d['n_a']})  B={against} ({d['n_b']})  "
                                                 f"{correction} α={alpha}", *_drift_lines(d)])


def _emit(rep, html: Optional[Path], as_json: bool, lines) -> None:
    """Write a report's HTML (when asked), then print it as JSON or as ``lines(report dict)``."""
    d = rep.to_dict()
    if html:
        rep.write_html(html)
        d["html"] = str(html)
    if as_json:
        _echo_json(d)
        return
    for line in lines(d):
        typer.echo(line)
    if html:
        typer.echo(f"report: {html}", err=True)


def _audit_lines(d: dict) -> list[str]:
    return [f"{d['n']} images · {d['encoder']} → {d['clip']} · method {d['method']}"] + [
        f"{c['concept']:<28} {c['prevalence']*100:6.1f}%  [{c['ci_low']*100:5.1f}, {c['ci_high']*100:5.1f}]  "
        f"count={c['count']:<6} examples={c['examples'][:4]}" for c in d["concepts"]]


def _drift_lines(d: dict) -> list[str]:
    return [f"{c['rank']:>3}. {c['concept']:<26} {c['prevalence_a']*100:5.1f}% → {c['prevalence_b']*100:5.1f}%  "
            f"h={c['cohens_h']:+.2f}  p_adj={c['p_adj']:.2g} {'*' if c['significant'] else ' '}" for c in d["concepts"]]


def _duplicates_lines(d: dict) -> list[str]:
    return [f"{d['n']} images · {d['n_groups']} groups of duplicates ({d['n_duplicates']} extra copies) · "
            f"candidate threshold {d['threshold']:.4f} ({d['method']}) · {d['candidate_pairs']} candidate pairs"] + [
        f"{j:>4}. {g['kind']:<5} ≥{g['min_similarity']:.3f}  " + "  ".join(g["paths"])
        for j, g in enumerate(d["groups"], 1)]


def classify(
    store: Path = typer.Argument(..., help="Store directory."),
    labels: str = typer.Option(..., "--labels", "-l", help='Labels: "a,b,c" or a file with one per line.'),
    truth: Optional[str] = typer.Option(None, "--truth", help="Catalog column with the true label."),
    name: Optional[str] = typer.Option(None, "--name", help="Name of the predictions file (default: hash)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Zero-shot classify every image; predictions go to STORE/annotations/classify-<name>.parquet."""
    import t2c

    with t2c.open(store, refresh_interval=None) as st:
        out = st.classify(labels, truth=truth, name=name, write=True).to_dict()
    if as_json:
        _echo_json(out)
        return
    typer.echo(f"{out['n']} images → {out['annotations']}")
    for l, c in out["counts"].items():
        typer.echo(f"  {l:<28} {c}")
    if truth is not None:
        acc = out.get("accuracy")
        typer.echo(f"accuracy vs {truth}: {'n/a' if acc is None else f'{acc*100:.1f}%'} "
                   f"({out['n_scored']} with a known label)")
        for c in out["top_confusions"][:5]:
            typer.echo(f"  {c['truth']} → {c['predicted']}: {c['count']}")


@cbm_app.command("train")
def cbm_train(
    store: Path = typer.Argument(..., help="Labelled store directory."),
    concepts: str = typer.Option(..., "--concepts", "-c", help='Concepts: "a,b,c" or a file with one per line.'),
    labels_column: str = typer.Option(..., "--labels-column", help="Catalog column with each image's class."),
    out: Path = typer.Option(..., "--out", help="Output .safetensors file."),
    l1: Optional[float] = typer.Option(None, "--l1", min=0.0, help="L1 strength (default: chosen on validation)."),
    test_frac: float = typer.Option(0.3, "--test-frac", min=0.05, max=0.9),
    seed: int = typer.Option(0, "--seed"),
    no_probe: bool = typer.Option(False, "--no-probe", help="Skip the raw-feature linear probe."),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Train a sparse concept bottleneck; report held-out accuracy beside a linear probe on raw features."""
    from t2c import InvalidInput
    from t2c.query.cbm import train_cbm

    if out.suffix != ".safetensors":
        raise InvalidInput(f"--out {str(out)!r} must end in .safetensors")
    model, rep = train_cbm(_open(store), concepts, labels_column, l1=l1, test_frac=test_frac, seed=seed,
                           probe=not no_probe)
    model.save(out)
    rep["out"] = str(out)
    if as_json:
        _echo_json(rep)
        return
    probe = rep.get("probe_accuracy")
    typer.echo(f"concept bottleneck: {rep['cbm_accuracy']*100:.1f}%  linear probe: "
               f"{'-' if probe is None else f'{probe*100:.1f}%'}  (test n={rep['n_test']}, l1={rep['l1']:g}, "
               f"{rep['sparsity']*100:.0f}% weights zero) → {out}")
    for cls, tops in rep["top_concepts"].items():
        typer.echo(f"  {cls:<20} " + ", ".join(f"{t['concept']} ({t['weight']:+.2f})" for t in tops))


@cbm_app.command("eval")
def cbm_eval(
    store: Path = typer.Argument(..., help="Labelled store directory."),
    model: Path = typer.Option(..., "--model", help="A .safetensors file from `t2c cbm train`."),
    labels_column: Optional[str] = typer.Option(None, "--labels-column", help="Default: the training column."),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Accuracy of a trained concept bottleneck on a labelled store, and each class's top concepts."""
    from t2c.query.cbm import ConceptBottleneck, evaluate_cbm

    rep = evaluate_cbm(_open(store), ConceptBottleneck.load(model), labels_column)
    if as_json:
        _echo_json(rep)
        return
    acc = rep["accuracy"]
    typer.echo(f"accuracy: {'n/a' if acc is None else f'{acc*100:.1f}%'} on {rep['n_known_classes']} images")
    for cls, tops in rep["top_concepts"].items():
        typer.echo(f"  {cls:<20} " + ", ".join(f"{t['concept']} ({t['weight']:+.2f})" for t in tops))


def describe_image(
    store: Path = typer.Argument(..., help="Store directory."),
    image_id: int = typer.Argument(..., help="Catalog image id."),
    decoder: Optional[Path] = typer.Option(None, "--decoder", help="Caption decoder file (default by CLIP)."),
    max_len: int = typer.Option(30, "--max-len", min=1, help="Most tokens to generate."),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Caption an image from its aligned vector (world:clip stores use the shipped world decoder)."""
    import t2c

    with t2c.open(store, refresh_interval=None) as st:
        out = st.describe(image_id, decoder=decoder, max_len=max_len)
    if as_json:
        _echo_json(out.to_dict())
    else:
        typer.echo(out.caption)


def describe_train(
    out: Optional[Path] = typer.Option(None, "--out", help="Output file (default: the shipped world decoder)."),
    n: int = typer.Option(16000, "--n", min=2, help="Training images."),
    steps: int = typer.Option(3000, "--steps", min=1),
    seed: int = typer.Option(0, "--seed"),
    threads: int = typer.Option(2, "--threads", min=1),
    clip_weights: Optional[str] = typer.Option(None, "--clip-weights", help="world:clip weights (default shipped)."),
) -> None:
    """Train the world caption decoder on world:clip image embeddings of generated images (deterministic)."""
    from t2c.indexer.world.decoder import DecoderConfig, train_decoder

    cfg = DecoderConfig(n=n, steps=steps, seed=seed, clip_weights=clip_weights)
    _, rep = train_decoder(cfg, out=str(out) if out else "shipped", threads=threads,
                           log=lambda s: typer.echo(s, err=True))
    _echo_json(rep)


def register(app: typer.Typer) -> None:
    """Add audit, classify, cbm (train/eval), describe and describe-train to the t2c app."""
    app.command("audit")(audit)
    app.command("classify")(classify)
    app.add_typer(cbm_app, name="cbm")
    app.command("describe")(describe_image)
    app.command("describe-train")(describe_train)

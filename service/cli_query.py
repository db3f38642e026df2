"""CLI: `t2c query STORE "QUERY"` — ranked, calibrated, explainable concept search."""
from __future__ import annotations

import json
from pathlib import Path

import typer


def query(
    store: Path = typer.Argument(..., help="Store directory (built by `t2c index`)."),
    text: str = typer.Argument(None, metavar="[QUERY]",
                               help='Query, e.g. \'red circle AND NOT (square OR triangle) AND width>=32\'.'),
    image: Path = typer.Option(None, "--image", help="Example image file: shorthand for like:\"FILE\" (AND-ed "
                               "with QUERY when both are given)."),
    k: int = typer.Option(20, "-k", "--k", min=1, max=10_000, help="Hits to show."),
    offset: int = typer.Option(0, "--offset", min=0, help="Hits to skip (pagination)."),
    as_json: bool = typer.Option(False, "--json", help="Print a JSON list of hits (id, path, score[, explanation])."),
    explain: bool = typer.Option(False, "--explain", help="Show per-concept score, threshold and pass/fail."),
    no_verify: bool = typer.Option(False, "--no-verify", help="Skip checksum verification when opening the store."),
) -> None:
    """Search a store with concept constraints (AND / OR / NOT, weights, thresholds, metadata filters).

    Example: t2c query photos.t2c 'red circle AND NOT square' -k 5 --explain
    """
    import t2c

    if not text and image is None:
        raise t2c.InvalidInput("give a QUERY, an --image FILE, or both", "e.g. t2c query STORE 'red circle'")
    like = Path(image).expanduser().resolve() if image is not None else None
    with t2c.open(store, verify=not no_verify, refresh_interval=None) as st:
        res = st.search(text or None, like=like, k=k, offset=offset, explain=explain)
    if as_json:  # with --explain: the whole answer (total, estimate, plan, hits); else the list of hits
        out = res.to_dict() if explain else [h.to_dict() for h in res]
        typer.echo(json.dumps(out, indent=2, default=str))
        return
    shown = f"{offset + 1}-{offset + len(res.hits)}" if res.hits else "none"
    typer.echo(f"{res.total} matching images (showing {shown}) in {res.took_ms:.1f} ms")
    if explain:
        typer.echo(_estimate_line(res.estimate))
        if res.plan.get("centred_on"):
            typer.echo(f"scores: cosine less the image's mean cosine to {res.plan['centred_on']} reference words "
                       "(the CLIP model has no cut of its own, so its scores are centred)")
        for j in res.plan.get("joint_readings", ()):
            typer.echo(f"one reading: {' AND '.join(repr(c) for c in j['concepts'])} must hold together in one "
                       f"reading of an image's words ({j['dropped']} images where each held alone dropped)")
    for w in res.warnings:
        typer.secho(f"note: {w}", fg=typer.colors.YELLOW, err=True)
    for h in res:
        typer.echo(f"{h.score:9.3f}  {h.id:>8}  {h.path}")
        for e in h.explanation or ():
            mark = "pass" if e["passed"] != e["negated"] else "FAIL"
            neg = "NOT " if e["negated"] else ""
            typer.echo(f"{'':21}{mark}  {neg}{e['concept']!r}: score {e['score']:.3f} "
                       f"{'>=' if e['passed'] else '<'} threshold {e['threshold']:.3f} ({e['method']}"
                       + (f", binding rule {e['rule']})" if e.get("rule") else ")"))


def _fmt(v) -> str:
    return "?" if v is None else f"{v:.2f}"


def _estimate_line(est: dict | None) -> str:
    """One line: the answer's estimated precision and recall, then each concept's (no labels used)."""
    if not est:
        return "estimated precision ?, recall ? (no answer to estimate)"
    per = "; ".join(f"{t!r} {_fmt((r or {}).get('precision'))}/{_fmt((r or {}).get('recall'))}"
                    for t, r in est.get("concepts", {}).items())
    return (f"estimated precision {_fmt(est.get('precision'))}, recall {_fmt(est.get('recall'))} "
            f"(from the calibration fits; per concept precision/recall: {per or 'none'})")


def register(app: typer.Typer) -> None:
    """Add the `query` command to the t2c app."""
    app.command("query")(query)

"""CLI: encoders, align, index, realign, info."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer


def _echo_json(obj) -> None:
    typer.echo(json.dumps(obj, indent=2, default=str))


def encoders(as_json: bool = typer.Option(False, "--json", help="Print JSON.")) -> None:
    """List registered encoder sources and the bundled world models (dims, text tower)."""
    import t2c

    found = t2c.encoders()
    if as_json:
        _echo_json([e.to_dict() for e in found])
        return
    for e in found:
        dim = "-" if e.dim is None else str(e.dim)
        text = "head" if e.vocabulary else {True: "text", False: "image", None: "any"}[e.has_text]
        typer.echo(f"{e.spec:<28} dim={dim:<6} {text:<6} {e.description}")
    typer.echo("\noptions: ?weights=random|PATH&device=cpu|cuda&batch_size=N&threads=N&features=PART[+PART]")
    for k, v in found.options.items():
        typer.echo(f"  features={k:<8} {v}")


def align(
    encoder: str = typer.Option(..., "--encoder", "-e", help="Encoder spec to align (e.g. timm:resnet50)."),
    clip: Optional[str] = typer.Option(None, "--clip", "-c", help="CLIP spec to align into (default by encoder)."),
    images: Path = typer.Option(..., "--images", help="Folder of images (no labels needed)."),
    max_images: int = typer.Option(5000, "--max-images", min=10, help="Images to use (spread over the folder)."),
    out: Path = typer.Option(..., "--out", help="Output .safetensors file."),
    batch_size: int = typer.Option(32, "--batch-size", min=1),
    device: Optional[str] = typer.Option(None, "--device"),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Fit a linear aligner from an encoder into CLIP image space (closed-form ridge, held-out R²)."""
    import numpy as np

    import t2c

    if out.suffix != ".safetensors":
        raise t2c.InvalidInput(f"--out {str(out)!r} must end in .safetensors")
    al = t2c.align(images, encoder=encoder, clip=clip, max_images=max_images, out=out, batch_size=batch_size,
                   device=device, progress=not as_json)
    r = al.r2_per_dim
    summary = {"out": str(out), "encoder": al.meta["encoder"], "clip": al.meta["clip"],
               "n_train": al.meta["n_train"], "n_heldout": al.meta["n_heldout"],
               "r2_heldout": round(al.r2_heldout, 4), "alpha": al.meta["alpha"],
               "r2_per_dim": {"min": float(np.min(r)), "median": float(np.median(r)), "max": float(np.max(r))}}
    if as_json:
        _echo_json(summary)
    else:
        typer.echo(f"aligner {al.meta['encoder']} -> {al.meta['clip']}: held-out R² {al.r2_heldout:.3f} "
                   f"on {al.meta['n_heldout']} images (train {al.meta['n_train']}, ridge alpha {al.meta['alpha']:g})")
        typer.echo(f"per-dimension R²: min {np.min(r):.3f}  median {np.median(r):.3f}  max {np.max(r):.3f}")
        typer.echo(f"saved {out}")


def index(
    folder: Path = typer.Argument(..., help="Folder of images (walked recursively), or a .parquet list (--engine ray)."),
    store: Path = typer.Option(..., "--store", "-s", help="Store directory (created if missing)."),
    encoder: str = typer.Option(..., "--encoder", "-e", help="Encoder spec, e.g. world:pairnet or timm:resnet50."),
    aligner: Optional[Path] = typer.Option(None, "--aligner", help="Aligner file from `t2c align`."),
    fit_aligner: Optional[int] = typer.Option(None, "--fit-aligner", min=10, help="Fit an aligner on N images."),
    clip: Optional[str] = typer.Option(None, "--clip", help="CLIP spec to align into."),
    follow_symlinks: bool = typer.Option(False, "--follow-symlinks", help="Follow symlinks (loop-safe)."),
    workers: Optional[int] = typer.Option(None, "--workers", min=0, help="Decode processes (default: one per core; 0: in-process)."),
    batch_size: int = typer.Option(32, "--batch-size", min=1),
    device: Optional[str] = typer.Option(None, "--device", help="cpu or cuda (default: cuda when present)."),
    threads: Optional[int] = typer.Option(None, "--threads", min=1, help="torch CPU threads."),
    max_pixels: int = typer.Option(89_478_485, "--max-pixels", min=1, help="Decompression-bomb limit."),
    memory_budget_mb: Optional[int] = typer.Option(None, "--memory-budget-mb", min=1, help="FAISS index budget."),
    part_size: int = typer.Option(256, "--part-size", min=1, hidden=True, help="Images per resumable part."),
    engine: str = typer.Option("local", "--engine", help="local, or ray (Ray Data stages; folder or parquet list)."),
    address: Optional[str] = typer.Option(None, "--address", help="Ray cluster address (default: start locally)."),
    column: str = typer.Option("path", "--column", help="Path column of a parquet list (--engine ray)."),
    actors: int = typer.Option(1, "--actors", min=1, help="Encoder actors (--engine ray)."),
    gpus_per_actor: float = typer.Option(0.0, "--gpus-per-actor", min=0.0, help="GPUs per encoder actor (--engine ray)."),
    as_json: bool = typer.Option(False, "--json"),
    quiet: bool = typer.Option(False, "--quiet", "-q"),
) -> None:
    """Index a folder into a store: resumable after a kill, incremental on rerun."""
    import t2c
    from t2c.indexer.feed import steady_allocator

    steady_allocator()  # this process exists to index: freed activations are kept for the next batch

    rep = t2c.index(folder, store, encoder=encoder, aligner=aligner, fit_aligner=fit_aligner, clip=clip,
                    progress=not (quiet or as_json), engine=engine, follow_symlinks=follow_symlinks, workers=workers,
                    batch_size=batch_size, device=device, threads=threads, max_pixels=max_pixels,
                    memory_budget_mb=memory_budget_mb, part_size=part_size, address=address, column=column,
                    actors=actors, gpus_per_actor=gpus_per_actor)
    if as_json:
        _echo_json(rep.to_dict())
        return
    typer.echo(f"{rep.store}: +{rep.added} added, {rep.updated} updated, -{rep.removed} removed, "
               f"{rep.unchanged} unchanged, {rep.errors} errors ({rep.seconds:.1f} s, "
               f"{rep.images_per_second:.1f} img/s)" + (f", resumed {rep.resumed_parts} parts" if rep.resumed_parts else ""))
    if rep.aligner_r2 is not None:
        typer.echo(f"aligner held-out R² {rep.aligner_r2:.3f}")
    for reason, n in sorted(rep.error_reasons.items()):
        typer.echo(f"  skipped {n} file(s): {reason}  (see `t2c info {rep.store} --errors`)")


def realign(
    store: Path = typer.Argument(..., help="Store directory."),
    aligner: Path = typer.Option(..., "--aligner", help="New aligner file."),
) -> None:
    """Re-project a store's kept raw features with a new aligner, without re-encoding."""
    from t2c.indexer.pipeline import realign_store

    snap = realign_store(store, aligner)
    typer.echo(f"{store}: re-projected {snap.count} images into {snap.clip} (snapshot {snap.name})")


def info(
    store: Path = typer.Argument(..., help="Store directory."),
    errors: bool = typer.Option(False, "--errors", help="List files that could not be indexed."),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Show a store's manifest summary (and its errors)."""
    import t2c

    with t2c.open(store, refresh_interval=None) as st:
        i = st.info(errors=errors)
    out = {"snapshot": i.snapshot, "created": i.created, "encoder": i.encoder, "clip": i.clip, "dim": i.dim,
           "feature_dim": i.feature_dim, "counts": i.counts, "index": i.index, "aligner": i.aligner, "roots": i.roots}
    if errors:
        out["errors"] = i.unreadable
    if as_json:
        _echo_json(out)
        return
    for k, v in out.items():
        if k == "errors":
            typer.echo("errors:")
            for e in v:
                typer.echo(f"  {e['reason']:<16} {e['path']}  {e['message'] or ''}")
        else:
            typer.echo(f"{k}: {json.dumps(v, default=str)}")


def register(app: typer.Typer) -> None:
    """Add this area's commands to the `t2c` app."""
    app.command("encoders")(encoders)
    app.command("align")(align)
    app.command("index")(index)
    app.command("realign")(realign)
    app.command("info")(info)

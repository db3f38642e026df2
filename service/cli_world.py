"""`t2c world ...`: generate concept-world collections and retrain the bundled world models."""
from __future__ import annotations

import json
from typing import List, Optional

import typer

world_app = typer.Typer(help="The concept world: procedural images with exact labels, and its models.",
                        no_args_is_help=True)


@world_app.command("generate")
def generate_cmd(
    out_dir: str = typer.Argument(..., help="Directory to write images/, labels.parquet and world.json into."),
    more_weights: Optional[List[str]] = typer.Argument(
        None, metavar="[KEY=W]...", help="More sampling weights, so `--weights color.red=3 background.teal=0` works."),
    n: int = typer.Option(1000, "--n", help="Number of images."),
    seed: int = typer.Option(0, "--seed", help="Collection seed (image i depends only on seed and i)."),
    size: int = typer.Option(64, "--size", help="Image side in pixels."),
    weights: Optional[List[str]] = typer.Option(
        None, "--weights", help="Sampling weight CATEGORY.VALUE=W (repeatable), e.g. color.red=3 background.teal=0; "
        "categories: color, shape, size, background, count."),
    objects: Optional[int] = typer.Option(None, "--objects", help="Force 1, 2 or 3 objects per image."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bar."),
) -> None:
    """Write N procedurally drawn images with exact labels (deterministic by seed)."""
    from t2c.data.world.generator import generate

    path = generate(out_dir, n=n, seed=seed, size=size, weights=_split((weights or []) + (more_weights or [])),
                    n_objects=objects, progress=not quiet)
    typer.echo(json.dumps({"labels": str(path), "n": n, "seed": seed, "size": size}))


def _split(weights: Optional[List[str]]) -> Optional[List[str]]:
    """Accept both `--weights a=1 --weights b=2` and `--weights "a=1 b=2"` / `a=1,b=2`."""
    if not weights:
        return None
    return [w for entry in weights for w in entry.replace(",", " ").split() if w]


@world_app.command("train")
def train_cmd(
    out: Optional[str] = typer.Option(None, "--out", help="Output folder (default: the shipped weights folder)."),
    models: Optional[List[str]] = typer.Option(None, "--model", help="Train only these (repeatable): clip, clip-plain, pairnet, autoenc."),
    threads: int = typer.Option(2, "--threads", help="CPU threads (weights are deterministic per thread count)."),
    seed: int = typer.Option(0, "--seed", help="Data and initialisation seed."),
    n: int = typer.Option(20000, "--n", help="Training images."),
) -> None:
    """Retrain the world models from scratch (about an hour on 2 CPU cores) and save safetensors."""
    from t2c.indexer.world.models import WORLD_MODELS
    from t2c.indexer.world.train import TrainConfig, train_all

    cfg = TrainConfig(n=n, seed=seed)
    report = train_all(out, config=cfg, models=tuple(models or WORLD_MODELS), threads=threads,
                       log=lambda s: typer.echo(s, err=True))
    typer.echo(json.dumps({k: report[k] for k in ("total_seconds", "models")}, indent=1))


@world_app.command("models")
def models_cmd() -> None:
    """List the world models, their dimension, and whether they have a text tower."""
    from t2c.indexer.world.models import WORLD_MODELS

    typer.echo(json.dumps(WORLD_MODELS, indent=1))


def register(app: typer.Typer) -> None:
    """Add the `world` command group to the t2c app."""
    app.add_typer(world_app, name="world")

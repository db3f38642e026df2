"""Build a labelled training subset from query results: paths plus labels in a pandas frame.

Run:  python examples/training_subset.py [WORK_DIR]      (about a minute on 2 CPU cores)

Two ways to label images without annotating them:
  1. positives and negatives from two searches ("a red circle" vs images with neither red nor circles);
  2. a zero-shot label for every image from ``store.classify`` (here: the single object's shape).
The concept world's exact labels then say how clean each subset is. Colour-shape pairs ("a red circle" among
several objects) are the hardest concepts for every model, so expect some wrong positives there; single
concepts ("red", "circle") and the zero-shot shape labels come out clean.
"""
from __future__ import annotations

from pathlib import Path

import pandas as pd

import t2c
from _world import generate_world, run

SHAPES = ["circle", "square", "triangle", "diamond", "cross", "star"]


def red_circle_subset(store: t2c.Store) -> pd.DataFrame:
    """Positives: images with a red circle. Negatives: as many images with no red and no circle."""
    pos = store.search('"red circle"', k=2000).to_pandas().assign(label=1)
    neg = store.search("NOT red AND NOT circle", k=max(len(pos), 1)).to_pandas().assign(label=0)
    return pd.concat([pos, neg], ignore_index=True)[["path", "label", "score"]]


def main(work: Path) -> dict:
    labels = generate_world(work / "world", 400, 3)
    t2c.index(work / "world" / "images", work / "world.t2c", encoder="world:clip")
    single = generate_world(work / "single", 300, 4, "--objects", "1")
    t2c.index(work / "single" / "images", work / "single.t2c", encoder="world:clip")

    with t2c.open(work / "world.t2c") as store:
        subset = red_circle_subset(store)
    subset.to_csv(work / "red_circle.csv", index=False)
    truth = labels.set_index("path")["objects"].map(
        lambda objs: any(o["color"] == "red" and o["shape"] == "circle" for o in objs))
    subset["true"] = subset["path"].map(truth).astype(int)
    clean = (subset["label"] == subset["true"]).mean()
    right = (subset["label"] == subset["true"]).groupby(subset["label"]).mean()
    print(f"red-circle subset: {int(subset['label'].sum())} positives ({right.get(1, 0):.0%} right), "
          f"{int((subset['label'] == 0).sum())} negatives ({right.get(0, 0):.0%} right) -> {work / 'red_circle.csv'}")

    with t2c.open(work / "single.t2c") as store:
        shapes = store.classify(SHAPES).to_pandas()[["path", "label", "confidence"]]
    true_shape = single.set_index("path")["objects"].map(lambda objs: objs[0]["shape"])
    accuracy = (shapes["label"] == shapes["path"].map(true_shape)).mean()
    print(f"zero-shot shape labels: {len(shapes)} images, {accuracy:.1%} right")
    print(shapes.head().to_string(index=False))
    return {"subset_clean": float(clean), "shape_accuracy": float(accuracy)}


if __name__ == "__main__":
    run(main)

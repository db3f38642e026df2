"""Index a concept-world collection, search it in words and audit it; check both against the exact labels.

Run:  python examples/search_and_audit.py [WORK_DIR]      (about a minute on 2 CPU cores)

The concept world is generated (``t2c world generate``, see _world.py), so every image's objects, colours and background are
known, and the answers can be scored exactly.
"""
from __future__ import annotations

from pathlib import Path

import t2c
from _world import generate_world, run


def has(objects, color: str | None = None, shape: str | None = None) -> bool:
    """Whether one of an image's objects has this colour and/or shape."""
    return any((color is None or o["color"] == color) and (shape is None or o["shape"] == shape) for o in objects)


def main(work: Path) -> dict:
    labels = generate_world(work / "world", 400, 1).set_index("path")
    report = t2c.index(work / "world" / "images", work / "world.t2c", encoder="world:clip")
    print(f"indexed {report.added} images in {report.seconds:.1f} s")

    with t2c.open(work / "world.t2c") as store:
        # search: every image with a red object and a circle, but no square
        res = store.search("red AND circle AND NOT square", k=1000, explain=True)
        print(f"\n{res.total} images match 'red AND circle AND NOT square'; the best three:")
        for hit in res.hits[:3]:
            print(f"  {hit.score:6.2f}  {Path(hit.path).name}  {labels.loc[hit.path, 'caption']}")
        truth = labels["objects"].map(lambda o: has(o, color="red") and has(o, shape="circle")
                                      and not has(o, shape="square"))
        found = set(res.paths)
        precision = sum(truth[p] for p in found) / max(len(found), 1)
        recall = sum(truth[p] for p in found) / max(int(truth.sum()), 1)
        print(f"  precision {precision:.2f}, recall {recall:.2f} against the labels")

        # audit: how often does each concept occur? (with a 95% confidence interval)
        audit = store.audit(["red", "circle", "teal background"])
        true_prev = {"red": labels["objects"].map(lambda o: has(o, color="red")).mean(),
                     "circle": labels["objects"].map(lambda o: has(o, shape="circle")).mean(),
                     "teal background": (labels["background"] == "teal").mean()}
        print("\nconcept             estimate  [95% CI]        true")
        for p in audit:
            print(f"  {p.concept:<17} {p.prevalence:6.1%}  [{p.ci_low:5.1%}, {p.ci_high:5.1%}]  "
                  f"{true_prev[p.concept]:6.1%}")
        frame = audit.to_pandas()  # the same rows as a DataFrame
    return {"precision": precision, "recall": recall, "audit": frame[["concept", "prevalence"]].to_dict("records")}


if __name__ == "__main__":
    run(main)

"""Compare two concept-world collections drawn with different frequencies: which concepts shifted?

Run:  python examples/drift.py [WORK_DIR]      (about a minute on 2 CPU cores)

Collection B is drawn with red objects three times as likely and no teal backgrounds. A drift audit should flag
"teal background" (25% -> 0%), "red" (about 25% -> 50%) and the other backgrounds, which take teal's place
(25% -> 33% each), and leave the shapes and the other colours alone.
"""
from __future__ import annotations

from pathlib import Path

import t2c
from _world import generate_world, run

CONCEPTS = ["red", "blue", "circle", "square", "teal background", "striped background"]


def main(work: Path) -> list[str]:
    generate_world(work / "a", 400, 1)
    generate_world(work / "b", 400, 2, "--weights", "color.red=3", "background.teal=0")
    for name in ("a", "b"):
        t2c.index(work / name / "images", work / f"{name}.t2c", encoder="world:clip")

    with t2c.open(work / "a.t2c") as a, t2c.open(work / "b.t2c") as b:
        shifts = a.drift(b, CONCEPTS)
        print("rank concept              A       B      Cohen's h  significant")
        for s in shifts:
            print(f"{s.rank:>4} {s.concept:<20} {s.prevalence_a:6.1%}  {s.prevalence_b:6.1%}  {s.cohens_h:+8.2f}"
                  f"   {'yes' if s.significant else 'no'}")
        report = shifts.write_html(work / "drift.html")
        print(f"\nHTML report: {report}")
    return [s.concept for s in shifts if s.significant]


if __name__ == "__main__":
    run(main)

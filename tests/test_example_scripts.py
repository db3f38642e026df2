"""The scripts in examples/ run as a user runs them, and say what they promise (CI runs them via `make test`)."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path


REPO = Path(__file__).resolve().parents[1]
EXAMPLES = sorted(p.name for p in (REPO / "examples").glob("*.py") if not p.name.startswith("_"))


def run_example(name: str, work: Path) -> str:
    env = dict(os.environ, T2C_CACHE_DIR="", PYTHONPATH=str(REPO))
    p = subprocess.run([sys.executable, str(REPO / "examples" / name), str(work)], cwd=work, env=env,
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "Traceback" not in p.stderr
    return p.stdout


def test_every_example_is_tested():
    assert EXAMPLES == ["drift.py", "search_and_audit.py", "training_subset.py"]


def test_search_and_audit(tmp_path):
    out = run_example("search_and_audit.py", tmp_path)
    m = re.search(r"precision ([\d.]+), recall ([\d.]+)", out)
    assert m and float(m[1]) >= 0.9 and float(m[2]) >= 0.9, out
    for concept in ("red", "circle", "teal background"):
        est, lo, hi, true = map(float, re.search(rf"{concept} +([\d.]+)%  \[ *([\d.]+)%, *([\d.]+)%\] +([\d.]+)%",
                                                 out).groups())
        assert lo - 3 <= true <= hi + 3 and abs(est - true) < 5, out


def test_drift(tmp_path):
    out = run_example("drift.py", tmp_path)
    flagged = set(re.findall(r"^ +\d+ (.+?) +[\d.]+% .* yes$", out, re.M))
    assert {"teal background", "red"} <= flagged and not flagged & {"circle", "square", "blue"}, out
    assert (tmp_path / "drift.html").read_text().startswith("<!doctype html>")


def test_training_subset(tmp_path):
    out = run_example("training_subset.py", tmp_path)
    pos, neg = map(float, re.search(r"positives \((\d+)% right\).*negatives \((\d+)% right\)", out).groups())
    assert pos >= 50 and neg >= 90, out
    assert float(re.search(r"shape labels: \d+ images, ([\d.]+)% right", out)[1]) >= 90, out
    import pandas as pd

    subset = pd.read_csv(tmp_path / "red_circle.csv")
    assert list(subset.columns) == ["path", "label", "score"] and set(subset["label"]) == {0, 1}
    assert all(Path(p).is_file() for p in subset["path"])

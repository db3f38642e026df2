"""Shared by the examples: draw a concept-world collection, and run an example in a work folder."""
from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Callable

import pandas as pd


def generate_world(folder: Path, n: int, seed: int, *options: str) -> pd.DataFrame:
    """Draw n images into folder/images with ``t2c world generate`` (``options`` such as ``--objects 1`` or
    ``--weights color.red=3``); return their exact labels, one row per image, ``path`` made absolute."""
    subprocess.run([sys.executable, "-m", "t2c", "world", "generate", str(folder), "--n", str(n), "--seed", str(seed),
                    "--quiet", *options], check=True, stdout=subprocess.DEVNULL)
    labels = pd.read_parquet(folder / "labels.parquet")
    labels["path"] = [str((folder / p).resolve()) for p in labels["path"]]
    return labels


def run(main: Callable[[Path], object]) -> None:
    """Run ``main`` in the folder named on the command line, or in a temporary folder removed afterwards."""
    if len(sys.argv) > 1:
        main(Path(sys.argv[1]))
    else:
        with tempfile.TemporaryDirectory() as tmp:
            main(Path(tmp))

"""Benchmark: zero-shot classification, concept bottleneck vs linear probe, and concept-to-text captions on
single-object concept-world collections, for world:clip and an aligned non-CLIP encoder (world:pairnet).

- classify: labels = the 6 shapes (truth column ``shape``) and the 8 colours (truth ``color``).
- cbm: concepts = 8 colours + 6 shapes + 2 sizes + 4 backgrounds; labels ``shape`` (6 classes) and ``pair``
  (colour-shape, 48 classes); held-out accuracy beside a linear probe on raw features. Target: within 3 points.
- describe: the shipped world decoder captions every image's aligned vector; a caption is right when it names
  the object's colour and shape. Target (aligned pairnet): >= 80%.

    .venv/bin/python bench/paper_uses.py [--n 2000] [--encoders world:clip,world:pairnet]

Prints one JSON object.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.audit_drift import BACKGROUNDS, COLOURS, SHAPES, SIZES, world_store  # noqa: E402


def describe_accuracy(snap, decoder_path=None) -> dict:
    from t2c.indexer.world import decoder as wd
    from t2c.data.world import vocab

    model = wd.load_decoder(decoder_path)
    rows = dict(snap.catalog().execute("SELECT id, pair FROM images").fetchall())
    want = [rows[int(i)].split() for i in snap.ids]
    caps = []
    V = np.asarray(snap.vectors)
    for s in range(0, len(V), 256):
        caps += wd.caption_vectors(model, V[s : s + 256])
    ok_c = ok_s = ok_cs = 0
    for cap, (c, s) in zip(caps, want):
        try:
            objs = vocab.parse_concept(cap)["objects"]
        except Exception:  # noqa: BLE001 - a garbled caption is wrong
            objs = []
        first = objs[0] if objs else {}
        ok_c += first.get("color") == c
        ok_s += first.get("shape") == s
        ok_cs += any(o.get("color") == c and o.get("shape") == s for o in objs)
    n = len(caps)
    return {"n": n, "color_shape": round(ok_cs / n, 4), "color": round(ok_c / n, 4), "shape": round(ok_s / n, 4),
            "examples": [{"true": " ".join(w), "caption": c} for w, c in list(zip(want, caps))[:5]]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--encoders", default="world:clip,world:pairnet")
    ap.add_argument("--decoder", default=None, help="decoder file (default: shipped)")
    args = ap.parse_args()
    import torch

    torch.set_num_threads(1)
    from t2c.query.cbm import train_cbm
    from t2c.query.classify import classify

    t0 = time.time()
    work = Path(tempfile.mkdtemp(prefix="t2c-bench-uses-"))
    out = {"bench": "paper_uses", "n": args.n, "encoders": {}}
    concepts = COLOURS + SHAPES + SIZES + BACKGROUNDS
    try:
        for enc in args.encoders.split(","):
            name = enc.replace(":", "_").replace("?", "_").replace("=", "_")
            snap, _ = world_store(work, name, args.n, 31, enc, n_objects=1, columns=True)
            r = {"aligner_r2": snap.manifest["aligner"].get("r2_heldout")}
            c1 = classify(snap, SHAPES, truth="shape", write=False)
            c2 = classify(snap, COLOURS, truth="color", write=False)
            r["classify"] = {"shape_accuracy": round(c1["accuracy"], 4), "color_accuracy": round(c2["accuracy"], 4),
                             "shape_top_confusions": c1["top_confusions"][:3]}
            r["cbm"] = {}
            for col in ("shape", "pair"):
                _, rep = train_cbm(snap, concepts, col)
                r["cbm"][col] = {"cbm_accuracy": round(rep["cbm_accuracy"], 4),
                                 "probe_accuracy": round(rep["probe_accuracy"], 4), "gap": round(rep["gap"], 4),
                                 "within_3pt": rep["gap"] <= 0.03, "l1": rep["l1"],
                                 "sparsity": round(rep["sparsity"], 3), "n_test": rep["n_test"],
                                 "top_concepts_sample": dict(list(rep["top_concepts"].items())[:3])}
            try:
                r["describe"] = describe_accuracy(snap, args.decoder)
            except Exception as e:  # noqa: BLE001 - decoder missing: report, keep the rest
                r["describe"] = {"error": str(e)}
            out["encoders"][enc] = r
        out["seconds"] = round(time.time() - t0, 1)
        print(json.dumps(out, indent=1))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

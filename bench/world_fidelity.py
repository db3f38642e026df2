"""Benchmark: how faithfully text-to-concept works in the concept world (prints JSON).

For world CLIP and each non-CLIP world encoder aligned to it by the ridge aligner (indexer.aligner), on
held-out seeds never used in training:

- ``r2_heldout``: held-out R² of the alignment (fitted on ``--n-align`` default-distribution images).
- ``zero_shot``: accuracy per attribute (color, shape, size, background) on single-object images; the
  prediction is the argmax cosine over the attribute's concept vectors ("red", "circle", "small",
  "teal background"; each the mean of normalised prompt embeddings over PROMPT_TEMPLATES).
- ``presence_f1`` / ``presence_auc``: concept presence on multi-object (1-3 objects) images against the
  labels, per concept group ("pair" = the 48 colour-shape concepts such as "red circle", "color",
  "shape", "size", "background"); macro-averaged. F1 uses a per-concept threshold chosen on the first
  half of the images and is scored on the second half; AUC needs no threshold.
- ``vs_clip``: per attribute, whether the aligned encoder matches or beats world CLIP's zero-shot
  accuracy (within ``--tie`` absolute), and ``learned`` (well above chance) vs not learned.

Images are rendered at 64 px and go through the encoder registry's own preprocessing.

    python bench/world_fidelity.py [--seed 20240] [--n-align 5000] [--n-single 2000] [--n-multi 3000]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from t2c.data.world import vocab  # noqa: E402
from t2c.data.world.generator import concept_truth, parse_weights, render, sample_scene, scene_rng  # noqa: E402
from t2c.indexer.world.train import (ATTRIBUTE_OF, attribute_concepts, concept_vectors,  # noqa: E402
                              single_object_truth)

GROUPS = {
    "pair": [f"{c} {s}" for c in vocab.COLORS for s in vocab.SHAPES],
    "color": list(vocab.COLORS),
    "shape": list(vocab.SHAPES),
    "size": list(vocab.SIZES),
    "background": [f"{b} background" for b in vocab.BACKGROUNDS],
}


def make_set(n: int, seed: int, preprocess, n_objects=None):
    """(scenes, preprocessed (N,3,S,S) batch, label rows) rendered at 64 px."""
    probs = parse_weights(None)
    scenes = [sample_scene(scene_rng(seed, i), probs, n_objects=n_objects) for i in range(n)]
    batch = np.stack([preprocess(render(s, 64)) for s in scenes])
    rows = [{"background": s.background, "objects": s.object_labels()} for s in scenes]
    return scenes, batch, rows


def auc(score: np.ndarray, truth: np.ndarray) -> float:
    """ROC AUC by ranks (ties averaged); nan when one class is absent."""
    pos, neg = truth.sum(), (~truth).sum()
    if pos == 0 or neg == 0:
        return float("nan")
    order = np.argsort(score, kind="mergesort")
    ranks = np.empty(len(score))
    s = score[order]
    i = 0
    while i < len(s):
        j = i
        while j + 1 < len(s) and s[j + 1] == s[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return float((ranks[truth].sum() - pos * (pos + 1) / 2) / (pos * neg))


def f1_at(score, truth, thr) -> float:
    pred = score >= thr
    tp = (pred & truth).sum()
    denom = pred.sum() + truth.sum()
    return float(2 * tp / denom) if denom else 1.0


def best_threshold(score, truth) -> float:
    """Threshold maximising F1 on a calibration split."""
    cands = np.unique(score)
    if len(cands) > 400:
        cands = np.quantile(score, np.linspace(0, 1, 401))
    return float(max(cands, key=lambda t: f1_at(score, truth, t)))


def presence(emb: np.ndarray, rows: list, cvs: dict) -> tuple[dict, dict]:
    """Macro F1 (threshold from the first half, scored on the second) and macro AUC per concept group."""
    half = len(rows) // 2
    f1s, aucs = {}, {}
    for group, concepts in GROUPS.items():
        fs, as_ = [], []
        for c, v in zip(concepts, cvs[group]):
            truth = concept_truth(rows, c)
            score = emb @ v
            if truth[:half].sum() == 0 or truth[half:].sum() == 0:
                continue
            fs.append(f1_at(score[half:], truth[half:], best_threshold(score[:half], truth[:half])))
            as_.append(auc(score, truth))
        f1s[group] = round(float(np.mean(fs)), 4)
        aucs[group] = round(float(np.nanmean(as_)), 4)
    return f1s, aucs


def presence_chance(rows: list) -> dict:
    """Macro F1 of calling every image positive (the floor a useless score reaches), per group."""
    half = len(rows) // 2
    out = {}
    for group, concepts in GROUPS.items():
        ps = [concept_truth(rows[half:], c).mean() for c in concepts]
        out[group] = round(float(np.mean([2 * p / (1 + p) for p in ps if p > 0])), 4)
    return out


def zero_shot(emb: np.ndarray, scenes, cvs_attr: dict) -> dict:
    """Zero-shot accuracy per attribute on single-object images."""
    return {a: round(float(((emb @ cvs_attr[a].T).argmax(1) == single_object_truth(scenes, a)).mean()), 4)
            for a in ATTRIBUTE_OF}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, default=20240)
    ap.add_argument("--n-align", type=int, default=5000)
    ap.add_argument("--n-single", type=int, default=2000)
    ap.add_argument("--n-multi", type=int, default=3000)
    ap.add_argument("--encoders", default="pairnet,pairnet?features=stages,pairnet?features=stages+probs,autoenc",
                    help="world models aligned into world:clip, with spec options (e.g. pairnet?features=stages)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tie", type=float, default=0.005, help="accuracy difference counted as a match")
    ap.add_argument("--weights-dir", default=None,
                    help="benchmark weights from `t2c world train --out DIR` instead of the shipped ones")
    args = ap.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    from t2c.indexer.aligner import fit_aligner
    from t2c.indexer.encoders import EncoderSpec, make_encoder, parse_spec

    def spec(name: str) -> str:
        s = parse_spec(f"world:{name}")
        if args.weights_dir:
            weights = Path(args.weights_dir) / f"{s.name}.safetensors"
            s = EncoderSpec(s.source, s.name, {**s.options, "weights": str(weights)})
        return str(s)

    t0 = time.time()
    clip = make_encoder(spec("clip"))
    sets = {
        "align": make_set(args.n_align, args.seed, clip.preprocess),
        "single": make_set(args.n_single, args.seed + 1, clip.preprocess, n_objects=1),
        "multi": make_set(args.n_multi, args.seed + 2, clip.preprocess),
    }
    t_render = time.time() - t0
    cvs_attr = {a: concept_vectors(clip.encode_texts, attribute_concepts(a)) for a in ATTRIBUTE_OF}
    cvs_group = {g: concept_vectors(clip.encode_texts, cs) for g, cs in GROUPS.items()}
    clip_emb = {k: clip.encode_images(v[1]) for k, v in sets.items()}

    def score(name: str, emb_single, emb_multi, r2=None) -> dict:
        f1, au = presence(emb_multi, sets["multi"][2], cvs_group)
        out = {"r2_heldout": r2, "zero_shot": zero_shot(emb_single, sets["single"][0], cvs_attr),
               "presence_f1": f1, "presence_auc": au}
        return out

    results = {"world:clip": score("world:clip", clip_emb["single"], clip_emb["multi"])}
    ref = results["world:clip"]["zero_shot"]
    for name in [e.strip() for e in args.encoders.split(",") if e.strip()]:
        enc = make_encoder(spec(name))
        if enc.preprocess_config() != clip.preprocess_config():
            raise SystemExit(f"world:{name} preprocesses images differently from world:clip")
        feats = {k: enc.encode_images(v[1]) for k, v in sets.items()}
        t1 = time.time()
        al = fit_aligner(feats["align"], clip_emb["align"], holdout=0.2, seed=0,
                         encoder=enc.spec, clip="world:clip")
        fit_s = time.time() - t1
        r = score(name, al.apply(feats["single"]), al.apply(feats["multi"]), round(al.r2_heldout, 4))
        r["align_seconds"] = round(fit_s, 3)
        r["vs_clip"] = {}
        for attr, acc in r["zero_shot"].items():
            chance = 1 / len(ATTRIBUTE_OF[attr])
            r["vs_clip"][attr] = {
                "matches_or_beats_clip": bool(acc >= ref[attr] - args.tie),
                "learned": bool(acc >= chance + 0.5 * (1 - chance)),
            }
        results[f"world:{name} -> world:clip"] = r
    report = {
        "benchmark": "world_fidelity",
        "seeds": {"align": args.seed, "single": args.seed + 1, "multi": args.seed + 2},
        "n": {"align": args.n_align, "single": args.n_single, "multi": args.n_multi},
        "chance_zero_shot": {a: round(1 / len(v), 4) for a, v in ATTRIBUTE_OF.items()},
        "chance_presence_f1": presence_chance(sets["multi"][2]),
        "weights": args.weights_dir or "shipped",
        "models": results,
        "seconds": {"render": round(t_render, 1), "total": round(time.time() - t0, 1)},
    }
    print(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()

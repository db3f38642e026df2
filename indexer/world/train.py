"""Train the concept-world models from scratch, deterministically (``t2c world train``).

One in-memory training set (rendered at 64 px, squashed to 32 px exactly like the encoder registry does)
feeds all three models:

- clip: symmetric InfoNCE between image and caption embeddings (every true caption in the batch a positive)
  plus a pairwise sigmoid loss (SigLIP); captions are resampled every step from the caption grammar
  (attributes and objects dropped at random, template prefixes added), each image also meets one binding
  hard-negative caption, and half of each batch is the other half's binding twins.
- clip-plain: the same towers trained the way the public CLIPs were: symmetric InfoNCE with one positive per
  caption (the image it was drawn for), no sigmoid loss, no hard negatives, no twins. It stands in for the
  CLIPs people use on real photos, which have no "own cut".
- pairnet: binary cross-entropy over the 48 colour-shape pairs present (no text, no size, no background).
- autoenc: mean squared reconstruction error (no labels at all).

Runs are deterministic for a given seed and thread count (torch deterministic algorithms, seeded
generators, fixed sampling order).
"""
from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from t2c.data.errors import InvalidInput
from t2c.data.store import SHARED_MODE, atomic_write_bytes
from t2c.data.world import vocab
from t2c.data.world.generator import Scene, sample_dataset
from t2c.indexer.world.models import (IMAGE_SIZE, MEAN, N_PAIRS, STD, WEIGHTS_DIR, WORLD_MODELS, build_world_model,
                               pair_index, save_world_model)

ATTRIBUTE_OF = {"color": vocab.ATTRIBUTES["color"], "shape": vocab.SHAPES, "size": vocab.SIZES,
                "background": tuple(vocab.BACKGROUNDS)}


@dataclass
class TrainConfig:
    """Everything that determines the trained weights."""

    n: int = 20000               # training images
    seed: int = 0                # data and init seed
    render_size: int = 64        # rendered side, squashed to IMAGE_SIZE
    batch: int = 256
    steps: dict = field(default_factory=lambda: {"clip": 3000, "clip-plain": 6000, "pairnet": 1000, "autoenc": 300})
    lr: dict = field(default_factory=lambda: {"clip": 2e-3, "clip-plain": 2e-3, "pairnet": 4e-3, "autoenc": 2e-3})
    clip_multi_positive: bool = True   # every true caption in the batch is a positive (False: plain InfoNCE)
    clip_hard_negatives: bool = True   # one binding-negative caption per image (colours swapped between objects)
    clip_twins: bool = True            # half of each batch: the other half with colours moved to other shapes
    clip_loss: str = "both"            # "softmax" (InfoNCE), "sigmoid" (SigLIP pairwise) or "both"
    weight_decay: float = 0.01
    warmup: float = 0.05         # fraction of steps
    eval_n: int = 1000           # held-out single-object images for the zero-shot check
    eval_seed: int = 7_000_001


CLIP_LOSSES = ("softmax", "sigmoid", "both")
CLIP_MODELS = ("clip", "clip-plain")  # world models with a text tower (trained contrastively on captions)


# --- data -------------------------------------------------------------------------------------------------
def to_tensor(pixels: np.ndarray):
    """uint8 (N, S, S, 3) -> normalised float32 torch tensor (N, 3, S, S)."""
    import torch

    pixels = np.ascontiguousarray(pixels)
    if not pixels.flags.writeable:
        pixels = pixels.copy()
    x = torch.from_numpy(pixels).permute(0, 3, 1, 2).float().div_(255.0)
    mean = torch.tensor(MEAN).view(1, 3, 1, 1)
    std = torch.tensor(STD).view(1, 3, 1, 1)
    return (x - mean) / std


_N_PATTERNS = (len(vocab.COLORS) + 1) * (len(vocab.SHAPES) + 1) * (len(vocab.SIZES) + 1)


def _pattern(color: int, shape: int, size: int) -> int:
    """Index of an object pattern; -1 in a slot means 'any'."""
    return ((color + 1) * (len(vocab.SHAPES) + 1) + shape + 1) * (len(vocab.SIZES) + 1) + size + 1


def _scene_patterns(scenes: Sequence[Scene]) -> tuple[np.ndarray, np.ndarray]:
    """(N, P) uint8 of every partial object description each scene satisfies, and (N,) background ids."""
    colors, bgs = list(vocab.COLORS), list(vocab.BACKGROUNDS)
    pat = np.zeros((len(scenes), _N_PATTERNS), np.float32)
    for i, sc in enumerate(scenes):
        for o in sc.objects:
            c, s, z = colors.index(o.color), vocab.SHAPES.index(o.shape), vocab.SIZES.index(o.size)
            for m in range(8):
                pat[i, _pattern(c if m & 1 else -1, s if m & 2 else -1, z if m & 4 else -1)] = 1
    return pat, np.array([bgs.index(sc.background) for sc in scenes])


def _caption_requirements(captions: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """(B, P) required patterns and (B,) required background (-1: none) of each caption."""
    colors, bgs = list(vocab.COLORS), list(vocab.BACKGROUNDS)
    req = np.zeros((len(captions), _N_PATTERNS), np.float32)
    bg = np.full(len(captions), -1)
    for i, c in enumerate(captions):
        spec = vocab.parse_concept(c)
        for o in spec["objects"]:
            req[i, _pattern(colors.index(o["color"]) if "color" in o else -1,
                            vocab.SHAPES.index(o["shape"]) if "shape" in o else -1,
                            vocab.SIZES.index(o["size"]) if "size" in o else -1)] = 1
        if spec["background"]:
            bg[i] = bgs.index(spec["background"])
    return req, bg


def caption_matches(captions: Sequence[str], scene_pat: np.ndarray, scene_bg: np.ndarray) -> np.ndarray:
    """(B, N) bool: caption i is a true description of scene j (multi-positive contrastive targets)."""
    req, bg = _caption_requirements(captions)
    ok = (req @ scene_pat.T) >= req.sum(1, keepdims=True) - 0.5
    return ok & ((bg[:, None] < 0) | (bg[:, None] == scene_bg[None, :]))


def pair_targets(scenes: Sequence[Scene]) -> np.ndarray:
    """Multi-hot (N, 48) float32 of the colour-shape pairs present in each scene."""
    y = np.zeros((len(scenes), N_PAIRS), np.float32)
    for i, sc in enumerate(scenes):
        for o in sc.objects:
            y[i, pair_index(o.color, o.shape)] = 1.0
    return y


def _render_chunk(args) -> np.ndarray:
    n, seed, start, size = args
    return sample_dataset(n, seed, size=size, image_size=IMAGE_SIZE, start=start)[1]


def render_training_set(n: int, seed: int, size: int = 64, workers: int = 1) -> tuple[list[Scene], np.ndarray]:
    """The training set (scenes, uint8 pixels); rendering is split over ``workers`` processes (same result)."""
    from t2c.data.world.generator import parse_weights, sample_scene, scene_rng

    probs = parse_weights(None)
    scenes = [sample_scene(scene_rng(seed, i), probs) for i in range(n)]
    if workers <= 1 or n < 2000:
        return scenes, sample_dataset(n, seed, size=size, image_size=IMAGE_SIZE)[1]
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    step = -(-n // (4 * workers))
    parts = [(min(step, n - s), seed, s, size) for s in range(0, n, step)]
    with ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn")) as ex:
        return scenes, np.concatenate(list(ex.map(_render_chunk, parts)))


# --- one generic loop ---------------------------------------------------------------------------------------
def render_twins(scenes: Sequence[Scene], seed: int, size: int = 64) -> tuple[list[Scene], np.ndarray]:
    """Binding twins of ``scenes`` (:func:`t2c.data.world.generator.binding_twin`) and their pixels."""
    from t2c.data.world.generator import binding_twin, render, squash

    rng = np.random.default_rng([seed, 29])
    twin_scenes = [binding_twin(sc, rng) for sc in scenes]
    pixels = np.empty((len(scenes), IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)
    for k, sc in enumerate(twin_scenes):
        pixels[k] = squash(render(sc, size), IMAGE_SIZE)
    return twin_scenes, pixels


def _lr_at(step: int, steps: int, base: float, warmup: float) -> float:
    w = max(1, int(warmup * steps))
    if step < w:
        return base * (step + 1) / w
    t = (step - w) / max(1, steps - w)
    return base * 0.5 * (1 + math.cos(math.pi * t))


def _batches(n: int, batch: int, steps: int, seed: int):
    """Index batches of epoch-wise permutations (deterministic)."""
    rng = np.random.default_rng([seed, 17])
    perm, pos = rng.permutation(n), 0
    for _ in range(steps):
        if pos + batch > n:
            perm, pos = rng.permutation(n), 0
        yield perm[pos : pos + batch]
        pos += batch


def train_model(name: str, scenes: Sequence[Scene], pixels: np.ndarray, *, steps: int, batch: int = 256,
                lr: float = 2e-3, weight_decay: float = 0.01, warmup: float = 0.05, seed: int = 0,
                multi_positive: bool = False, hard_negatives: bool = False, twins: bool = False,
                loss: str = "softmax", log: Callable[[str], None] | None = print, log_every: int = 50):
    """Train one world model from a random init on in-memory data.

    Args:
        name: "clip", "pairnet" or "autoenc".
        scenes, pixels: the training set from :func:`t2c.data.world.generator.sample_dataset`.
        steps, batch, lr, weight_decay, warmup: optimisation settings (AdamW, warmup + cosine).
        seed: init, batch order, flips and caption sampling.
        multi_positive: clip only; every image in the batch that a caption truly describes is a positive
            (soft targets) instead of only the image the caption was drawn for.
        hard_negatives: clip only; each image also meets one false caption built from its own words
            (:func:`t2c.data.world.vocab.binding_negative`, as in NegCLIP), so that colour must be bound to shape.
        twins: clip only; half of every batch is the other half's binding twins
            (:func:`t2c.data.world.generator.binding_twin`: the same scene with colours moved to other shapes),
            so a caption that binds a colour to a shape meets, as a negative, an image with the same bag of
            colours and shapes. Twins are rendered here (64 px, squashed like the training set).
        loss: clip only; "softmax" (symmetric InfoNCE), "sigmoid" (SigLIP: every image-caption pair is a
            binary decision "this caption is true of this image", so true and false pairs are pushed to
            opposite sides of one score) or "both" (their sum).
        log: a callable taking a progress line, or None.

    Returns:
        (model in eval mode, list of per-step losses).
    """
    import torch

    if name not in WORLD_MODELS:
        from t2c.data.errors import UnknownChoice

        raise UnknownChoice("world model", name, WORLD_MODELS)
    if loss not in CLIP_LOSSES:
        from t2c.data.errors import UnknownChoice

        raise UnknownChoice("loss function", loss, CLIP_LOSSES)
    if steps < 1 or batch < 2 or len(scenes) < batch:
        raise InvalidInput(f"need steps >= 1 and at least batch={batch} images, got steps={steps}, n={len(scenes)}")
    was_deterministic = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        return _train(name, scenes, pixels, steps, batch, lr, weight_decay, warmup, seed, multi_positive,
                      hard_negatives, twins and name in CLIP_MODELS, loss, log, log_every)
    finally:
        torch.use_deterministic_algorithms(was_deterministic)


def _train(name, scenes, pixels, steps, batch, lr, weight_decay, warmup, seed, multi_positive, hard_negatives,
           twins, loss_kind, log, log_every):
    """The training loop behind :func:`train_model` (deterministic algorithms already switched on)."""
    import torch
    import torch.nn.functional as F

    model = build_world_model(name, seed=seed).to(memory_format=torch.channels_last).train()
    n_scenes = len(scenes)
    if twins:
        twin_scenes, twin_pixels = render_twins(scenes, seed)
        scenes, pixels = list(scenes) + twin_scenes, np.concatenate([pixels, twin_pixels])
    x_all = to_tensor(pixels)
    decay = [p for n_, p in model.named_parameters() if p.ndim >= 2 and "pos" not in n_]
    no_decay = [p for n_, p in model.named_parameters() if not (p.ndim >= 2 and "pos" not in n_)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=lr)
    gen = torch.Generator().manual_seed(seed)
    cap_rng = np.random.default_rng([seed, 23])
    targets = torch.from_numpy(pair_targets(scenes)) if name == "pairnet" else None
    clip = name in CLIP_MODELS
    labels = [sc.object_labels() for sc in scenes] if clip else None
    if clip and (multi_positive or hard_negatives or loss_kind != "softmax"):
        scene_pat, scene_bg = _scene_patterns(scenes)
    history: list[float] = []
    t0 = time.time()
    batches = _batches(n_scenes, batch // 2, steps, seed) if twins else _batches(n_scenes, batch, steps, seed)
    for step, idx in enumerate(batches):
        if twins:  # originals, then their twins
            idx = np.concatenate([idx, idx + n_scenes])
        for g in opt.param_groups:
            g["lr"] = _lr_at(step, steps, lr, warmup)
        x = x_all[torch.from_numpy(idx)]
        flip = torch.rand(len(idx), generator=gen) < 0.5  # every shape is mirror-symmetric
        x = torch.where(flip.view(-1, 1, 1, 1), x.flip(3), x).contiguous(memory_format=torch.channels_last)
        if clip:
            caps = [vocab.sample_caption(scenes[i].background, labels[i], cap_rng) for i in idx]
            negs = [vocab.binding_negative(labels[i], cap_rng) for i in idx] if hard_negatives else []
            ids = torch.from_numpy(vocab.tokenize(caps + negs))
            ids = ids[:, : int((ids != 0).sum(1).max())]
            img = model.encode_image(x)
            txt = model.encode_token_ids(ids)
            # image -> text over the captions and the hard negatives; text -> image over the captions only
            cos = img @ txt.T
            logits = model.logit_scale.exp().clamp(max=100) * cos
            b = len(idx)
            truth = None  # (B images, texts): the caption is true of the image
            if multi_positive or loss_kind != "softmax":
                truth = caption_matches(caps + negs, scene_pat[idx], scene_bg[idx]).T
                truth[:, :b] |= np.eye(b, dtype=bool)
            if loss_kind != "softmax":  # every (image, text) pair is a yes/no decision against one bias
                z = model.sig_scale.exp().clamp(max=100) * cos + model.sig_bias
                sig = F.binary_cross_entropy_with_logits(z, torch.from_numpy(truth.astype(np.float32)),
                                                         reduction="sum") / b
            if loss_kind == "sigmoid":
                loss = sig
            elif multi_positive or hard_negatives:
                if multi_positive:
                    pos = truth.copy()
                else:  # a hard negative can still be true of another image in the batch
                    pos = np.zeros((b, len(caps) + len(negs)), bool)
                    pos[:, b:] = caption_matches(negs, scene_pat[idx], scene_bg[idx]).T
                pos[:, :b] |= np.eye(b, dtype=bool)
                pos = torch.from_numpy(pos.astype(np.float32))
                i2t = -(pos / pos.sum(1, keepdim=True) * F.log_softmax(logits, 1)).sum(1).mean()
                pt = pos[:, :b].T  # (captions, images)
                t2i = -(pt / pt.sum(1, keepdim=True) * F.log_softmax(logits[:, :b].T, 1)).sum(1).mean()
                loss = 0.5 * (t2i + i2t)
            else:
                tgt = torch.arange(b)
                loss = 0.5 * (F.cross_entropy(logits, tgt) + F.cross_entropy(logits.T, tgt))
            if loss_kind == "both":
                loss = loss + sig
        elif name == "pairnet":
            loss = F.binary_cross_entropy_with_logits(model.logits(x), targets[torch.from_numpy(idx)])
        else:
            loss = F.mse_loss(model.reconstruct(x), x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        history.append(float(loss.detach()))
        if log and (step % log_every == 0 or step == steps - 1):
            recent = np.mean(history[-log_every:])
            log(f"[{name}] step {step + 1}/{steps} loss {recent:.4f} ({time.time() - t0:.0f}s)")
    model = model.to(memory_format=torch.contiguous_format).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model, history


# --- zero-shot evaluation (numpy; used by training reports and bench/world_fidelity.py) -------------------
def concept_vectors(encode_text: Callable[[list[str]], np.ndarray], concepts: Sequence[str],
                    templates: Sequence[str] = vocab.PROMPT_TEMPLATES) -> np.ndarray:
    """(C, d) concept vectors: mean of the normalised prompt embeddings over templates, then normalised."""
    prompts = [t.format(c) for c in concepts for t in templates]
    e = np.asarray(encode_text(prompts), np.float32)
    e /= np.linalg.norm(e, axis=1, keepdims=True) + 1e-12
    v = e.reshape(len(concepts), len(templates), -1).mean(1)
    return v / (np.linalg.norm(v, axis=1, keepdims=True) + 1e-12)


def attribute_concepts(attribute: str) -> list[str]:
    """Concept strings for the values of one attribute (backgrounds get the word 'background')."""
    values = ATTRIBUTE_OF[attribute]
    return [f"{v} background" for v in values] if attribute == "background" else list(values)


def single_object_truth(scenes: Sequence[Scene], attribute: str) -> np.ndarray:
    """Class index of ``attribute`` for single-object scenes."""
    values = ATTRIBUTE_OF[attribute]
    if attribute == "background":
        return np.array([values.index(s.background) for s in scenes])
    return np.array([values.index(getattr(s.objects[0], attribute)) for s in scenes])


def zero_shot_accuracy(image_emb: np.ndarray, encode_text: Callable[[list[str]], np.ndarray],
                       scenes: Sequence[Scene], attributes: Sequence[str] = tuple(ATTRIBUTE_OF)) -> dict:
    """Zero-shot accuracy per attribute on single-object scenes: argmax cosine over the attribute's concepts."""
    emb = np.asarray(image_emb, np.float32)
    emb = emb / (np.linalg.norm(emb, axis=1, keepdims=True) + 1e-12)
    out = {}
    for attr in attributes:
        cv = concept_vectors(encode_text, attribute_concepts(attr))
        pred = (emb @ cv.T).argmax(1)
        out[attr] = float((pred == single_object_truth(scenes, attr)).mean())
    return out


def _encode(model, pixels: np.ndarray, batch: int = 512) -> np.ndarray:
    import torch

    x = to_tensor(pixels)
    with torch.inference_mode():
        return np.concatenate([model.encode_image(x[i : i + batch]).numpy() for i in range(0, len(x), batch)])


def clip_zero_shot(model, n: int = 1000, seed: int = 7_000_001) -> dict:
    """World CLIP's zero-shot accuracy per attribute on ``n`` held-out single-object images."""
    import torch

    scenes, pixels = sample_dataset(n, seed, n_objects=1)

    def enc_text(texts):
        with torch.inference_mode():
            return model.encode_text(texts).numpy()

    return zero_shot_accuracy(_encode(model, pixels), enc_text, scenes)


def pairnet_accuracy(model, n: int = 1000, seed: int = 7_000_001) -> float:
    """Fraction of held-out single-object images whose top pairnet class is the true colour-shape pair."""
    import torch

    scenes, pixels = sample_dataset(n, seed, n_objects=1)
    with torch.inference_mode():
        pred = model.logits(to_tensor(pixels)).argmax(1).numpy()
    truth = np.array([pair_index(s.objects[0].color, s.objects[0].shape) for s in scenes])
    return float((pred == truth).mean())


def _clip_recipe(cfg: TrainConfig, name: str) -> dict:
    """The contrastive settings of one model: world:clip's from the config, clip-plain's plain InfoNCE."""
    if name == "clip-plain":
        return {"multi_positive": False, "hard_negatives": False, "twins": False, "loss": "softmax"}
    return {"multi_positive": cfg.clip_multi_positive, "hard_negatives": cfg.clip_hard_negatives,
            "twins": cfg.clip_twins, "loss": cfg.clip_loss}


# --- everything ----------------------------------------------------------------------------------------
def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def train_all(out_dir: str | Path | None = None, *, config: TrainConfig | None = None,
              models: Sequence[str] = tuple(WORLD_MODELS), threads: int | None = 2,
              log: Callable[[str], None] | None = print) -> dict:
    """Train the world models from scratch and save them as safetensors plus ``world_models.json``.

    Args:
        out_dir: target directory (default: the shipped weights folder, indexer/world/weights).
        config: a TrainConfig (default: the settings of the shipped weights).
        models: which models to train.
        threads: torch CPU threads (results are deterministic for a given thread count).
        log: progress callable or None.

    Returns:
        The report written to ``world_models.json``: config, per-model seconds, final loss, file
        size and sha256, CLIP zero-shot accuracy.

    Raises:
        UnknownChoice: an unknown model name.
    """
    cfg = config or TrainConfig()
    for m in models:
        if m not in WORLD_MODELS:
            from t2c.data.errors import UnknownChoice

            raise UnknownChoice("world model", m, WORLD_MODELS)
    out = Path(out_dir) if out_dir else WEIGHTS_DIR
    out.mkdir(parents=True, exist_ok=True)
    t_all = time.time()
    t0 = time.time()
    scenes, pixels = render_training_set(cfg.n, cfg.seed, cfg.render_size, workers=int(threads or 1))
    import torch

    if threads:
        torch.set_num_threads(int(threads))
    report: dict = {"config": asdict(cfg), "threads": torch.get_num_threads(),
                    "data_seconds": round(time.time() - t0, 1), "models": {}}
    if log:
        log(f"rendered {cfg.n} training images in {report['data_seconds']}s")
    for name in models:
        t0 = time.time()
        model, hist = train_model(name, scenes, pixels, steps=int(cfg.steps[name]), batch=cfg.batch,
                                  lr=float(cfg.lr[name]), weight_decay=cfg.weight_decay, warmup=cfg.warmup,
                                  seed=cfg.seed, log=log, **_clip_recipe(cfg, name))
        secs = time.time() - t0
        info = {"seconds": round(secs, 1), "steps": int(cfg.steps[name]), "threads": torch.get_num_threads(),
                "first_loss": round(float(np.mean(hist[:10])), 4), "final_loss": round(float(np.mean(hist[-20:])), 4)}
        if name in CLIP_MODELS:
            info["recipe"] = _clip_recipe(cfg, name)
            info["zero_shot"] = {k: round(v, 4) for k, v in clip_zero_shot(model, cfg.eval_n, cfg.eval_seed).items()}
            if log:
                log(f"[{name}] zero-shot on {cfg.eval_n} held-out single-object images: {info['zero_shot']}")
        if name == "pairnet":
            info["pair_accuracy"] = round(pairnet_accuracy(model, cfg.eval_n, cfg.eval_seed), 4)
            if log:
                log(f"[pairnet] colour-shape pair accuracy on {cfg.eval_n} single-object images: {info['pair_accuracy']}")
        path = save_world_model(model, out / f"{name}.safetensors",
                                {"config": asdict(cfg), "final_loss": info["final_loss"]})
        info["bytes"] = path.stat().st_size
        info["sha256"] = _sha256(path)
        report["models"][name] = info
    report["total_seconds"] = round(time.time() - t_all, 1)
    meta_path = out / "world_models.json"
    try:  # models not retrained this time keep their entries (e.g. `t2c world train --model clip`)
        previous = json.loads(meta_path.read_text())
        for name, info in previous.get("models", {}).items():
            report["models"].setdefault(name, info)
    except (OSError, ValueError, AttributeError):
        pass
    atomic_write_bytes(meta_path, json.dumps(report, indent=1).encode(), mode=SHARED_MODE)
    if log:
        log(f"saved {', '.join(models)} to {out} in {report['total_seconds']}s total")
    return report


if __name__ == "__main__":  # python -m t2c.indexer.world.train [OUT_DIR]
    import sys

    train_all(sys.argv[1] if len(sys.argv) > 1 else None)

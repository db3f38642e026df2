"""The concept world's caption decoder: world:clip image embedding (128-d) -> canonical caption.

A one-layer GRU language model over the world vocabulary, conditioned on the CLIP-space vector twice: the
vector sets the initial hidden state and is fed beside every input token. It is trained (teacher forcing,
cross-entropy) on world:clip IMAGE embeddings of generated images paired with their canonical captions
(``a small red circle and a large blue square on a teal background``). Gaussian noise is added to the
embeddings during training (and the vectors re-normalised), so that vectors predicted by an aligner from
another encoder — close to, but not exactly, CLIP image embeddings — decode as well. Greedy decoding.

torch is imported only when a decoder is built. Weights ship as ``weights/decoder.safetensors`` (about
0.4 MB) and are reproduced by ``t2c describe-train`` (``train_decoder``), deterministically per seed and
thread count.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from t2c.data.artefacts import read_artefact, write_artefact
from t2c.data.errors import EncoderError, InvalidInput
from t2c.data.world import vocab

DECODER_FILE = "decoder.safetensors"
FORMAT = "t2c-world-decoder-1"
PAD, BOS, EOS = "<pad>", "<bos>", "<eos>"
TOKENS: tuple[str, ...] = (PAD, BOS, EOS, *vocab.WORDS)
TOKEN_ID = {t: i for i, t in enumerate(TOKENS)}
MAX_TOKENS = 32


def weights_path() -> Path:
    """Path of the shipped decoder weights."""
    from t2c.indexer.world.models import WEIGHTS_DIR

    return WEIGHTS_DIR / DECODER_FILE


def encode_caption(text: str, max_len: int = MAX_TOKENS) -> list[int]:
    """Token ids ``<bos> words... <eos>`` (punctuation dropped; truncated to max_len)."""
    ids = [TOKEN_ID[BOS]] + [TOKEN_ID[w] for w in vocab.words_of(text)] + [TOKEN_ID[EOS]]
    return ids[:max_len]


def decode_tokens(ids: Sequence[int]) -> str:
    """Token ids -> caption text, with the grammar's commas restored between object phrases."""
    words = []
    for i in ids:
        t = TOKENS[int(i)]
        if t == EOS:
            break
        if t in (PAD, BOS):
            continue
        words.append(t)
    out = []
    for k, w in enumerate(words):
        nxt = words[k + 1] if k + 1 < len(words) else None
        if w == "a" and out and out[-1] in vocab.SHAPES + ("object",) and nxt != "background":
            # a new object phrase after a finished one: "..., a" unless "and a" (handled by the word "and")
            out[-1] = out[-1] + ","
        out.append(w)
    return " ".join(out)


@dataclass
class DecoderConfig:
    """Everything that determines the trained decoder."""

    n: int = 16000            # training images
    seed: int = 0
    steps: int = 3000
    batch: int = 128
    lr: float = 3e-3
    hidden: int = 128
    emb: int = 48
    noise: float = 0.06        # max std of the Gaussian noise added to each embedding coordinate
    clip_weights: str | None = None  # world:clip weights (None: shipped, "random": random init)
    render_size: int = 64


@functools.cache
def _nets():
    import torch
    from torch import nn

    class CaptionDecoder(nn.Module):
        """GRU caption decoder conditioned on a CLIP-space vector."""

        def __init__(self, dim: int = 64, hidden: int = 128, emb: int = 48):
            super().__init__()
            self.dim, self.hidden_size, self.emb_size = dim, hidden, emb
            self.tok = nn.Embedding(len(TOKENS), emb, padding_idx=0)
            self.init = nn.Linear(dim, hidden)
            self.gru = nn.GRU(emb + dim, hidden, batch_first=True)
            self.out = nn.Linear(hidden, len(TOKENS))

        def forward(self, vec, ids):
            """Logits (B, T, V) for next tokens given vectors (B, dim) and input ids (B, T)."""
            h0 = torch.tanh(self.init(vec)).unsqueeze(0)
            x = torch.cat([self.tok(ids), vec.unsqueeze(1).expand(-1, ids.shape[1], -1)], -1)
            y, _ = self.gru(x, h0)
            return self.out(y)

        @torch.no_grad()
        def greedy(self, vec, max_len: int = MAX_TOKENS):
            """Greedy token ids (B, <=max_len) starting after <bos>."""
            B = vec.shape[0]
            h = torch.tanh(self.init(vec)).unsqueeze(0)
            cur = torch.full((B, 1), TOKEN_ID[BOS], dtype=torch.long)
            outs = []
            done = torch.zeros(B, dtype=torch.bool)
            for _ in range(max_len):
                x = torch.cat([self.tok(cur), vec.unsqueeze(1)], -1)
                y, h = self.gru(x, h)
                nxt = self.out(y[:, -1]).argmax(-1)
                nxt = torch.where(done, torch.full_like(nxt, TOKEN_ID[EOS]), nxt)
                outs.append(nxt)
                done |= nxt == TOKEN_ID[EOS]
                cur = nxt.unsqueeze(1)
                if bool(done.all()):
                    break
            return torch.stack(outs, 1)

    return torch, CaptionDecoder


def build_decoder(dim: int = 64, hidden: int = 128, emb: int = 48, seed: int = 0):
    """A randomly initialised decoder (deterministic for a seed)."""
    torch, CaptionDecoder = _nets()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return CaptionDecoder(dim, hidden, emb)


def save_decoder(model, path, metadata: dict | None = None) -> Path:
    """Save decoder weights as safetensors (atomically) with its shape and provenance."""
    md = {"format": FORMAT, "dim": str(model.dim), "hidden": str(model.hidden_size), "emb": str(model.emb_size),
          "tokens": json.dumps(TOKENS), "meta": json.dumps(metadata or {}, sort_keys=True, default=str)}
    return write_artefact(path, model.state_dict(), md)


def load_decoder(path: str | os.PathLike | None = None):
    """Load a world decoder in eval mode (default: the shipped weights).

    Raises:
        NotFound: no such file (``t2c describe-train`` rebuilds the shipped one). DamagedArtefact: not a
        readable world decoder. EncoderError: trained with another vocabulary.
    """
    path = Path(path) if path else weights_path()
    md, sd = read_artefact(path, "world caption decoder", formats=FORMAT, framework="pt",
                           fix="run `t2c describe-train` to build the world decoder")
    if json.loads(md.get("tokens", "[]")) != list(TOKENS):
        raise EncoderError(f"caption decoder {str(path)!r} was trained with another vocabulary",
                           "retrain it with `t2c describe-train`")
    model = build_decoder(int(md["dim"]), int(md["hidden"]), int(md["emb"]))
    model.load_state_dict(sd, strict=True)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    model.meta = json.loads(md.get("meta", "{}"))
    return model


def caption_vectors(model, vecs: np.ndarray, max_len: int = MAX_TOKENS) -> list[str]:
    """Captions for (n, dim) CLIP-space vectors (re-normalised first)."""
    torch, _ = _nets()
    v = np.asarray(vecs, np.float32)
    if v.ndim == 1:
        v = v[None]
    if v.shape[1] != model.dim:
        raise InvalidInput(f"vector has dimension {v.shape[1]}, the decoder expects {model.dim}")
    v = v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)
    ids = model.greedy(torch.from_numpy(v), max_len)
    return [decode_tokens(row) for row in ids.tolist()]


def _pad(seqs: list[list[int]]) -> np.ndarray:
    T = max(len(s) for s in seqs)
    out = np.zeros((len(seqs), T), np.int64)
    for i, s in enumerate(seqs):
        out[i, : len(s)] = s
    return out


def clip_image_embeddings(pixels: np.ndarray, clip_weights: str | None = None, batch: int = 512) -> np.ndarray:
    """world:clip image embeddings (n, 64) of uint8 (n, 32, 32, 3) pixels."""
    from t2c.indexer.world.models import load_world_model
    from t2c.indexer.world.train import to_tensor

    torch, _ = _nets()
    clip = load_world_model("clip", clip_weights)
    out = []
    with torch.no_grad():
        for i in range(0, len(pixels), batch):
            out.append(clip.encode_image(to_tensor(pixels[i : i + batch])).numpy())
    return np.concatenate(out).astype(np.float32)


def train_decoder(config: DecoderConfig | None = None, out: str | os.PathLike | None = None, *, threads: int = 2,
                  log: Callable[[str], None] | None = None):
    """Train the world caption decoder from scratch, deterministically, and (optionally) save it.

    Args:
        config: a DecoderConfig (data size, steps, noise, which world:clip weights embed the images).
        out: where to save (None: do not save; "shipped": the shipped weights path).
        threads: torch CPU threads. log: progress callback.

    Returns:
        (model, report dict: seconds, final loss, exact-caption and colour/shape accuracy on held-out images).
    """
    from t2c.data.world.generator import sample_dataset

    cfg = config or DecoderConfig()
    if cfg.n < 2 or cfg.steps < 1:
        raise InvalidInput("the decoder needs n >= 2 images and steps >= 1")
    torch, _ = _nets()
    torch.set_num_threads(max(1, int(threads)))
    t0 = time.perf_counter()
    scenes, pixels = sample_dataset(cfg.n, cfg.seed + 1_000_003, size=cfg.render_size, image_size=32)
    emb = clip_image_embeddings(pixels, cfg.clip_weights)
    seqs = [encode_caption(s.caption) for s in scenes]
    ids = torch.from_numpy(_pad(seqs))
    E = torch.from_numpy(emb)
    model = build_decoder(emb.shape[1], cfg.hidden, cfg.emb, seed=cfg.seed)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=1e-4)
    g = torch.Generator().manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    loss_f = torch.nn.CrossEntropyLoss(ignore_index=0)
    loss_v = float("nan")
    for step in range(cfg.steps):
        lr = cfg.lr * 0.5 * (1 + np.cos(np.pi * step / cfg.steps))
        for pg in opt.param_groups:
            pg["lr"] = lr
        b = torch.from_numpy(rng.integers(0, cfg.n, size=min(cfg.batch, cfg.n)))
        v = E[b]
        sigma = torch.rand(len(b), 1, generator=g) * cfg.noise
        v = torch.nn.functional.normalize(v + sigma * torch.randn(v.shape, generator=g), dim=-1)
        x = ids[b]
        logits = model(v, x[:, :-1])
        loss = loss_f(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        loss_v = float(loss.detach())
        if log and (step % 250 == 0 or step == cfg.steps - 1):
            log(f"decoder step {step}/{cfg.steps} loss {loss_v:.4f}")
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    # held-out check on single-object images
    ev_scenes, ev_px = sample_dataset(min(500, cfg.n), cfg.seed + 2_000_003, size=cfg.render_size, image_size=32,
                                      n_objects=1)
    caps = caption_vectors(model, clip_image_embeddings(ev_px, cfg.clip_weights))
    report = {"seconds": round(time.perf_counter() - t0, 1), "final_loss": round(loss_v, 4),
              "config": asdict(cfg), **caption_accuracy(caps, ev_scenes)}
    if out is not None:
        path = weights_path() if str(out) == "shipped" else Path(out)
        clip_file = None
        if cfg.clip_weights != "random":
            from t2c.indexer.world.models import weights_path as wp

            cp = Path(cfg.clip_weights) if cfg.clip_weights else wp("clip")
            clip_file = hashlib.sha256(cp.read_bytes()).hexdigest()[:16] if cp.is_file() else None
        save_decoder(model, path, {"config": asdict(cfg), "clip_weights_sha": clip_file, "report": {
            k: report[k] for k in ("final_loss", "exact", "color_shape")}})
        report["path"] = str(path)
    return model, report


def caption_accuracy(captions: Sequence[str], scenes) -> dict:
    """Fraction of captions naming the right colour and shape (first object), and exactly right."""
    ok_cs = exact = 0
    for cap, sc in zip(captions, scenes):
        o = sc.objects[0]
        try:
            spec = vocab.parse_concept(cap)
            objs = spec["objects"]
        except Exception:  # noqa: BLE001 - a garbled caption counts as wrong
            objs = []
        ok_cs += any(d.get("color") == o.color and d.get("shape") == o.shape for d in objs)
        exact += cap == sc.caption
    n = max(len(captions), 1)
    return {"color_shape": ok_cs / n, "exact": exact / n, "n_eval": len(captions)}

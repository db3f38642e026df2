"""Concept-to-text: decode an aligned (CLIP-space) vector into a caption.

Two decoders, chosen by the CLIP space of the vector:

- ``world:clip`` stores use the concept world's GRU caption decoder (``t2c.indexer.world.decoder``; weights ship in
  ``indexer/world/weights/decoder.safetensors``, rebuilt by ``t2c describe-train``).
- Any other CLIP uses a ClipCap-style prefix decoder: an MLP maps the CLIP vector to ``prefix_len`` token
  embeddings of a GPT-2-class language model (``transformers``), then greedy decoding. Its weights come from
  a local safetensors file (``--decoder FILE`` or ``$T2C_CAPTION_DECODER``) written by
  :func:`save_prefix_captioner`: keys ``project.*`` (the MLP) and ``lm.*`` (GPT-2), metadata ``format``,
  ``gpt2_config`` (JSON), ``clip_dim``, ``prefix_len``, ``clip`` and optionally ``tokenizer`` (a folder,
  relative to the file, readable by ``transformers.AutoTokenizer`` offline). Without a tokenizer the caption is
  the token ids (``<17> <4> ...``). No model hub access ever.

torch/transformers are imported only when a decoder is loaded.

Python API:
    describe(snapshot, id, decoder=None) -> dict(id, path, caption, decoder, kind, clip)
    describe_vector(vec, clip_spec, decoder=None) -> dict(caption, decoder, kind, clip)
    PrefixCaptioner, build_prefix_captioner(gpt2_config, clip_dim, prefix_len), save_prefix_captioner,
    load_prefix_captioner
"""
from __future__ import annotations

import functools
import json
import os
from pathlib import Path

import numpy as np

from t2c.data.artefacts import read_artefact, write_artefact
from t2c.data.errors import EncoderError, InvalidInput, NotFound
from t2c.query.lru import LRUCache

__all__ = ["describe", "describe_vector", "load_caption_decoder", "build_prefix_captioner", "save_prefix_captioner",
           "load_prefix_captioner", "clipcap_train_step", "CLIPCAP_FORMAT"]

CLIPCAP_FORMAT = "t2c-clipcap-1"
ENV_DECODER = "T2C_CAPTION_DECODER"
DECODER_FIX = "run `t2c describe-train` (world), or pass --decoder FILE (a ClipCap or world decoder file)"
_LOADED = LRUCache(4)  # loaded decoders; a newer version of a file evicts the older one


# ------------------------------------------------------------------------------------------------ ClipCap
@functools.cache
def _clipcap_cls():
    import torch
    from torch import nn

    class PrefixCaptioner(nn.Module):
        """ClipCap: CLIP vector -> prefix token embeddings (MLP) -> GPT-2 language model, greedy decoding."""

        def __init__(self, lm, clip_dim: int, prefix_len: int = 10):
            super().__init__()
            self.lm = lm
            self.clip_dim, self.prefix_len = int(clip_dim), int(prefix_len)
            e = lm.config.n_embd
            hid = max(e * prefix_len // 2, e)
            self.project = nn.Sequential(nn.Linear(clip_dim, hid), nn.Tanh(), nn.Linear(hid, e * prefix_len))
            self.tokenizer = None

        def prefix(self, vec):
            """(B, prefix_len, n_embd) prefix embeddings of (B, clip_dim) vectors."""
            return self.project(vec).view(vec.shape[0], self.prefix_len, -1)

        def loss(self, vec, ids):
            """Caption cross-entropy (teacher forcing) of token ids (B, T) after the prefix."""
            pre = self.prefix(vec)
            emb = self.lm.get_input_embeddings()(ids)
            logits = self.lm(inputs_embeds=torch.cat([pre, emb], 1)).logits
            pred = logits[:, self.prefix_len - 1 : -1]
            return nn.functional.cross_entropy(pred.reshape(-1, pred.shape[-1]), ids.reshape(-1))

        @torch.no_grad()
        def greedy(self, vec, max_len: int = 30):
            """Greedy token ids: list of lists (each stops before the end-of-text token)."""
            eos = self.lm.config.eos_token_id
            if eos is not None and eos >= self.lm.config.vocab_size:
                eos = None
            wte = self.lm.get_input_embeddings()
            out = []
            for b in range(vec.shape[0]):
                emb = self.prefix(vec[b : b + 1])
                toks: list[int] = []
                for _ in range(max_len):
                    if emb.shape[1] >= self.lm.config.n_positions:
                        break
                    nxt = int(self.lm(inputs_embeds=emb).logits[0, -1].argmax())
                    if eos is not None and nxt == eos:
                        break
                    toks.append(nxt)
                    emb = torch.cat([emb, wte(torch.tensor([[nxt]]))], 1)
                out.append(toks)
            return out

        def caption(self, vec, max_len: int = 30) -> list[str]:
            """Captions of (B, clip_dim) vectors (normalised first)."""
            vec = torch.nn.functional.normalize(torch.from_numpy(np.array(vec, np.float32)), dim=-1)
            ids = self.greedy(vec, max_len)
            if self.tokenizer is not None:
                return [self.tokenizer.decode(t, skip_special_tokens=True).strip() for t in ids]
            return [" ".join(f"<{i}>" for i in t) for t in ids]

    return PrefixCaptioner


def build_prefix_captioner(gpt2_config: dict, clip_dim: int, prefix_len: int = 10, seed: int = 0):
    """A randomly initialised ClipCap captioner around a GPT-2 of ``gpt2_config`` (a GPT2Config dict)."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        lm = GPT2LMHeadModel(GPT2Config(**gpt2_config))
        return _clipcap_cls()(lm, clip_dim, prefix_len)


def save_prefix_captioner(model, path, clip: str = "", tokenizer: str | None = None) -> Path:
    """Save a ClipCap captioner as one safetensors file (tied LM head dropped), atomically."""
    sd = {}
    for k, v in model.state_dict().items():
        if k == "lm.lm_head.weight" and model.lm.config.tie_word_embeddings:
            continue
        sd[k] = v.detach().cpu().contiguous().clone()
    cfg = model.lm.config.to_dict()
    keep = {k: cfg[k] for k in ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head", "n_inner",
                                "activation_function", "layer_norm_epsilon", "bos_token_id", "eos_token_id",
                                "tie_word_embeddings") if k in cfg}
    md = {"format": CLIPCAP_FORMAT, "gpt2_config": json.dumps(keep), "clip_dim": str(model.clip_dim),
          "prefix_len": str(model.prefix_len), "clip": clip or ""}
    if tokenizer:
        md["tokenizer"] = tokenizer
    return write_artefact(path, sd, md)


def load_prefix_captioner(path):
    """Load a ClipCap captioner saved by :func:`save_prefix_captioner` (local files only)."""
    path = Path(path)
    md, sd = read_artefact(path, "ClipCap caption decoder", fix=DECODER_FIX, formats=CLIPCAP_FORMAT, framework="pt")
    cfg = json.loads(md["gpt2_config"])
    model = build_prefix_captioner(cfg, int(md["clip_dim"]), int(md["prefix_len"]))
    missing, unexpected = model.load_state_dict(sd, strict=False)
    bad = [k for k in missing if k != "lm.lm_head.weight"] + list(unexpected)
    if bad:
        raise EncoderError(f"caption decoder {str(path)!r} does not fit its config: {bad[:3]}")
    if "lm.lm_head.weight" in missing:
        model.lm.tie_weights()
    tok = md.get("tokenizer")
    if tok:
        tdir = (path.parent / tok) if not os.path.isabs(tok) else Path(tok)
        if not tdir.is_dir():
            raise NotFound(f"tokenizer folder {str(tdir)!r} named by {path.name} does not exist")
        from transformers import AutoTokenizer

        model.tokenizer = AutoTokenizer.from_pretrained(str(tdir), local_files_only=True)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    model.clip = md.get("clip", "")
    return model


def clipcap_train_step(model, opt, vecs, ids) -> float:
    """One teacher-forced training step of a ClipCap captioner (vectors (B, d), token ids (B, T)); loss."""
    import torch

    model.train()
    loss = model.loss(torch.as_tensor(np.asarray(vecs, np.float32)), torch.as_tensor(np.asarray(ids, np.int64)))
    opt.zero_grad()
    loss.backward()
    opt.step()
    return float(loss.detach())


# ------------------------------------------------------------------------------------------------ loading
def _default_decoder(clip_spec: str) -> Path:
    spec = str(clip_spec or "")
    if spec == "world:clip" or spec.startswith("world:clip?"):
        from t2c.indexer.world.decoder import weights_path

        return weights_path()
    env = os.environ.get(ENV_DECODER)
    if env:
        return Path(env).expanduser()
    raise NotFound(f"no caption decoder for CLIP space {spec!r}",
                   f"pass --decoder FILE (a ClipCap prefix decoder for this CLIP) or set ${ENV_DECODER}")


def load_caption_decoder(path) -> tuple[str, object]:
    """(kind, model) for a decoder file: kind "world-gru" or "clipcap"; cached per file version."""
    from t2c.indexer.world import decoder as wd

    path = Path(path).expanduser()
    st = path.stat() if path.is_file() else None
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns) if st else None
    hit = _LOADED.get(key) if key else None
    if hit is not None:
        return hit
    fmt = read_artefact(path, "caption decoder", fix=DECODER_FIX, formats=(wd.FORMAT, CLIPCAP_FORMAT),
                        header_only=True)[0]["format"]
    if fmt == wd.FORMAT:
        val = ("world-gru", wd.load_decoder(path))
    else:
        val = ("clipcap", load_prefix_captioner(path))
    if key is None:
        return val
    return _LOADED.setdefault(key, val, scope=key[0], generation=(st.st_mtime_ns, st.st_size))


# ------------------------------------------------------------------------------------------------ API
def describe_vector(vec, clip_spec: str, decoder: str | os.PathLike | None = None, max_len: int = 30) -> dict:
    """Decode a CLIP-space vector into a caption.

    Args:
        vec: (d,) vector in the CLIP space of ``clip_spec`` (an aligned image vector, or a text embedding).
        clip_spec: the CLIP spec (``world:clip`` picks the shipped world decoder).
        decoder: a decoder file (world GRU or ClipCap); default by CLIP spec, then ``$T2C_CAPTION_DECODER``.
        max_len: most tokens to generate.

    Returns:
        dict(caption, decoder (file), kind ("world-gru" / "clipcap"), clip).

    Raises:
        NotFound: no decoder for this CLIP space. InvalidInput: the vector's dimension does not fit.

    Example:
        >>> describe_vector(snap.vectors[0], snap.clip)["caption"]  # doctest: +SKIP
        'a small red circle on a teal background'
    """
    v = np.asarray(vec, np.float32).reshape(-1)
    if not np.all(np.isfinite(v)) or not np.any(v):
        raise InvalidInput("the vector must be finite and non-zero")
    path = Path(decoder).expanduser() if decoder else _default_decoder(clip_spec)
    kind, model = load_caption_decoder(path)
    if kind == "world-gru":
        from t2c.indexer.world.decoder import caption_vectors

        if v.shape[0] != model.dim:
            raise InvalidInput(f"vector has dimension {v.shape[0]}, the decoder expects {model.dim}")
        caption = caption_vectors(model, v[None], max_len=max(max_len, 1))[0]
    else:
        if v.shape[0] != model.clip_dim:
            raise InvalidInput(f"vector has dimension {v.shape[0]}, the decoder expects {model.clip_dim}")
        if model.clip and clip_spec and model.clip != clip_spec:
            raise InvalidInput(f"decoder {path.name} was trained for CLIP {model.clip!r}, not {clip_spec!r}")
        caption = model.caption(v[None], max_len)[0]
    return {"caption": caption, "decoder": str(path), "kind": kind, "clip": clip_spec}


def describe(snapshot, id: int, decoder: str | os.PathLike | None = None, max_len: int = 30) -> dict:
    """Caption one image of a store from its aligned vector.

    Args:
        snapshot: an open Snapshot. id: a catalog image id. decoder: optional decoder file.

    Returns:
        dict(id, path, caption, decoder, kind, clip).

    Raises:
        NotFound: unknown id, or no decoder for the store's CLIP space.
    """
    try:
        iid = int(id)
    except (TypeError, ValueError):
        raise InvalidInput(f"image id must be an integer, got {id!r}") from None
    row = int(snapshot.rows_of([iid])[0])
    out = describe_vector(np.asarray(snapshot.vectors[row]), snapshot.clip, decoder, max_len)
    path = snapshot.image_rows([iid])[0].get("path")
    return {"id": iid, "path": path, **out}

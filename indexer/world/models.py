"""Concept-world models: a small CLIP (image + text towers) and two encoders trained without text.

- ``clip``: 4-block CNN image tower (global max pooling) + 2-layer transformer text tower over the world
  vocabulary, trained on generated captions with a contrastive (InfoNCE, multi-positive) plus a pairwise
  sigmoid (SigLIP) loss, binding hard-negative captions and binding-twin images. Both towers return
  L2-normalised 128-d embeddings; the sigmoid head's bias gives the model's own "present" score.
- ``pairnet``: a residual CNN (strided 5x5 stem, residual blocks, global max pooling) trained as a
  multi-label classifier of the colour-shape pairs present; features are its 128-d penultimate layer.
  It never sees size or background labels, nor any text.
- ``autoenc``: a convolutional autoencoder trained to reconstruct the image (no labels, no text);
  features are its 64-d bottleneck.

torch is imported only when a model is built (``WORLD_MODELS`` can be listed without it).
Weights ship as safetensors in ``indexer/world/weights/`` and are reproduced by ``t2c world train``.
"""
from __future__ import annotations

import functools
import json
import os
from pathlib import Path
from types import SimpleNamespace

from t2c.data.artefacts import read_artefact, write_artefact
from t2c.data.errors import EncoderError, UnknownChoice
from t2c.data.world import vocab

IMAGE_SIZE = 32
MEAN = (0.5, 0.5, 0.5)
STD = (0.25, 0.25, 0.25)
WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
N_PAIRS = len(vocab.COLORS) * len(vocab.SHAPES)

WORLD_MODELS: dict[str, dict] = {
    "clip": {"dim": 128, "has_text": True,
             "description": "world CLIP: CNN image tower + transformer text tower, contrastive on captions"},
    "clip-plain": {"dim": 128, "has_text": True,
                   "description": "world CLIP trained like the public CLIPs: plain InfoNCE on whole captions "
                                  "(no sigmoid loss, no hard negatives, no twins), so it has no own cut"},
    "pairnet": {"dim": 128, "has_text": False,
                "description": "residual CNN, supervised multi-label colour-shape pairs (no text, no size)"},
    "autoenc": {"dim": 64, "has_text": False,
                "description": "convolutional autoencoder bottleneck, self-supervised reconstruction (no labels)"},
}


def pair_index(color: str, shape: str) -> int:
    """Class index of a colour-shape pair in pairnet's head."""
    return list(vocab.COLORS).index(color) * len(vocab.SHAPES) + vocab.SHAPES.index(shape)


@functools.cache
def _nets() -> SimpleNamespace:
    """Define the torch modules (deferred so that importing this file does not import torch)."""
    import torch
    from torch import nn
    import torch.nn.functional as F

    class WorldModel(nn.Module):
        """Common attributes read by the encoder registry."""

        name = ""
        dim = 0
        has_text = False
        stages: tuple[str, ...] = ()  # submodules whose outputs ``features=stages`` pools (non-CLIP models)
        head_activation: str | None = None  # set when ``self.head`` maps the image embedding to class logits
        image_size = IMAGE_SIZE
        mean = MEAN
        std = STD

        def forward(self, x):
            return self.encode_image(x)

    def conv_bn(cin, cout, k=3, stride=1):
        return nn.Sequential(nn.Conv2d(cin, cout, k, stride, k // 2, bias=False), nn.BatchNorm2d(cout),
                             nn.ReLU(inplace=True))

    class TextTower(nn.Module):
        def __init__(self, dim: int, width: int = 64, layers: int = 2, heads: int = 4):
            super().__init__()
            self.tok = nn.Embedding(len(vocab.TOKENS), width, padding_idx=0)
            self.pos = nn.Parameter(torch.zeros(vocab.MAX_LEN, width))
            nn.init.normal_(self.pos, std=0.02)
            layer = nn.TransformerEncoderLayer(width, heads, 4 * width, dropout=0.0, batch_first=True,
                                               norm_first=True)
            self.blocks = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
            self.ln = nn.LayerNorm(width)
            self.proj = nn.Linear(width, dim)

        def forward(self, ids):
            pad = ids == 0
            h = self.tok(ids) + self.pos[: ids.shape[1]]
            h = self.blocks(h, src_key_padding_mask=pad)
            return self.proj(self.ln(h[:, 0]))  # the <cls> token

    class WorldCLIP(WorldModel):
        name, dim, has_text = "clip", WORLD_MODELS["clip"]["dim"], True

        def __init__(self, sigmoid: bool = True):
            super().__init__()
            self.visual = nn.Sequential(
                conv_bn(3, 48), nn.MaxPool2d(2),          # 16x16
                conv_bn(48, 96), nn.MaxPool2d(2),         # 8x8
                conv_bn(96, 192), conv_bn(192, 192),
                # max, not average, pooling: "is there a red circle anywhere" survives the pooling of a
                # cluttered scene (average pooling blends the objects' features together)
                nn.AdaptiveMaxPool2d(1), nn.Flatten(), nn.Linear(192, self.dim),
            )
            self.text = TextTower(self.dim)
            self.logit_scale = nn.Parameter(torch.tensor(2.6593))  # log(1/0.07)
            if sigmoid:  # pairwise sigmoid loss (SigLIP): own temperature and bias; -bias/scale is the present_score
                self.sig_scale = nn.Parameter(torch.tensor(2.3026))  # log(10)
                self.sig_bias = nn.Parameter(torch.tensor(-2.0))

        def encode_image(self, x):
            return F.normalize(self.visual(x), dim=-1)

        def encode_token_ids(self, ids):
            return F.normalize(self.text(ids), dim=-1)

        def present_score(self) -> float | None:
            """The cosine at which the sigmoid head says "true" with probability 1/2 (-bias / scale); None
            for a model trained without the sigmoid loss (clip-plain), which has no own cut."""
            if not hasattr(self, "sig_bias"):
                return None
            return float(-self.sig_bias.detach() / self.sig_scale.detach().exp().clamp(max=100))

        def encode_text(self, texts):
            """Embed texts (list of str) with the text tower; unknown words raise UnknownChoice."""
            if isinstance(texts, str):
                texts = [texts]
            ids = torch.from_numpy(vocab.tokenize(list(texts)))
            return self.encode_token_ids(ids.to(self.logit_scale.device))

    class WorldCLIPPlain(WorldCLIP):
        """The same towers, trained like the public CLIPs (plain InfoNCE): no sigmoid head."""

        name = "clip-plain"

        def __init__(self):
            super().__init__(sigmoid=False)

    class ResBlock(nn.Module):
        def __init__(self, ch):
            super().__init__()
            self.c1 = nn.Conv2d(ch, ch, 3, 1, 1, bias=False)
            self.b1 = nn.BatchNorm2d(ch)
            self.c2 = nn.Conv2d(ch, ch, 3, 1, 1, bias=False)
            self.b2 = nn.BatchNorm2d(ch)

        def forward(self, x):
            y = F.relu(self.b1(self.c1(x)))
            return F.relu(x + self.b2(self.c2(y)))

    class PairNet(WorldModel):
        name, dim = "pairnet", WORLD_MODELS["pairnet"]["dim"]
        stages = ("body.0", "body.1", "body.2", "body.3")
        head_activation = "sigmoid"  # trained with binary cross-entropy (multi-label)

        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(
                conv_bn(3, 32, k=5, stride=2),            # 16x16
                ResBlock(32),
                conv_bn(32, 64, stride=2),                # 8x8
                ResBlock(64),
                nn.AdaptiveMaxPool2d(1), nn.Flatten(),
                nn.Linear(64, self.dim), nn.ReLU(inplace=True),
            )
            self.head = nn.Linear(self.dim, N_PAIRS)

        def encode_image(self, x):
            return self.body(x)

        def logits(self, x):
            return self.head(self.body(x))

    class AutoEncoder(WorldModel):
        name, dim = "autoenc", WORLD_MODELS["autoenc"]["dim"]
        stages = ("enc.1", "enc.3", "enc.5")

        def __init__(self):
            super().__init__()
            self.enc = nn.Sequential(
                nn.Conv2d(3, 32, 4, 2, 1), nn.ReLU(inplace=True),     # 16x16
                nn.Conv2d(32, 64, 4, 2, 1), nn.ReLU(inplace=True),    # 8x8
                nn.Conv2d(64, 64, 4, 2, 1), nn.ReLU(inplace=True),    # 4x4
                nn.Flatten(), nn.Linear(64 * 16, self.dim),
            )
            self.dec_in = nn.Linear(self.dim, 64 * 16)
            self.dec = nn.Sequential(
                nn.ReLU(inplace=True), nn.Unflatten(1, (64, 4, 4)),
                nn.ConvTranspose2d(64, 64, 4, 2, 1), nn.ReLU(inplace=True),   # 8x8
                nn.ConvTranspose2d(64, 32, 4, 2, 1), nn.ReLU(inplace=True),   # 16x16
                nn.ConvTranspose2d(32, 3, 4, 2, 1),                           # 32x32
            )

        def encode_image(self, x):
            return self.enc(x)

        def reconstruct(self, x):
            return self.dec(self.dec_in(self.enc(x)))

    return SimpleNamespace(torch=torch, WorldCLIP=WorldCLIP, WorldCLIPPlain=WorldCLIPPlain, PairNet=PairNet, AutoEncoder=AutoEncoder)


def _check_name(name: str) -> None:
    if name not in WORLD_MODELS:
        raise UnknownChoice("world model", name, WORLD_MODELS)


def build_world_model(name: str, seed: int = 0):
    """A randomly initialised world model (deterministic for a given seed), in train mode."""
    _check_name(name)
    nets = _nets()
    cls = {"clip": nets.WorldCLIP, "clip-plain": nets.WorldCLIPPlain, "pairnet": nets.PairNet, "autoenc": nets.AutoEncoder}[name]
    with nets.torch.random.fork_rng(devices=[]):
        nets.torch.manual_seed(seed)
        return cls()


def weights_path(name: str) -> Path:
    """Path of the shipped weights of a world model."""
    _check_name(name)
    return WEIGHTS_DIR / f"{name}.safetensors"


def load_world_model(name: str, weights: str | None = None):
    """Build a world model in eval mode.

    Args:
        name: one of WORLD_MODELS ("clip", "pairnet", "autoenc").
        weights: None for the shipped weights, "random" for a random init, or a path to a
            safetensors file saved by ``t2c world train``.

    Returns:
        A torch module with ``dim``, ``image_size``, ``mean``, ``std``, ``has_text``, ``encode_image``
        (and ``encode_text`` for clip).

    Raises:
        UnknownChoice: unknown model name.
        NotFound: the weights file does not exist.
        DamagedArtefact: the file is not a readable safetensors file.
        EncoderError: the file does not fit the architecture.
    """
    model = build_world_model(name)
    if weights != "random":
        path = Path(weights) if weights else weights_path(name)
        _, sd = read_artefact(path, f"world:{name} weights", framework="pt",
                              fix="run `t2c world train` to rebuild the shipped weights, or pass weights=random")
        try:
            model.load_state_dict(sd, strict=True)
        except RuntimeError as e:
            raise EncoderError(f"weights {str(path)!r} do not fit world:{name}: {str(e).splitlines()[0]}",
                               f"pass weights saved for world:{name} by `t2c world train`") from None
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def save_world_model(model, path: str | os.PathLike, metadata: dict | None = None) -> Path:
    """Save a model's state dict as safetensors (atomically), with JSON-able metadata."""
    meta = {"model": model.name, **{k: json.dumps(v) for k, v in (metadata or {}).items()}}
    return write_artefact(path, model.state_dict(), meta)

"""A classifier head as a closed-vocabulary text tower: concepts are its class names, vectors its weight rows.

A store aligned into a classifier's pooled feature space (``--clip effnet:lite2``: lite0 aligned into lite2, or
lite2 itself) has no text tower, but its classifier head names 1,000 directions in that space. A concept is
one of those class names (any of an ImageNet class's synonyms, "running shoe", "T-shirt", "tee shirt";
case, hyphens and a plural "s" do not matter; a WordNet id such as ``n04120489`` works too), and its vector is
that class's weight row, normalised: the paper's mechanism with the head standing in for text, on real weights.
Every query feature then works unchanged (AND/OR/NOT, calibration, audits, drift, classify, explain).

An unknown name is an :class:`~t2c.data.errors.UnknownChoice` that lists the closest class names; a name
shared by two classes ("crane": the bird and the machine) is an error that lists their WordNet ids.
Vectors are cached like CLIP concept vectors (in memory and under ``$T2C_CACHE_DIR``), so a repeated query
does not build the classifier (torch) again.
"""
from __future__ import annotations

import difflib
import re
import threading

import numpy as np

from t2c.data.errors import InvalidInput, UnknownChoice
from t2c.query.concepts import ConceptBank

__all__ = ["HeadConceptBank", "is_head_spec", "normalise_name"]


def normalise_name(text: str, lower: bool = True) -> str:
    """Hyphens, underscores and runs of spaces made one space (and lower-cased): how class names are matched."""
    text = re.sub(r"[\s_\-]+", " ", str(text)).strip()
    return text.lower() if lower else text


def is_head_spec(clip_spec: str) -> bool:
    """Whether a store's target spec names a classifier whose head is its vocabulary (no torch import)."""
    from t2c.indexer.encoders import feature_parts, parse_spec, source_info

    try:
        spec = parse_spec(str(clip_spec))
    except InvalidInput:
        return False
    return source_info(spec.source).vocabulary and not feature_parts(spec.options.get("features", "final"))


class _Index:
    """Synonym -> class rows of one head vocabulary."""

    def __init__(self, vocab):
        self.vocab = vocab
        self.by_name: dict[str, list[int]] = {}
        self.by_case: dict[str, list[int]] = {}  # "cardigan" (the sweater) vs "Cardigan" (the corgi)
        self.shown: dict[str, str] = {}  # matched form -> the head's own spelling ("t shirt" -> "T-shirt")
        for i, desc in enumerate(vocab.names):
            for raw in desc.split(","):
                self.shown.setdefault(normalise_name(raw), raw.strip())
            for syn in dict.fromkeys(normalise_name(s, lower=False) for s in desc.split(",")):
                if syn:
                    self.by_case.setdefault(syn, []).append(i)
                    rows = self.by_name.setdefault(syn.lower(), [])
                    if i not in rows:
                        rows.append(i)
        self.by_id = {str(cid).lower(): i for i, cid in enumerate(vocab.ids)}

    def resolve(self, text: str) -> int:
        """The class row a concept text names (spelling as written first, then any case, then without a plural s).

        Raises:
            UnknownChoice: no class has this name (the hint lists the closest names).
            InvalidInput: the name belongs to more than one class (the hint lists their ids).
        """
        key = normalise_name(text)
        if key in self.by_id:
            return self.by_id[key]
        kept = normalise_name(text, lower=False)
        for cand in (kept, kept[:-2] if kept.endswith("es") else "", kept[:-1] if kept.endswith("s") else ""):
            exact = self.by_case.get(cand) if cand else None
            if exact is not None and len(exact) == 1:
                return exact[0]
            rows = self.by_name.get(cand.lower()) if cand else None
            if rows is not None:
                break
        if rows is None:
            raise self._unknown(text, key)
        if len(rows) > 1:
            alts = "; ".join(f"{self.vocab.ids[r]} ({self.vocab.names[r]})" for r in rows)
            raise InvalidInput(f"class name {text!r} names {len(rows)} classes of {self.vocab.source}'s head",
                               f"use one of their WordNet ids: {alts}")
        return rows[0]

    def _unknown(self, text: str, key: str) -> UnknownChoice:
        """The error for a name no class has, listing the closest class names as the head spells them."""
        close = difflib.get_close_matches(key, list(self.by_name), n=8, cutoff=0.6)
        close += [n for n in self.by_name if key and key in n.split(" ") and n not in close][:8 - len(close)]
        close = [self.shown.get(c, c) for c in close]
        err = UnknownChoice(f"class name of {self.vocab.source}'s head", text, close or ["(none close)"])
        err.hint = (f"close class names: {', '.join(close)}" if close else "no class name is close") + \
            f"; this store's concepts are the head's {len(self.vocab.names)} class names (or WordNet ids)"
        return err


class HeadConceptBank(ConceptBank):
    """Concept text -> unit vector: the weight row of the class it names, in the classifier's feature space.

    Args:
        clip_spec: the store's target spec (``snapshot.clip``), a classifier with a named head (effnet:lite2).
        cache_dir: optional on-disk cache folder (default ``$T2C_CACHE_DIR``), as for :class:`ConceptBank`.
        encoder: an already-built encoder with a ``vocabulary`` (tests); default built lazily.

    Example:
        >>> bank = HeadConceptBank("effnet:lite2")  # doctest: +SKIP
        >>> bank.vector("running shoe").shape  # doctest: +SKIP
        (1280,)
    """

    def __init__(self, clip_spec: str, templates=None, cache_dir=None, *, encoder=None):
        super().__init__(clip_spec, ("{}",), cache_dir, encoder=encoder)
        self._index: _Index | None = None
        self._index_lock = threading.Lock()

    @property
    def index(self) -> _Index:
        """The head's synonym index (builds the classifier on first use)."""
        if self._index is None:
            with self._index_lock:
                if self._index is None:
                    vocab = getattr(self.encoder, "vocabulary", None)
                    if vocab is None:
                        from t2c.data.errors import EncoderError

                        raise EncoderError(f"{self.clip_spec} has no named classifier head",
                                           "align into a classifier with class names, e.g. effnet:lite2")
                    self._index = _Index(vocab)
        return self._index

    def class_of(self, text: str) -> tuple[str, str]:
        """(WordNet id, full class description) of the class a concept text names."""
        i = self.index.resolve(text)
        return self.index.vocab.ids[i], self.index.vocab.names[i]

    def _embed(self, texts: list[str]) -> np.ndarray:
        w = self.index.vocab.weight
        rows = np.stack([w[self.index.resolve(t)] for t in texts]).astype(np.float64)
        rows /= np.maximum(np.linalg.norm(rows, axis=1, keepdims=True), 1e-12)
        return rows.astype(np.float32)

    @property
    def present_score(self) -> float | None:
        """A softmax head has no "present" cut of its own: calibration uses the collection's scores alone."""
        return None

    def reference_words(self) -> tuple[str, ...]:
        """Class rows are not centred (measured only for text towers)."""
        return ()

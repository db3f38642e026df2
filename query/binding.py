"""Binding at query time: judge a compositional concept against the rivals that share a word with it.

A CLIP scores "orange star" high on an image with an orange circle and a blue star: both words are there,
bound to other objects. Zero-shot classification avoids such mistakes by comparing a class with the other
classes; this module does the same for a concept made of an attribute word and an object word
("orange star"), using the text tower alone (no labels):

* the rivals are the concepts that share a word with it: the same attribute with the other objects
  ("orange circle", "orange square", ...) and the same object with the other attributes ("blue star", ...);
* the concept is present in an image when each of its words is present on its own (each word's calibrated
  threshold), and it beats, on at least one side, every rival of that side:
  ``margin = score - min(max(same-attribute rivals), max(same-object rivals)) >= 0``.
  An image whose orange thing is a circle and whose star is blue has both kinds of rival above "orange
  star"; an image with an orange star has at most one kind (an orange circle beside it, or a blue star).

Which words form attribute and object groups depends on the CLIP model (``word_groups``): the concept world's
colours and shapes for ``world:`` models, and for open-vocabulary CLIPs the basic colour terms with the
query's own noun (only the same-object side then: "red car" against "blue car", "green car", ...).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["Binding", "binding_of", "word_groups", "bound_mask", "present_on", "BASIC_COLOURS"]

#: Colour terms for open-vocabulary CLIPs (Berlin and Kay's eleven basic colour terms).
BASIC_COLOURS: tuple[str, ...] = ("red", "orange", "yellow", "green", "blue", "purple", "pink", "brown",
                                  "black", "white", "gray")


@dataclass(frozen=True)
class Binding:
    """A compositional concept and its rivals.

    Attributes:
        text: the concept ("orange star"). words: its attribute and object words ("orange", "star").
        same_attribute: rivals with the same attribute and another object ("orange circle", ...).
        same_object: rivals with the same object and another attribute ("blue star", ...).
    """

    text: str
    words: tuple[str, str]
    same_attribute: tuple[str, ...]
    same_object: tuple[str, ...]

    def texts(self) -> list[str]:
        """Every concept whose score the rule needs: the concept, its two words, then the rivals."""
        return [self.text, *self.words, *self.same_attribute, *self.same_object]

    def to_dict(self) -> dict:
        """JSON-friendly summary (shown by ``--explain``)."""
        return {"words": list(self.words), "rivals": len(self.same_attribute) + len(self.same_object)}


def word_groups(clip_spec: str) -> tuple[tuple[str, ...], tuple[str, ...] | None]:
    """(attribute words, object words or None for an open vocabulary) for a CLIP spec."""
    if str(clip_spec or "").startswith("world:"):
        from t2c.data.world import vocab

        return tuple(vocab.COLORS), tuple(vocab.SHAPES)
    return BASIC_COLOURS, None


def binding_of(text: str, clip_spec: str) -> Binding | None:
    """The binding of a concept of exactly two words, an attribute then an object; None for any other."""
    words = str(text).lower().split()
    if len(words) != 2:
        return None
    attrs, objects = word_groups(clip_spec)
    a, o = words
    if a not in attrs or a == o or (objects is not None and o not in objects) or o in attrs:
        return None
    same_attribute = tuple(f"{a} {x}" for x in objects if x != o) if objects is not None else ()
    same_object = tuple(f"{x} {o}" for x in attrs if x != a)
    return Binding(f"{a} {o}", (a, o), same_attribute, same_object)


def bound_mask(b: Binding, scores: dict, thresholds: dict) -> tuple[np.ndarray, np.ndarray]:
    """(present, margin) per row from the scores of ``b.texts()`` and the thresholds of its two words.

    Args:
        b: the binding. scores: text -> (m,) scores over the same rows. thresholds: word -> threshold.
    """
    s = np.asarray(scores[b.text], np.float32)
    sides = [np.max(np.stack([scores[r] for r in side]), 0) for side in (b.same_attribute, b.same_object) if side]
    margin = s - (np.minimum(*sides) if len(sides) == 2 else sides[0])
    words_ok = np.ones(len(s), bool)
    for w in b.words:
        words_ok &= np.asarray(scores[w]) >= thresholds[w]
    return words_ok & (margin >= 0), margin


def present_on(snapshot, bank, text: str, cal, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(present, margin) of a concept calibrated with method "bound" on the given sorted rows.

    Args:
        snapshot: the store snapshot. bank: its ConceptBank. text: the concept.
        cal: its Calibration (``params["word_thresholds"]``). rows: sorted row positions.
    """
    from t2c.query.calibrate import concept_scores

    b = binding_of(text, getattr(bank, "clip_spec", ""))
    texts = b.texts()
    sc = concept_scores(snapshot, bank.vectors(texts), rows=np.asarray(rows, np.int64))
    return bound_mask(b, {t: sc[:, j] for j, t in enumerate(texts)}, cal.params["word_thresholds"])

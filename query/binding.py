"""Binding at query time: judge a compositional concept against the rivals that share a word with it.

A CLIP scores "orange star" high on an image with an orange circle and a blue star: both words are there,
bound to other objects. Zero-shot classification avoids such mistakes by comparing a class with the other
classes; this module does the same for a concept made of an attribute word and an object word
("orange star"), using the text tower alone (no labels). Two rules, by vocabulary:

* **scene rule** (closed vocabularies, such as the concept world's colours and shapes): each image's present
  words are read from their own calibrated thresholds ("orange", "blue", "circle", "star"); its *smallest
  explanations* are the smallest sets of attribute-object pairs that use exactly those words ({orange circle,
  blue star} or {orange star, blue circle}); the best explanation is the one whose pairs have the highest mean
  score, and the concept is present when it is in it.
  ``margin = best mean with the concept - best mean without it``. Images with more than ``MAX_SCENE_WORDS``
  present words on one side fall back to the rival rule.
* **rival rule** (open vocabularies, and the fallback): the rivals are the concepts that share a word with it,
  the same attribute with the other objects ("orange circle", ...) and the same object with the other
  attributes ("blue star", ...); the concept is present when each of its words passes its own threshold and
  it beats, on at least one side, every rival of that side:
  ``margin = score - min(max(same-attribute rivals), max(same-object rivals))``.

Measured on a world collection of 1,500 images (collection seed 101, the tuning seed; ``bench/query_accuracy.py``
reports other seeds) with world:clip's 1,100-step weights, over the 48 colour-shape pairs: the rival rule reached
precision 0.84 at recall 0.94, the scene rule 0.94 at 0.93.

**Does the text tower bind at all?** A CLIP trained with a plain contrastive loss on whole captions (as the
public CLIPs were, and world:clip-plain) is close to a bag of words: every reading of an image's words scores
alike, so the margins above are noise around zero and the rule turns recall into coin tosses. Each concept's
*binding strength* is measured on the calibration sample, without labels: the median ``|margin|`` over the
images where both words pass, over the spread (std) of the concept's own scores. Below ``MIN_BINDING`` the
concept is judged by its words alone (``Binding`` rule "words"). Measured (tuning seeds 101 and 102): 0.02-0.07
for every colour-shape pair on world:clip-plain, 0.23-0.82 on world:clip; on world:clip-plain the words
alone reached pair F1 0.62 against the scene rule's 0.56 (label-chosen ceiling 0.66).

**Does it bind by itself?** A tower trained to bind (world:clip) scores a pair's own images above the rest, so
the pair's own calibrated threshold already tells its images apart, and the scene rule can only add the words'
mistakes: it reads every word of the image, and on a 3-object image one missed or spurious word changes the
readings. So where the concept's own threshold and the rule pick the same images on at least ``OWN_AGREEMENT``
(Jaccard, over the calibration sample: :func:`rule_agreement`; at least ``MIN_AGREEMENT_IMAGES`` picked by
either), the concept keeps its own calibration (rule "own"). Measured (``bench/query_accuracy.py``, 1,500-image collections; tuned on seeds 101-102 x 0, 4): the pairs
of world:clip agree at 0.87-1.0 (median 0.97-0.98), of pooled pairnet at 0.46-0.95, of world:clip's 1,100-step
weights at 0.53-0.86 (none kept: its answers are unchanged); with 0.95, rare conjunctions on world:clip went from
0.954 to 0.990 on the tuning seeds and from 0.822 to 0.922 on fresh ones (401-402 x 8, 9).

Which words form attribute and object groups depends on the CLIP model (``word_groups``): the concept world's
colours and shapes for ``world:`` models, and for open-vocabulary CLIPs the basic colour terms with the
query's own noun (only the same-object side of the rival rule then: "red car" against "blue car", ...).
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

__all__ = ["Binding", "binding_of", "word_groups", "bound_mask", "present_on", "binding_strength", "reading_share",
           "words_pass", "joint_share", "jointly_on",
           "rule_agreement", "BASIC_COLOURS", "MAX_SCENE_WORDS", "MIN_BINDING", "OWN_AGREEMENT",
           "MIN_AGREEMENT_IMAGES"]

#: Colour terms for open-vocabulary CLIPs (Berlin and Kay's eleven basic colour terms).
BASIC_COLOURS: tuple[str, ...] = ("red", "orange", "yellow", "green", "blue", "purple", "pink", "brown",
                                  "black", "white", "gray")
#: Above this many present words on one side, an image's explanations are not enumerated (rival rule instead).
MAX_SCENE_WORDS = 4
#: Binding strength (median |margin| where both words pass, over the concept's score std) below which the text
#: tower is taken not to bind the concept's words, and its words alone decide.
MIN_BINDING = 0.15
#: Agreement (Jaccard) between the concept's own calibrated threshold and the binding rule, over the calibration
#: sample, at or above which the text tower is taken to bind the concept by itself: its own threshold decides.
OWN_AGREEMENT = 0.95
#: ... taken over at least this many images picked by either (fewer: the rule stays).
MIN_AGREEMENT_IMAGES = 10


@dataclass(frozen=True)
class Binding:
    """A compositional concept and its rivals.

    Attributes:
        text: the concept ("orange star"). words: its attribute and object words ("orange", "star").
        same_attribute: rivals with the same attribute and another object ("orange circle", ...).
        same_object: rivals with the same object and another attribute ("blue star", ...).
        scene: (every attribute word, every object word) of a closed vocabulary, for the scene rule; None for
            an open vocabulary (rival rule only).
    """

    text: str
    words: tuple[str, str]
    same_attribute: tuple[str, ...]
    same_object: tuple[str, ...]
    scene: tuple[tuple[str, ...], tuple[str, ...]] | None = None

    def scene_words(self) -> list[str]:
        """The words whose thresholds the rule needs: every scene word, or the concept's own two."""
        return [*self.scene[0], *self.scene[1]] if self.scene else list(self.words)

    def texts(self) -> list[str]:
        """Every concept whose score the rule needs: the concept, the words, the rivals, every scene pair."""
        out = [self.text, *self.scene_words(), *self.same_attribute, *self.same_object]
        if self.scene:
            out += [f"{a} {o}" for a in self.scene[0] for o in self.scene[1]]
        return list(dict.fromkeys(out))

    def to_dict(self) -> dict:
        """JSON-friendly summary (shown by ``--explain``)."""
        return {"words": list(self.words), "rivals": len(self.same_attribute) + len(self.same_object),
                "rule": "scene" if self.scene else "rivals"}


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
    return Binding(f"{a} {o}", (a, o), same_attribute, same_object,
                   (tuple(attrs), tuple(objects)) if objects is not None else None)


def _rival_margin(b: Binding, scores: dict) -> np.ndarray:
    s = np.asarray(scores[b.text], np.float32)
    sides = [np.max(np.stack([scores[r] for r in side]), 0) for side in (b.same_attribute, b.same_object) if side]
    return s - (np.minimum(*sides) if len(sides) == 2 else sides[0])


@lru_cache(maxsize=4096)
def _smallest_explanations(n_a: int, n_o: int) -> np.ndarray:
    """Every smallest set of (attribute, object) index pairs using all n_a attributes and all n_o objects.

    Returns an int array (explanations, k, 2) with k = max(n_a, n_o): the larger side's words each take one
    word of the smaller side, every word of which is taken at least once.
    """
    big, small = max(n_a, n_o), min(n_a, n_o)
    out = []
    for f in itertools.product(range(small), repeat=big):
        if len(set(f)) == small:
            out.append([(i, j) if n_a >= n_o else (j, i) for i, j in enumerate(f)])
    return np.asarray(out, np.int64).reshape(len(out), big, 2)


def _scene_groups(scene, pairs, scores: dict, thresholds: dict, ok: np.ndarray):
    """The enumerable rows among ``ok`` (at most ``MAX_SCENE_WORDS`` present words a side), grouped by their
    present words: yields (positions into ``rows``, rows, explanations as (explanations, k) attribute and object
    indices, whether each explanation holds every (attribute, object) word pair of ``pairs``), after first
    yielding ``rows`` itself."""
    attrs, objs = scene
    want = [(attrs.index(a), objs.index(o)) for a, o in pairs]
    on_a = np.stack([np.asarray(scores[a]) >= thresholds[a] for a in attrs], 1)
    on_o = np.stack([np.asarray(scores[o]) >= thresholds[o] for o in objs], 1)
    rows = np.flatnonzero(ok & (on_a.sum(1) <= MAX_SCENE_WORDS) & (on_o.sum(1) <= MAX_SCENE_WORDS))
    yield rows
    key = on_a[rows] @ (1 << np.arange(len(attrs))) * (1 << len(objs)) + on_o[rows] @ (1 << np.arange(len(objs)))
    for k in np.unique(key):
        sel = np.flatnonzero(key == k)
        r = rows[sel]
        pa, po = np.flatnonzero(on_a[r[0]]), np.flatnonzero(on_o[r[0]])
        ex = _smallest_explanations(len(pa), len(po))
        ga, go = pa[ex[..., 0]], po[ex[..., 1]]                     # (explanations, k) word indices
        has = np.ones(len(ex), bool)
        for ia, io in want:
            has &= ((ga == ia) & (go == io)).any(1)
        yield sel, r, ga, go, has


def _scene_margin(b: Binding, scores: dict, thresholds: dict, margin: np.ndarray, words_ok: np.ndarray,
                  share: np.ndarray) -> None:
    """Overwrite ``margin`` with the scene rule's margin, and ``share`` with the reading share
    (``reading_share``), where an image's explanations can be enumerated."""
    attrs, objs = b.scene
    groups = _scene_groups(b.scene, [b.words], scores, thresholds, words_ok)
    rows = next(groups)
    if not len(rows):
        return
    # (rows, attributes, objects) pair scores of the rows the rule reads
    pair = np.stack([np.stack([np.asarray(scores[f"{a} {o}"], np.float64)[rows] for o in objs], 1) for a in attrs], 1)
    for sel, r, ga, go, has in groups:
        share[r] = float(has.mean())
        mean = pair[sel][:, ga, go].mean(2)                          # (rows, explanations)
        if not has.all():
            margin[r] = mean[:, has].max(1) - mean[:, ~has].max(1)
        else:                                                        # nothing else explains the words
            margin[r] = np.maximum(np.abs(margin[r]), 1e-6)


def bound_mask(b: Binding, scores: dict, thresholds: dict, binds: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """(present, margin) per row from the scores of ``b.texts()`` and the thresholds of ``b.scene_words()``.

    Args:
        b: the binding. scores: text -> (m,) scores over the same rows. thresholds: word -> threshold.
        binds: whether the text tower binds the words (``binding_strength``); False: the words alone decide.
    """
    present, margin, _ = _judge(b, scores, thresholds, binds)
    return present, margin


def _judge(b: Binding, scores: dict, thresholds: dict, binds: bool = True):
    """``bound_mask``'s (present, margin) and each row's ``reading_share``, from one enumeration."""
    margin = _rival_margin(b, scores).astype(np.float64)
    words_ok = words_pass(b, scores, thresholds)
    share = words_ok.astype(np.float64)
    if b.scene:
        _scene_margin(b, scores, thresholds, margin, words_ok, share)
    return (words_ok & (margin >= 0) if binds else words_ok), margin, share


def words_pass(b: Binding, scores: dict, thresholds: dict) -> np.ndarray:
    """Rows where each of the concept's two words passes its own threshold."""
    ok = np.ones(len(np.asarray(scores[b.words[0]])), bool)
    for w in b.words:
        ok &= np.asarray(scores[w]) >= thresholds[w]
    return ok


def binding_strength(margin: np.ndarray, words_ok: np.ndarray, scores: np.ndarray) -> float | None:
    """Median |margin| over the rows where both words pass, over the std of the concept's scores (None: fewer
    than 5 such rows, or constant scores). Below ``MIN_BINDING`` the text tower does not bind the words."""
    m = np.abs(np.asarray(margin, np.float64)[np.asarray(words_ok, bool)])
    sd = float(np.std(np.asarray(scores, np.float64)))
    if len(m) < 5 or sd <= 0:
        return None
    return float(np.median(m)) / sd


def rule_agreement(own: np.ndarray, rule: np.ndarray, min_images: int | None = None) -> float | None:
    """Jaccard agreement of two present masks over the same rows: |both| / |either| (None: fewer than
    ``min_images``, default ``MIN_AGREEMENT_IMAGES``, are picked by either: too few to tell).

    A text tower that binds a concept's words by itself scores the concept's own images above the rest, so its own
    calibrated threshold and the binding rule pick the same images (agreement near 1); one that does not also
    passes the images where both words are bound to other objects (0.53-0.86 on world:clip's 1,100-step weights)."""
    own, rule = np.asarray(own, bool), np.asarray(rule, bool)
    either = int((own | rule).sum())
    need = MIN_AGREEMENT_IMAGES if min_images is None else max(1, int(min_images))
    return None if either < need else int((own & rule).sum()) / either


def reading_share(b: Binding, scores: dict, thresholds: dict) -> np.ndarray:
    """Per row, the share of the smallest explanations of its present words that hold the concept: the chance
    the concept is there when every reading is equally likely (1 where both words pass and nothing else
    explains them, or where explanations are not enumerated; 0 where a word fails)."""
    return joint_share([b], scores, thresholds)


def joint_share(bindings: list, scores: dict, thresholds: dict) -> np.ndarray:
    """Per row, the share of the smallest explanations of its present words that hold *every* concept of
    ``bindings`` at once (one scene): 0 where a word fails or no reading holds them all, 1 where explanations
    are not enumerated (more than ``MAX_SCENE_WORDS`` words a side, or an open vocabulary).

    "purple triangle AND purple circle" on an image whose words are purple, red, triangle and circle: its two
    readings are {purple triangle, red circle} and {purple circle, red triangle}; each pair alone has share 1/2,
    the two together 0. ``scores`` / ``thresholds`` hold every scene word of the bindings (one scene)."""
    ok = np.ones(len(np.asarray(scores[bindings[0].words[0]])), bool)
    for b in bindings:
        ok &= words_pass(b, scores, thresholds)
    share = ok.astype(np.float64)
    scene = bindings[0].scene
    if scene and all(b.scene == scene for b in bindings):
        groups = _scene_groups(scene, [b.words for b in bindings], scores, thresholds, ok)
        next(groups)
        for _, r, _, _, has in groups:
            share[r] = float(has.mean())
    return share


def jointly_on(snapshot, bank, bindings: list, thresholds: dict, rows: np.ndarray) -> np.ndarray:
    """Whether some reading of each row's present words holds every concept of ``bindings`` (``joint_share``
    > 0), on the given sorted rows; reads the scene words' scores (``scene_words`` of the first binding)."""
    from t2c.query.calibrate import concept_scores

    words = list(dict.fromkeys(w for b in bindings for w in b.scene_words()))
    sc = concept_scores(snapshot, bank.vectors(words), rows=np.asarray(rows, np.int64))
    return joint_share(bindings, {w: sc[:, j] for j, w in enumerate(words)}, thresholds) > 0


def present_on(snapshot, bank, text: str, cal, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """(present, margin, reading share) of a concept calibrated with method "bound" on the given sorted rows
    (margin 0 and share None where its words alone decide).

    Args:
        snapshot: the store snapshot. bank: its ConceptBank. text: the concept.
        cal: its Calibration (``params["word_thresholds"]``). rows: sorted row positions.
    """
    from t2c.query.calibrate import concept_scores

    b = binding_of(text, getattr(bank, "clip_spec", ""))
    binds = cal.params.get("binds", True)
    texts = b.texts() if binds else [b.text, *b.words]  # judged by its words: no rival or scene score needed
    sc = concept_scores(snapshot, bank.vectors(texts), rows=np.asarray(rows, np.int64))
    scores = {t: sc[:, j] for j, t in enumerate(texts)}
    words = cal.params["word_thresholds"]
    if not binds:
        return words_pass(b, scores, words), np.zeros(len(sc)), None
    return _judge(b, scores, words)
